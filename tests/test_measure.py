"""Measured memory is a measurement: a block's peak does not depend on what ran before it."""

import os
import subprocess
import sys

import pytest

from fedpipe.allocator import KEEP_PAGES_CONF, jemalloc_library
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



@pytest.mark.skipif(jemalloc_library() is None, reason="libjemalloc2 is not installed")
def test_peak_counts_memory_jemalloc_kept_from_earlier_work():
    """The same under jemalloc with its decay off (what the fedpipe command runs with): freed
    extents of about 1 MiB (a round's activations) stay resident until purged, and reusing them
    grew nothing, so a second round read less than the first (0.81, then 0.50 GiB)."""
    env = {**os.environ, "LD_PRELOAD": jemalloc_library(), "MALLOC_CONF": KEEP_PAGES_CONF}
    code = """
import torch
from fedpipe.allocator import running
from fedpipe.measure import GIB, PeakMemory
assert running() == "jemalloc"
n, count = 250_000, 200  # 200 tensors of 0.95 MiB
earlier = [torch.ones(n) for _ in range(count)]
del earlier
with PeakMemory() as peak:
    again = [torch.ones(n) for _ in range(count)]
assert peak.peak_gib > 0.8 * count * n * 4 / GIB, peak.peak_gib
"""
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
