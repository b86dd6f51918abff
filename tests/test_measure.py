"""Measured memory is a measurement: a block's peak does not depend on what ran before it."""

from fedpipe.measure import GIB, PeakMemory

CHUNK = 100 * 1024  # below glibc's mmap threshold: served from the heap, kept there when freed
COUNT = 2000


def test_peak_counts_memory_the_heap_kept_from_earlier_work():
    earlier = [bytearray(CHUNK) for _ in range(COUNT)]
    pin = bytearray(CHUNK)  # above them in the heap, so freeing them cannot shrink it from the top
    del earlier  # about 195 MiB free but resident: reused below without growing the resident set
    with PeakMemory() as peak:
        again = [bytearray(CHUNK) for _ in range(COUNT)]
    assert peak.peak_gib > 0.8 * COUNT * CHUNK / GIB
    del again, pin

