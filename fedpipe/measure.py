"""Measured, not estimated: peak memory of a block of work, on CUDA or on a CPU.

On CUDA the allocator's peak is exact. On a CPU the process's anonymous resident memory is sampled
every few milliseconds while the block runs; the peak above the level at entry is the block's own
working memory (activations, gradients, optimizer state), to which callers add the resident model.
Two things made that growth wrong in a long-lived process, and both are taken out: memory the
allocator kept from earlier work was reused without growing the resident set (so later rounds
read less: 1.03, 0.59, 0.32 GiB in rounds 1-3 for one server under glibc; 0.81 then 0.50 GiB under
jemalloc, whose decay fedpipe turns off), hence that free memory is returned to the OS before the
baseline is read (`allocator.release_free_pages`); and a 16-bit model's weights are a
memory-mapped file paged in on first use (round 1 read them twice), hence file-backed pages are
left out.
"""

from __future__ import annotations

import os
import threading
import time
from types import TracebackType

import torch

from fedpipe.allocator import release_free_pages

GIB = float(2**30)


def rss_bytes() -> int:
    """Resident set size of this process (Linux /proc; 0 where unavailable)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return 0


def anonymous_bytes() -> int:
    """Anonymous resident memory of this process (statm's resident less its file-backed and shared
    pages): what allocations hold (Linux /proc; 0 where unavailable)."""
    try:
        with open("/proc/self/statm") as f:
            _, resident, shared = (int(v) for v in f.read().split()[:3])
        return (resident - shared) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return 0


class PeakMemory:
    """Context manager: `.peak_gib` is the extra memory the block needed at its peak."""

    def __init__(self, device: str = "cpu", interval_s: float = 0.005) -> None:
        self.device, self.interval_s = device, interval_s
        self.peak_gib = 0.0
        self._stop = threading.Event()
        self._peak = 0

    def _sample(self) -> None:
        while not self._stop.is_set():
            self._peak = max(self._peak, anonymous_bytes())
            time.sleep(self.interval_s)

    def __enter__(self) -> PeakMemory:
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self._start = torch.cuda.memory_allocated()
        else:
            release_free_pages()
            self._start = self._peak = anonymous_bytes()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
            self._peak = torch.cuda.max_memory_allocated()
        else:
            self._stop.set()
            self._thread.join()
            self._peak = max(self._peak, anonymous_bytes())
        self.peak_gib = max(0, self._peak - self._start) / GIB


def resident_gib(model: torch.nn.Module) -> float:
    """Bytes held by a model's parameters and buffers (incl. bitsandbytes quantization state)."""
    total = sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))
    for module in model.modules():
        state = getattr(getattr(module, "weight", None), "quant_state", None)
        if state is not None and getattr(state, "absmax", None) is not None:
            total += state.absmax.numel() * state.absmax.element_size()
            nested = getattr(state, "state2", None)
            if nested is not None:
                total += nested.absmax.numel() * nested.absmax.element_size()
    return total / GIB
