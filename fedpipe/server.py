"""The aggregation server: what each edge server receives, and combining what comes back.

It holds the only state of a federation: the global adapter (full precision, scales folded) and
the one before it (flora broadcasts the difference). Both backends drive it the same way:
`broadcast` per server, then `aggregate` over the payloads that arrived.
"""

from __future__ import annotations

from collections.abc import Sequence

from fedpipe import wire
from fedpipe.aggregators import get_aggregator
from fedpipe.client import broadcast_payload
from fedpipe.lora import ClientUpdate, GlobalAdapter
from fedpipe.plan import ServerPlan


def decode_update(payload: bytes) -> ClientUpdate:
    factors, meta = wire.decode(payload)
    return ClientUpdate(server=meta["server"], n_samples=int(meta["n_samples"]), factors=factors,
                        metrics={"train_loss": float(meta.get("train_loss", "nan"))})


class Coordinator:
    """Runs one aggregation rule over rounds."""

    def __init__(self, rule: str, global_adapter: GlobalAdapter | None = None,
                 previous: GlobalAdapter | None = None) -> None:
        self.aggregator = get_aggregator(rule)
        self.global_adapter, self.previous = global_adapter, previous

    @property
    def round(self) -> int:
        """Rounds aggregated so far."""
        return self.global_adapter.round if self.global_adapter is not None else 0

    def broadcast(self, entry: ServerPlan) -> bytes:
        """The payload a server of this plan entry starts the next round from."""
        next_round = self.round + 1
        if self.global_adapter is None:
            return broadcast_payload({}, {}, next_round)
        scales = {name: entry.lora_alpha_ratio for name in entry.rank_pattern}
        b = self.aggregator.broadcast(self.global_adapter, self.previous, entry.rank_pattern, scales)
        return broadcast_payload(b.base_delta, b.adapter_init, next_round)

    def aggregate(self, payloads: Sequence[bytes]) -> GlobalAdapter:
        """Combine the updates that arrived (weights renormalised over them)."""
        updates = [decode_update(p) for p in payloads]
        new = self.aggregator.aggregate(updates, self.global_adapter)
        self.previous, self.global_adapter = self.global_adapter, new
        return new
