"""fedpipe.allocator in real processes: glibc gets the 1 MiB mmap threshold (freed buffers leave
the resident set), a preloaded jemalloc is recognised and told to keep its pages."""

import os
import subprocess
import sys

import pytest

from fedpipe import allocator

# Three 4 MiB buffers, each written and freed; prints how much the resident set grew.
FREED_BUFFERS = """
import ctypes, os, sys
from fedpipe import allocator
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
rss = lambda: int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
if sys.argv[1] == "prepare":
    print(allocator.prepare_for_training(), allocator.prepare_for_training())
before = rss()
for _ in range(3):
    p = libc.malloc(4 << 20)
    ctypes.memset(p, 1, 4 << 20)
    libc.free(p)
print(rss() - before)
"""


def _run(*args: str, env: dict[str, str] | None = None) -> list[str]:
    proc = subprocess.run([sys.executable, "-c", FREED_BUFFERS, *args], capture_output=True, text=True,
                          env=env, check=True)
    return proc.stdout.split("\n")


@pytest.mark.skipif(allocator.running() != "glibc", reason="glibc malloc only")
def test_glibc_returns_freed_buffers_only_when_prepared():
    kept = int(_run("as-is")[0])
    prepared_as, returned = _run("prepare")[:2]
    assert prepared_as == "glibc glibc"
    assert kept >= 3 << 20  # glibc's climbing threshold put the later buffers in its heap
    assert int(returned) < 1 << 20  # mmapped from 1 MiB on: freed pages left the process


@pytest.mark.skipif(allocator.jemalloc_library() is None, reason="libjemalloc2 not installed")
def test_preloaded_jemalloc_is_recognised_and_keeps_its_pages():
    env = dict(os.environ, LD_PRELOAD=allocator.jemalloc_library())
    script = ("from fedpipe import allocator; print(allocator.jemalloc_decay_ms()); "
              "print(allocator.prepare_for_training()); print(allocator.jemalloc_decay_ms())")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env,
                          check=True)
    before, prepared_as, after = proc.stdout.split("\n")[:3]
    assert before != "(-1, -1)"  # jemalloc's defaults return freed pages after a while
    assert (prepared_as, after) == ("jemalloc", "(-1, -1)")

