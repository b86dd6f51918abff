"""FlexLoRA: the global update is the exact weighted sum of products dW = sum p_k s_k B_k A_k,
kept in SVD form; each server restarts from its best rank-r_k approximation (truncated SVD,
error sqrt(sum_{i>r_k} sigma_i^2)).

The SVD is taken on the stacked factors (QR of each side, SVD of an R x R core, R = sum r_k), so a
round costs O((m + n) R^2) per matrix instead of a dense m x n SVD.
"""

from __future__ import annotations

from collections.abc import Sequence

from fedpipe.lora import ClientUpdate, GlobalAdapter, LoraFactors

from .base import Aggregator, Broadcast, carry_over, next_round, restart_from_global
from .linalg import (
    factored_svd,
    map_modules,
    module_names,
    numerical_rank,
    participants,
    split_sqrt,
    stack_factors,
)


class FlexLoRA(Aggregator):
    name = "flexlora"
    keeps_factor_coordinates = False
    workers: int | None = None  # threads for the per-module SVDs (None: this process's cores)

    def aggregate(self, updates: Sequence[ClientUpdate],
                  previous: GlobalAdapter | None) -> GlobalAdapter:
        """Global factors B = U sqrt(S), A = sqrt(S) Vh over the non-zero singular values
        (descending), so truncating to the first r columns/rows is the best rank-r start."""
        def one(name: str) -> LoraFactors:
            stacked = stack_factors(participants(updates, name), balanced=True)
            U, S, Vh = factored_svd(stacked.B, stacked.A)
            # Keep one component even for a zero update: a rank-0 adapter cannot be saved by peft.
            return split_sqrt(U, S, Vh, max(1, numerical_rank(S)))

        names = module_names(updates)
        on_cpu = all(f.A.device.type == "cpu" for u in updates for f in u.factors.values())
        factors = map_modules(one, names, self.workers, on_cpu)
        return GlobalAdapter(carry_over(factors, previous), round=next_round(previous))

    def broadcast(self, new: GlobalAdapter, previous: GlobalAdapter | None,
                  ranks: dict[str, int], scales: dict[str, float]) -> Broadcast:
        return restart_from_global(new, ranks, scales)
