"""Which memory allocator a CPU training process runs with, and fedpipe's setting for it.

Peak memory on a CPU is predictable (the cost model within ±10%) only when freed activation
buffers do not pile up in the allocator's heap. Measured on SmolLM2-135M, LoRA r=8, one thread
(``benchmarks/bench_allocator.py``; README 'Calibration'):

- glibc malloc as it comes keeps them: its peak is 1.4-2x jemalloc's, still climbing after three
  steps and up to 27% apart between processes of the same configuration;
- glibc with ``M_MMAP_THRESHOLD`` = 1 MiB hands them back on free: predictable, but every step
  page-faults its activations afresh (3-4x the page faults, 1.15-1.3x the CPU time per step);
- jemalloc reuses them without piling them up: the lowest peak, the same from process to process.
  Told never to return freed pages to the system (dirty and muzzy decay off), it also takes a
  third of glibc's page faults per step, and its peak no longer depends on how fast the steps run.

jemalloc cannot be switched on inside a running process: it must be preloaded when the process
starts (``LD_PRELOAD=libjemalloc.so.2``; Debian/Ubuntu package ``libjemalloc2``). So a process
started with it gets the decay turned off, and one started without it gets glibc's 1 MiB mmap
threshold. Child processes inherit ``LD_PRELOAD``, so ``fedpipe calibrate``'s measuring processes
and the Flower processes run with the allocator ``fedpipe`` itself was started with.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
from collections.abc import Callable
from typing import Literal

Allocator = Literal["jemalloc", "glibc", "other"]
M_MMAP_THRESHOLD = -3  # glibc malloc.h
GLIBC_MMAP_THRESHOLD_BYTES = 1 << 20

log = logging.getLogger(__name__)
_prepared = False


def running() -> Allocator:
    """The allocator serving malloc in this process: jemalloc where it has replaced malloc
    process-wide (preloaded), else glibc where glibc is the C library, else other."""
    process = ctypes.CDLL(None)
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.gnu_get_libc_version  # noqa: B018 - only glibc has it
    except (OSError, AttributeError):
        libc = None
    if hasattr(process, "mallctl") and (libc is None or _address(process.malloc) != _address(libc.malloc)):
        return "jemalloc"
    return "glibc" if libc is not None else "other"


def _address(function: Callable[..., object]) -> int | None:
    return ctypes.cast(function, ctypes.c_void_p).value


def jemalloc_library() -> str | None:
    """The name to put in ``LD_PRELOAD`` for jemalloc on this machine; None where not installed."""
    return ctypes.util.find_library("jemalloc")


def _mallctl() -> Callable[..., int]:
    mallctl = ctypes.CDLL(None).mallctl
    mallctl.argtypes = [ctypes.c_char_p, ctypes.c_void_p, ctypes.POINTER(ctypes.c_size_t),
                        ctypes.c_void_p, ctypes.c_size_t]
    mallctl.restype = ctypes.c_int
    return mallctl


def jemalloc_decay_ms() -> tuple[int, int]:
    """(dirty, muzzy) decay of jemalloc's first arena in ms; -1 is 'never return pages'."""
    mallctl, value = _mallctl(), ctypes.c_ssize_t()
    size = ctypes.c_size_t(ctypes.sizeof(value))
    out = []
    for kind in ("dirty", "muzzy"):
        mallctl(f"arena.0.{kind}_decay_ms".encode(), ctypes.byref(value), ctypes.byref(size), None, 0)
        out.append(value.value)
    return out[0], out[1]


def _keep_jemalloc_pages() -> None:
    """Dirty and muzzy decay off, for the arenas in use and those made later."""
    mallctl, never = _mallctl(), ctypes.c_ssize_t(-1)
    count, size = ctypes.c_uint(), ctypes.c_size_t(ctypes.sizeof(ctypes.c_uint))
    mallctl(b"arenas.narenas", ctypes.byref(count), ctypes.byref(size), None, 0)
    for kind in ("dirty", "muzzy"):
        mallctl(f"arenas.{kind}_decay_ms".encode(), None, None, ctypes.byref(never), ctypes.sizeof(never))
        for i in range(count.value):  # arenas not created yet answer EFAULT: they take the above
            mallctl(f"arena.{i}.{kind}_decay_ms".encode(), None, None, ctypes.byref(never),
                    ctypes.sizeof(never))


def prepare_for_training() -> Allocator:
    """Once per process, before CPU training: keep freed buffers from piling up in the resident
    set without paying for it in page faults, as far as the running allocator allows (module
    docstring). Elsewhere than jemalloc and glibc (macOS, musl) nothing is changed."""
    global _prepared
    allocator = running()
    if _prepared:
        return allocator
    _prepared = True
    if allocator == "jemalloc":
        _keep_jemalloc_pages()
    elif allocator == "glibc":
        mallopt = ctypes.CDLL("libc.so.6").mallopt
        mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
        mallopt(M_MMAP_THRESHOLD, GLIBC_MMAP_THRESHOLD_BYTES)
        log.info("CPU training on glibc malloc with a 1 MiB mmap threshold; started with "
                 "LD_PRELOAD=libjemalloc.so.2 it trains about 1.3x faster at no more memory")
    return allocator
