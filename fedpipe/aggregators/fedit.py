"""FedIT: average the A factors and the (scale-folded) B factors separately.

Cheap and simple, but averaging factors is not averaging products:
B_bar A_bar - sum p_k B_k A_k = -sum p_k (B_k - B_bar)(A_k - A_bar). Different ranks are
zero-padded to the largest one.
"""

from __future__ import annotations

from collections.abc import Sequence

from fedpipe.lora import ClientUpdate, GlobalAdapter

from .base import Aggregator, Broadcast, carry_over, next_round, restart_from_global
from .linalg import average_factors, module_names, participants


class FedIT(Aggregator):
    name = "fedit"

    def aggregate(self, updates: Sequence[ClientUpdate],
                  previous: GlobalAdapter | None) -> GlobalAdapter:
        factors = {name: average_factors(participants(updates, name))
                   for name in module_names(updates)}
        return GlobalAdapter(carry_over(factors, previous), round=next_round(previous))

    def broadcast(self, new: GlobalAdapter, previous: GlobalAdapter | None,
                  ranks: dict[str, int], scales: dict[str, float]) -> Broadcast:
        return restart_from_global(new, ranks, scales)
