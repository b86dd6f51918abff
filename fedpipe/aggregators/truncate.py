"""Thresholded global rank (FLoRIST's tau): keep the leading singular components of an update.

flexlora's global adapter has rank sum r_k (112-160 per matrix after one round of the shipped
cluster plan, against a plan maximum of 32) and flora's stack likewise, so the saved adapter and
every broadcast carry that basis. Keeping the fewest leading components whose sigma^2 add up to a
share `energy` of the total (and at most `max_rank`) bounds it; the price is the truncation error
||dW - dW_k||_F = sqrt(sum_{i>k} sigma_i^2), reported per module (absolute and relative to ||dW||_F).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from fedpipe.errors import FedpipeError
from fedpipe.lora import GlobalAdapter, LoraFactors

from .linalg import factored_svd, numerical_rank, split_sqrt


@dataclass(frozen=True)
class Truncation:
    """Keep the leading components carrying `energy` of sum sigma^2, and at most `max_rank`."""

    energy: float = 1.0
    max_rank: int | None = None

    def __post_init__(self) -> None:
        if not 0.0 < self.energy <= 1.0:
            raise FedpipeError(
                f"truncation: energy {self.energy!r} is out of range; valid is 0 < energy <= 1")
        if self.max_rank is not None and self.max_rank < 1:
            raise FedpipeError(f"truncation: max_rank {self.max_rank!r} is out of range; valid is >= 1")


@dataclass(frozen=True)
class Cut:
    """What truncating one module's update cost."""

    rank_before: int  # numerical rank of the update
    rank: int  # components kept
    error: float  # ||dW - dW_k||_F = sqrt(sum_{i>k} sigma_i^2)
    norm: float  # ||dW||_F = sqrt(sum sigma_i^2)

    @property
    def relative(self) -> float:
        """error / ||dW||_F (0 for a zero update)."""
        return self.error / self.norm if self.norm > 0 else 0.0


def kept_rank(S: torch.Tensor, rule: Truncation | None) -> int:
    """How many leading singular values (descending) `rule` keeps: the fewest whose squares reach
    `energy` of the total, capped by `max_rank` and the numerical rank, at least 1 (peft cannot
    save a rank-0 adapter). No rule: the numerical rank."""
    rank = numerical_rank(S)
    if rule is not None and rank > 0:
        energy = S.double().square().cumsum(0)
        k = int((energy < rule.energy * energy[-1] * (1 - 1e-12)).sum().item()) + 1
        rank = min(rank, k, rule.max_rank or rank)
    return max(1, rank)


def truncate_svd(U: torch.Tensor, S: torch.Tensor, Vh: torch.Tensor, rule: Truncation | None
                 ) -> tuple[LoraFactors, Cut]:
    """Folded factors of the kept components (sqrt(sigma) on each side) and what was cut."""
    k = kept_rank(S, rule)
    sq = S.double().square()
    total, dropped = float(sq.sum()), float(sq[k:].sum())
    cut = Cut(rank_before=numerical_rank(S), rank=k, error=math.sqrt(dropped), norm=math.sqrt(total))
    return split_sqrt(U, S, Vh, k), cut


def truncate(adapter: GlobalAdapter, rule: Truncation) -> tuple[GlobalAdapter, dict[str, Cut]]:
    """Every module of `adapter` re-factored by a factored SVD and truncated by `rule`."""
    factors, cuts = {}, {}
    for name, f in adapter.factors.items():
        folded = f.folded()
        factors[name], cuts[name] = truncate_svd(*factored_svd(folded.B, folded.A), rule)
    return GlobalAdapter(factors, round=adapter.round), cuts


def cut_metrics(cuts: dict[str, Cut]) -> dict[str, float]:
    """Per-round metrics of one aggregation's cuts (empty without truncation).

    truncation_error: sqrt of the sum over modules of error^2 (the whole adapter's Frobenius error);
    truncation_error_rel: that over the whole update's norm; truncation_error_rel_max: the worst
    module's relative error; global_rank_sum / global_rank_max: components kept.
    """
    if not cuts:
        return {}
    err2 = sum(c.error**2 for c in cuts.values())
    norm2 = sum(c.norm**2 for c in cuts.values())
    return {
        "truncation_error": math.sqrt(err2),
        "truncation_error_rel": math.sqrt(err2 / norm2) if norm2 > 0 else 0.0,
        "truncation_error_rel_max": max(c.relative for c in cuts.values()),
        "global_rank_sum": float(sum(c.rank for c in cuts.values())),
        "global_rank_max": float(max(c.rank for c in cuts.values())),
    }
