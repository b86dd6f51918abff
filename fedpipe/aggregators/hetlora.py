"""HetLoRA: zero-pad every server's factors to the largest rank and average them with weights
proportional to n_k * ||s_k B_k A_k||_F, so servers whose update carries more weight count more;
each server restarts from the global factors truncated to its own rank."""

from __future__ import annotations

from collections.abc import Sequence

from fedpipe.lora import ClientUpdate, GlobalAdapter, LoraFactors

from .base import Aggregator, Broadcast, carry_over, next_round, restart_from_global
from .linalg import average_factors, frobenius_norm, module_names, participants


def norm_weights(parts: Sequence[tuple[LoraFactors, float]]) -> list[float]:
    """p_k * ||s_k B_k A_k||_F renormalised (p_k alone when every update is zero)."""
    raw = [p * f.scale * frobenius_norm(f.B, f.A) for f, p in parts]
    total = sum(raw)
    return [w / total for w in raw] if total > 0 else [p for _, p in parts]


class HetLoRA(Aggregator):
    name = "hetlora"

    def aggregate(self, updates: Sequence[ClientUpdate],
                  previous: GlobalAdapter | None) -> GlobalAdapter:
        factors = {}
        for name in module_names(updates):
            parts = participants(updates, name)
            factors[name] = average_factors(
                [(f, w) for (f, _), w in zip(parts, norm_weights(parts), strict=True)])
        return GlobalAdapter(carry_over(factors, previous), round=next_round(previous))

    def broadcast(self, new: GlobalAdapter, previous: GlobalAdapter | None,
                  ranks: dict[str, int], scales: dict[str, float]) -> Broadcast:
        return restart_from_global(new, ranks, scales)
