"""The coordinator: what each edge server receives, and combining what comes back.

It holds the only state of a federation: the global adapter (full precision, scales folded) and
the one before it (flora broadcasts the difference). The round loop (`fedpipe.federation.loop`)
drives it the same way for every transport: `broadcast` per server, then `aggregate` over the
updates that arrived.

Under a rule that merges into the base (flora), a server that sat out rounds must catch up: it gets
the merges of every round since its last, or the cumulative one (`base: full`), whichever is fewer
bytes. The per-round merges are kept only while their sum is smaller than the cumulative one (older
ones could never be the smaller choice), so that memory stays within about the global adapter's
size; after a resume (they are not checkpointed) every server gets the cumulative one.

For sparse communication (see `fedpipe.client`) it also remembers, per plan entry, the last
broadcast as that entry decoded it: the reference of the next sparse broadcast and the start a
sparse upload is added to. Under rules whose servers share round 1's fresh A (`seed` given, the
rule keeps factor coordinates) round 1's header-only broadcast is remembered as that fresh start,
so round 2's broadcast is a delta too. That memory is not checkpointed: after a resume one dense
broadcast re-establishes it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from fedpipe.aggregators import get_aggregator
from fedpipe.aggregators.truncate import Truncation
from fedpipe.errors import FedpipeError
from fedpipe.federation.screen import Expected, Refused, check_content, check_global, check_sender
from fedpipe.lora import ClientUpdate, GlobalAdapter, LoraFactors
from fedpipe.plan import ServerPlan, check_densities
from fedpipe.protocol import (
    broadcast_payload,
    factor_shapes,
    fresh_seed_of,
    is_relative,
    peek_metadata,
    read_broadcast,
    read_update,
    start_reference,
)
from fedpipe.rules import rule_traits


def align_components(new: dict[str, LoraFactors],
                     held: dict[str, LoraFactors]) -> dict[str, LoraFactors]:
    """The same updates B @ A written as close as they can be to what the server holds:
    (R A, B R^T) with the orthogonal R that best maps [A | B^T] onto the held [A | B^T]
    (Procrustes, an r x r SVD). An SVD's components come with arbitrary signs, order and, for
    close singular values, rotation; aligned, a top-k of the difference spends its entries on the
    change of the update rather than on relabelling it."""
    out = {}
    for name, f in new.items():
        h = held.get(name)
        if h is None or h.A.shape != f.A.shape or h.B.shape != f.B.shape:
            out[name] = f
            continue
        A, B = f.A.double(), f.B.double()
        target = torch.cat([h.A.double(), h.B.double().T], dim=1)
        U, _, Vh = torch.linalg.svd(target @ torch.cat([A, B.T], dim=1).T)
        R = U @ Vh
        out[name] = LoraFactors((R @ A).float(), (B @ R.T).float(), f.scale)
    return out


@dataclass
class _Sent:
    """The last broadcast to one plan entry: its round, its bytes, its init as the entry holds it."""

    round: int
    payload: bytes
    init: dict[str, LoraFactors]


class Coordinator:
    """Runs one aggregation rule over rounds."""

    def __init__(self, rule: str, global_adapter: GlobalAdapter | None = None,
                 previous: GlobalAdapter | None = None, truncation: Truncation | None = None,
                 seed: int | None = None) -> None:
        """`seed`: the run's seed, from which servers draw their fresh A (`protocol.fresh_seed_of`)."""
        self.aggregator = get_aggregator(rule, truncation)
        self.shared_seed = seed if rule_traits(rule).keeps_factor_coordinates else None
        self.global_adapter, self.previous = global_adapter, previous
        self.sent: dict[str, _Sent] = {}
        # round first broadcast -> that round's merge (rules that merge into the base); see above
        self.merges: dict[int, dict[str, LoraFactors]] = {1: {}} if global_adapter is None else {}
        self.catch_ups: dict[tuple[str, int | None], bytes] = {}  # this round's, by (entry, since)

    @property
    def round(self) -> int:
        """Rounds aggregated so far."""
        return self.global_adapter.round if self.global_adapter is not None else 0

    def broadcast(self, entry: ServerPlan, *, since: int | None = None) -> bytes:
        """The payload a server of this plan entry starts the next round from; below
        download_density 1 a top-k delta against the last one. Under a rule that merges into the
        base, `since` is the last round whose broadcast the server's base holds (None: unknown);
        one that is behind gets what it missed (see the module's docstring)."""
        payload = self._broadcast(entry)
        next_round = self.round + 1
        if (since == next_round - 1 or not self.aggregator.merges_into_base
                or self.global_adapter is None):
            return payload
        key = (entry.name, since)
        if key not in self.catch_ups:
            init = read_broadcast(payload).init
            options = [broadcast_payload({next_round: self.global_adapter.factors}, init, next_round,
                                         base="full")]
            missed = range(since + 1, next_round + 1) if since is not None else range(0)
            if missed and all(r in self.merges for r in missed):
                options.append(broadcast_payload({r: self.merges[r] for r in missed}, init, next_round,
                                                 base="delta", since=since))
            self.catch_ups[key] = min(options, key=len)
        return self.catch_ups[key]

    def _broadcast(self, entry: ServerPlan) -> bytes:
        next_round = self.round + 1
        last = self.sent.get(entry.name)
        if last is not None and last.round == next_round:
            return last.payload
        check_densities([entry], self.aggregator.name)
        if self.global_adapter is None:
            base_delta, init = {}, {}
        else:
            b = self.aggregator.broadcast(self.global_adapter, self.previous, entry.rank_pattern,
                                          entry.scales())
            base_delta, init = b.base_delta, b.adapter_init
        reference = None
        lossy = entry.download_density < 1.0 or entry.download_precision != "fp32"
        held = last.init if last is not None else {}
        if lossy and init and not held and self.shared_seed is not None and last is not None:
            fresh_seed = fresh_seed_of(self.shared_seed, last.round, None)
            held = start_reference({}, fresh_seed, factor_shapes(init))
        if (lossy and init and not base_delta and last is not None
                and last.round == next_round - 1 and _same_shapes(init, held)):
            reference = held
            if rule_traits(self.aggregator.name).aligned_broadcasts:
                init = align_components(init, reference)
        payload = broadcast_payload({next_round: base_delta} if base_delta else {}, init, next_round,
                                    base="delta" if self.aggregator.merges_into_base else "none",
                                    density=1.0 if reference is None else entry.download_density,
                                    precision=entry.download_precision,
                                    reference=reference,
                                    reference_round=None if reference is None else last.round)
        held = read_broadcast(payload, reference=reference).init  # exactly what the server decodes
        self.sent[entry.name] = _Sent(next_round, payload, held)
        return payload

    def receive(self, payload: bytes, expected: Expected) -> ClientUpdate:
        """One member's update, decoded and checked against what the plan says it must be
        (`federation.screen`); `Refused` names the member and the reason otherwise."""
        try:
            meta = peek_metadata(payload)
            check_sender(meta, expected)
            update = read_update(payload, self.upload_reference(meta, expected))
        except Refused:
            raise
        except FedpipeError as e:
            raise Refused(expected.member, str(e)) from None
        check_content(update, expected)
        return update

    def aggregate(self, updates: Sequence[ClientUpdate]) -> GlobalAdapter:
        """Combine the checked updates (weights renormalised over them). The coordinator moves on
        only when the new global adapter is finite: otherwise the round fails and nothing changes."""
        try:
            new = self.aggregator.aggregate(updates, self.global_adapter)
        except torch.linalg.LinAlgError as e:
            raise FedpipeError(f"round {self.round + 1}: {self.aggregator.name} could not aggregate the "
                               f"updates ({e}); the previous checkpoint stands") from None
        check_global(new.factors, new.round)
        if self.aggregator.merges_into_base:
            merge = self.aggregator.broadcast(new, self.global_adapter, {}, {}).base_delta
            self.merges[new.round + 1] = merge
            self.merges = worth_keeping(self.merges, new)
        self.previous, self.global_adapter = self.global_adapter, new
        self.catch_ups.clear()
        return new

    def upload_reference(self, meta: dict[str, str], expected: Expected) -> dict[str, LoraFactors] | None:
        """The start a sparse update is relative to: this round's broadcast to the sender's entry
        as it decoded it, and fresh modules rebuilt from the sender's seed in the plan's shapes
        (None: dense)."""
        if not is_relative(meta):
            return None
        last = self.sent.get(expected.entry)
        if last is None or last.round != expected.round or "fresh_seed" not in meta:
            raise FedpipeError(
                f"server {expected.member}: its round {expected.round} update is a delta against a start "
                f"this coordinator cannot rebuild (entry {expected.entry!r}: last broadcast "
                f"{'none' if last is None else f'round {last.round}'})")
        shapes = {name: ((r, expected.shapes[name][1]), (expected.shapes[name][0], r))
                  for name, r in expected.ranks.items()}
        return start_reference(last.init, int(meta["fresh_seed"]), shapes)


def worth_keeping(merges: dict[int, dict[str, LoraFactors]],
                  global_adapter: GlobalAdapter) -> dict[int, dict[str, LoraFactors]]:
    """The newest merges whose sum of sizes stays within the cumulative update's: a server behind
    by more gets the cumulative one anyway."""
    budget, kept = _numel(global_adapter.factors), {}
    for r in sorted(merges, reverse=True):
        budget -= _numel(merges[r])
        if budget < 0:
            break
        kept[r] = merges[r]
    return dict(sorted(kept.items()))


def _numel(factors: dict[str, LoraFactors]) -> int:
    return sum(f.A.numel() + f.B.numel() for f in factors.values())


def _same_shapes(a: dict[str, LoraFactors], b: dict[str, LoraFactors]) -> bool:
    return all(n in b and a[n].A.shape == b[n].A.shape and a[n].B.shape == b[n].B.shape for n in a)
