"""The interface every aggregation rule implements, and what a server receives after a round."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import ClassVar

from fedpipe.errors import FedpipeError
from fedpipe.lora import ClientUpdate, GlobalAdapter, LoraFactors
from fedpipe.rules import rule_traits

from .linalg import module_seed, start_factors
from .truncate import Cut, Truncation


@dataclass
class Broadcast:
    """What one server receives for the next round."""

    # Update to merge into that server's base weights, scale folded (flora: this round's stacked
    # update, for every module updated, adapted by this server or not; others: {}).
    base_delta: dict[str, LoraFactors] = field(default_factory=dict)
    # Starting factors for its adapter, carrying that server's own scales, so scale * B @ A is the
    # intended start. A module missing here starts fresh (peft default init, B = 0).
    adapter_init: dict[str, LoraFactors] = field(default_factory=dict)


class Aggregator(ABC):
    """One aggregation rule: combine the servers' updates, then tell each server how to restart."""

    name: ClassVar[str]
    merges_into_base: ClassVar[bool]  # from fedpipe.rules, the one table of the rules' traits

    def __init_subclass__(cls, **kwargs: object) -> None:
        super().__init_subclass__(**kwargs)
        cls.merges_into_base = rule_traits(cls.name).merges_into_base

    def __init__(self, truncation: Truncation | None = None) -> None:
        """`truncation`: keep only the leading components of the global update, for rules whose
        global rank grows with the servers' (``fedpipe.rules``: grows_global_rank)."""
        if truncation is not None and not rule_traits(self.name).grows_global_rank:
            raise FedpipeError(f"truncation: {self.name} keeps the global rank at the largest server "
                               "rank already; valid with flexlora and flora")
        self.truncation = truncation
        # What the last `aggregate` cut, per module (empty without truncation): `cut_metrics`.
        self.cuts: dict[str, Cut] = {}

    @abstractmethod
    def aggregate(self, updates: Sequence[ClientUpdate],
                  previous: GlobalAdapter | None) -> GlobalAdapter:
        """The new global adapter (scales folded, float32) after this round's updates."""

    @abstractmethod
    def broadcast(self, new: GlobalAdapter, previous: GlobalAdapter | None,
                  ranks: dict[str, int], scales: dict[str, float]) -> Broadcast:
        """What one server with these per-module ranks and scales (alpha / r) receives."""


def next_round(previous: GlobalAdapter | None) -> int:
    """Round index of a new global adapter: the previous one's plus one (the first is 1)."""
    return 1 if previous is None else previous.round + 1


def carry_over(new: dict[str, LoraFactors],
               previous: GlobalAdapter | None) -> dict[str, LoraFactors]:
    """Keep the previous global factors of modules nobody adapted this round."""
    if previous is not None:
        for name, f in previous.factors.items():
            new.setdefault(name, f)
    return new


def restart_from_global(new: GlobalAdapter, ranks: dict[str, int],
                        scales: dict[str, float]) -> Broadcast:
    """Each adapted module starts from the global factors truncated or padded to the server's
    rank, with its scale undone; modules absent from the global adapter start fresh."""
    init = {}
    for name, rank in ranks.items():
        if rank <= 0 or name not in new.factors:
            continue
        if name not in scales:
            raise FedpipeError(f"module {name!r}: the server adapts it at rank {rank} "
                               "but no scale (alpha / r) was given for it")
        init[name] = start_factors(new.factors[name], rank, scales[name],
                                   seed=module_seed(name, new.round))
    return Broadcast(base_delta={}, adapter_init=init)
