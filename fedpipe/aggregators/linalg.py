"""Shared math of the aggregation rules: sample weights, rank fitting, factored norms and SVD.

Pure functions over tensors. Every result stays on the device its inputs came on. The work is done
in the inputs' precision (float64 if any input is float64, else float32), small cores in float64.
"""

from __future__ import annotations

import math
import os
import zlib
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import torch

from fedpipe.errors import FedpipeError
from fedpipe.lora import ClientUpdate, LoraFactors

T = TypeVar("T")

# Singular values at or below RANK_RTOL * sigma_max count as zero (float32 round-off level).
RANK_RTOL = 1e-7


def module_names(updates: Sequence[ClientUpdate]) -> list[str]:
    """Every module some server adapted (rank > 0), in first-seen order."""
    names: dict[str, None] = {}
    for u in updates:
        names.update((name, None) for name, f in u.factors.items() if f.rank > 0)
    return list(names)


def participants(updates: Sequence[ClientUpdate], module: str) -> list[tuple[LoraFactors, float]]:
    """The servers that adapted `module`, each with p_k = n_k / sum of n over those servers.

    Checks what the math relies on: 2-D factors of one (d_out, d_in) shape across servers, matching
    ranks in A and B, a positive scale, non-negative sample counts with a positive sum.
    """
    chosen = [(u, u.factors[module]) for u in updates
              if module in u.factors and u.factors[module].rank > 0]
    if not chosen:
        raise FedpipeError(f"no server adapted module {module!r}")
    shape = None
    for u, f in chosen:
        if f.A.dim() != 2 or f.B.dim() != 2 or f.B.shape[1] != f.A.shape[0]:
            raise FedpipeError(
                f"server {u.server!r}, module {module!r}: factors must be A (r, d_in) and "
                f"B (d_out, r) with the same r; got A {tuple(f.A.shape)}, B {tuple(f.B.shape)}")
        if shape is None:
            shape = (f.B.shape[0], f.A.shape[1], u.server)
        elif (f.B.shape[0], f.A.shape[1]) != shape[:2]:
            raise FedpipeError(
                f"server {u.server!r}, module {module!r}: matrix shape "
                f"{(f.B.shape[0], f.A.shape[1])} differs from server {shape[2]!r}'s {shape[:2]}")
        if not (f.scale > 0 and math.isfinite(f.scale)):
            raise FedpipeError(
                f"server {u.server!r}, module {module!r}: scale must be a positive number, "
                f"got {f.scale}")
        if u.n_samples < 0:
            raise FedpipeError(
                f"server {u.server!r}: n_samples must be >= 0, got {u.n_samples}")
    total = sum(u.n_samples for u, _ in chosen)
    if total <= 0:
        raise FedpipeError(
            f"module {module!r}: the servers that adapted it "
            f"({', '.join(u.server for u, _ in chosen)}) report 0 samples in total")
    return [(f, u.n_samples / total) for u, f in chosen]


def compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """float64 if any input is float64, else float32 (bf16/fp16 factors are widened)."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def pad_rank(A: torch.Tensor, B: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Truncate to `rank` components or zero-pad up to it (rows of A, columns of B)."""
    r = A.shape[0]
    if rank <= r:
        return A[:rank], B[:, :rank]
    A = torch.cat([A, A.new_zeros(rank - r, A.shape[1])], dim=0)
    B = torch.cat([B, B.new_zeros(B.shape[0], rank - r)], dim=1)
    return A, B


def average_factors(weighted: Sequence[tuple[LoraFactors, float]]) -> LoraFactors:
    """sum w_k A_k and sum w_k s_k B_k, zero-padded to the largest rank; folded float32."""
    r_max = max(f.rank for f, _ in weighted)
    A_sum = B_sum = None
    for f, w in weighted:
        A, B = pad_rank(f.A.float(), f.B.float() * f.scale, r_max)
        A_sum = w * A if A_sum is None else A_sum + w * A
        B_sum = w * B if B_sum is None else B_sum + w * B
    return LoraFactors(A=A_sum, B=B_sum, scale=1.0)


def stack_factors(parts: Sequence[tuple[LoraFactors, float]], balanced: bool = False
                  ) -> LoraFactors:
    """Stack the servers' factors so that B_all @ A_all = sum p_k s_k B_k A_k exactly.

    A_all = [p_1 A_1; ...; p_K A_K], B_all = [s_1 B_1 ... s_K B_K] (FLoRA's form) or, `balanced`,
    sqrt(p_k) on both sides. Servers with p_k = 0 are left out. Folded, in the compute dtype.
    """
    kept = [(f, p) for f, p in parts if p > 0]
    dtype = compute_dtype(*(t for f, _ in kept for t in (f.A, f.B)))
    A_parts, B_parts = [], []
    for f, p in kept:
        a, b = (math.sqrt(p), math.sqrt(p) * f.scale) if balanced else (p, f.scale)
        A_parts.append(f.A.to(dtype) * a)
        B_parts.append(f.B.to(dtype) * b)
    return LoraFactors(A=torch.cat(A_parts, dim=0), B=torch.cat(B_parts, dim=1), scale=1.0)


def cpu_workers() -> int:
    """The cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def map_modules(fn: Callable[[str], T], names: Sequence[str], workers: int | None = None,
                on_cpu: bool = True) -> dict[str, T]:
    """{name: fn(name)} for every module, the modules spread over `workers` threads on a CPU.

    Why: one factorization's intra-op threads scale badly, while factorizations of separate
    matrices scale across cores. Measured by benchmarks/bench_aggregation.py --round-only on a
    2-core box (the 7B-shaped flexlora round): 34.0 s serial with one thread, 44.4 s serial with
    two, 22.1 s on two single-threaded workers. Each worker runs its ops single-threaded, and torch's
    thread count is restored afterwards. Results do not depend on the number of workers (each
    module is computed alone, in the same order of operations). CUDA work stays serial.
    """
    workers = min(cpu_workers() if workers is None else workers, len(names))
    if not on_cpu or workers <= 1:
        return {name: fn(name) for name in names}
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        with ThreadPoolExecutor(workers, initializer=torch.set_num_threads, initargs=(1,)) as pool:
            return dict(zip(names, pool.map(fn, names), strict=True))
    finally:
        torch.set_num_threads(before)


def frobenius_norm(B: torch.Tensor, A: torch.Tensor) -> float:
    """||B @ A||_F without forming the product: sqrt(sum((B^T B) * (A A^T))), O((m+n) r^2)."""
    B64, A64 = B.double(), A.double()
    sq = ((B64.T @ B64) * (A64 @ A64.T)).sum().item()
    return math.sqrt(max(sq, 0.0))


def factored_svd(B: torch.Tensor, A: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Thin SVD of the m x n product B @ A from its factors B (m x R), A (R x n).

    Returns U (m x k), S (k, descending), Vh (k x n), k = min(R, m, n), with B @ A = U diag(S) Vh.
    With R < min(m, n): QR of B and of A^T, then the SVD of the R x R core R_B R_A^T, so the cost
    is O((m + n) R^2) and the dense product never exists. Otherwise the dense SVD is as cheap.
    """
    dtype = compute_dtype(B, A)
    B, A = B.to(dtype), A.to(dtype)
    m, R = B.shape
    n = A.shape[1]
    if R == 0:
        return B.new_zeros(m, 0), B.new_zeros(0), A.new_zeros(0, n)
    if R >= min(m, n):
        return torch.linalg.svd(B @ A, full_matrices=False)
    Qb, Rb = torch.linalg.qr(B)
    Qa, Ra = torch.linalg.qr(A.T)
    Uc, S, Vch = torch.linalg.svd(Rb.double() @ Ra.double().T)
    return Qb @ Uc.to(dtype), S.to(dtype), Vch.to(dtype) @ Qa.T


def numerical_rank(S: torch.Tensor, rtol: float = RANK_RTOL) -> int:
    """How many singular values (descending) exceed rtol * sigma_max."""
    if S.numel() == 0 or S[0] <= 0:
        return 0
    return int((S > rtol * S[0]).sum().item())


def split_sqrt(U: torch.Tensor, S: torch.Tensor, Vh: torch.Tensor, rank: int) -> LoraFactors:
    """The top `rank` SVD components as folded float32 factors, sqrt(sigma) on each side."""
    root = S[:rank].clamp_min(0).sqrt()
    return LoraFactors(A=(root[:, None] * Vh[:rank]).float(),
                       B=(U[:, :rank] * root[None, :]).float(), scale=1.0)


def start_factors(g: LoraFactors, rank: int, scale: float, seed: int) -> LoraFactors:
    """A server's starting adapter from folded global factors: fit to `rank`, undo its `scale`.

    Truncates or zero-pads. A component whose A row and B column are both zero can never learn
    (each one's gradient is proportional to the other), so such rows of A get peft's default init,
    uniform(+-1/sqrt(d_in)), drawn from `seed`; with B's column at zero the start is unchanged.
    """
    if not (scale > 0 and math.isfinite(scale)):
        raise FedpipeError(f"adapter scale must be a positive number, got {scale}")
    A, B = pad_rank(g.A.float(), g.B.float(), rank)
    A, B = A.clone(), B / scale
    dead = (A == 0).all(dim=1) & (B == 0).all(dim=0)
    if bool(dead.any()):
        gen = torch.Generator().manual_seed(seed)
        bound = 1.0 / math.sqrt(A.shape[1])
        fresh = (torch.rand(int(dead.sum()), A.shape[1], generator=gen) * 2 - 1) * bound
        A[dead] = fresh.to(A.device)
    return LoraFactors(A=A, B=B, scale=scale)


def module_seed(module: str, round_index: int) -> int:
    """A stable seed per module and round (Python's str hash changes between processes)."""
    return zlib.crc32(f"{module}@{round_index}".encode())
