"""FLoRA: stack the servers' factors, A = [p_1 A_1; ...; p_K A_K], B = [s_1 B_1 ... s_K B_K], so
B @ A = sum p_k s_k B_k A_k exactly for any mix of ranks. Every server merges this round's stacked
update into its base weights and starts a fresh adapter.

The global adapter is the cumulative merged update (the server's full-precision master copy), so
base + B @ A is the global model exactly; a server with a quantized base can rebuild it as
quantize(W_0 + B @ A) rather than adding rounding errors round after round. Lay-out of a module's
cumulative factors: [previous (capped) | this round's stack]. The cap: once the previous part has
more components than min(m, n) it is rewritten, without loss, as the dense product times an
identity (exactly rank min(m, n)), so the cumulative never grows past min(m, n) + this round's
rank, and `broadcast` can slice this round's update back out knowing only the previous adapter.
With a `Truncation` (FLoRIST), this round's stack is replaced by its leading singular components
before it is broadcast and appended, so every server merges, and the master copy records, the same
truncated update.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from fedpipe.errors import FedpipeError
from fedpipe.lora import ClientUpdate, GlobalAdapter, LoraFactors

from .base import Aggregator, Broadcast, next_round
from .linalg import factored_svd, module_names, participants, stack_factors
from .truncate import truncate_svd


def capped_rank(f: LoraFactors) -> int:
    """Rank of `f` after `cap`: never more than min(d_out, d_in)."""
    return min(f.rank, f.B.shape[0], f.A.shape[1])


def cap(f: LoraFactors) -> LoraFactors:
    """The same update (folded) with at most min(m, n) components: B @ A times an identity."""
    f = f.folded()
    m, n = f.B.shape[0], f.A.shape[1]
    if f.rank <= min(m, n):
        return f
    dense = (f.B.double() @ f.A.double()).float()
    if m <= n:
        return LoraFactors(A=dense, B=torch.eye(m, dtype=dense.dtype, device=dense.device))
    return LoraFactors(A=torch.eye(n, dtype=dense.dtype, device=dense.device), B=dense)


class FLoRA(Aggregator):
    name = "flora"

    def aggregate(self, updates: Sequence[ClientUpdate],
                  previous: GlobalAdapter | None) -> GlobalAdapter:
        rounds = {name: stack_factors(participants(updates, name))
                  for name in module_names(updates)}
        self.cuts = {}
        if self.truncation is not None:
            for name, stack in rounds.items():
                rounds[name], self.cuts[name] = truncate_svd(
                    *factored_svd(stack.B, stack.A), self.truncation)
        before = previous.factors if previous is not None else {}
        factors = {}
        for name in [*rounds, *(n for n in before if n not in rounds)]:
            pieces = [cap(before[name])] if name in before else []
            if name in rounds:
                pieces.append(rounds[name])
            shapes = {(p.B.shape[0], p.A.shape[1]) for p in pieces}
            if len(shapes) > 1:
                raise FedpipeError(f"module {name!r}: this round's matrix shape differs from the "
                                   f"previous global adapter's ({sorted(shapes)})")
            factors[name] = LoraFactors(A=torch.cat([p.A.float() for p in pieces], dim=0),
                                        B=torch.cat([p.B.float() for p in pieces], dim=1))
        return GlobalAdapter(factors, round=next_round(previous))

    def broadcast(self, new: GlobalAdapter, previous: GlobalAdapter | None,
                  ranks: dict[str, int], scales: dict[str, float]) -> Broadcast:
        """This round's stacked update for every module updated (the base model is shared, so
        also for modules this server does not adapt) and no adapter start: a fresh adapter."""
        before = previous.factors if previous is not None else {}
        delta = {}
        for name, f in new.factors.items():
            q = capped_rank(before[name]) if name in before else 0
            if f.rank < q:
                raise FedpipeError(f"module {name!r}: the new global adapter (rank {f.rank}) was "
                                   f"not aggregated from this previous one (rank {q})")
            if f.rank > q:
                delta[name] = LoraFactors(A=f.A[q:], B=f.B[:, q:], scale=1.0)
        return Broadcast(base_delta=delta, adapter_init={})
