"""FlexLoRA: the global update is the exact weighted sum of products dW = sum p_k s_k B_k A_k,
kept in SVD form; each server restarts from its best rank-r_k approximation (truncated SVD,
error sqrt(sum_{i>r_k} sigma_i^2)).

The SVD is taken on the stacked factors (QR of each side, SVD of an R x R core, R = sum r_k), so a
round costs O((m + n) R^2) per matrix instead of a dense m x n SVD. The global keeps every non-zero
component (rank up to R), or, with a `Truncation`, those carrying its share of the energy.
"""

from __future__ import annotations

from collections.abc import Sequence

from fedpipe.lora import ClientUpdate, GlobalAdapter, LoraFactors

from .base import Aggregator, Broadcast, carry_over, next_round, restart_from_global
from .linalg import factored_svd, map_modules, module_names, participants, stack_factors
from .truncate import Cut, truncate_svd


class FlexLoRA(Aggregator):
    name = "flexlora"
    workers: int | None = None  # threads for the per-module SVDs (None: this process's cores)

    def aggregate(self, updates: Sequence[ClientUpdate],
                  previous: GlobalAdapter | None) -> GlobalAdapter:
        """Global factors B = U sqrt(S), A = sqrt(S) Vh over the non-zero singular values
        (descending; at least one, or those the truncation keeps), so truncating to the first r
        columns/rows is the best rank-r start."""
        def one(name: str) -> tuple[LoraFactors, Cut]:
            stacked = stack_factors(participants(updates, name), balanced=True)
            return truncate_svd(*factored_svd(stacked.B, stacked.A), self.truncation)

        names = module_names(updates)
        on_cpu = all(f.A.device.type == "cpu" for u in updates for f in u.factors.values())
        done = map_modules(one, names, self.workers, on_cpu)
        self.cuts = {name: cut for name, (_, cut) in done.items()} if self.truncation else {}
        factors = {name: f for name, (f, _) in done.items()}
        return GlobalAdapter(carry_over(factors, previous), round=next_round(previous))

    def broadcast(self, new: GlobalAdapter, previous: GlobalAdapter | None,
                  ranks: dict[str, int], scales: dict[str, float]) -> Broadcast:
        return restart_from_global(new, ranks, scales)
