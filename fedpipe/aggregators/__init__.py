"""Aggregation rules by name: fedit, hetlora, flora, flexlora (design §7)."""

from __future__ import annotations

from fedpipe.errors import FedpipeError

from .base import Aggregator, Broadcast
from .fedit import FedIT
from .flexlora import FlexLoRA
from .flora import FLoRA
from .hetlora import HetLoRA
from .truncate import Cut, Truncation, cut_metrics, truncate

REGISTRY: dict[str, type[Aggregator]] = {
    cls.name: cls for cls in (FedIT, HetLoRA, FLoRA, FlexLoRA)
}


def aggregator_names() -> list[str]:
    """The valid rule names, sorted."""
    return sorted(REGISTRY)


def get_aggregator(name: str, truncation: Truncation | None = None) -> Aggregator:
    """A fresh instance of the rule called `name` (case-insensitive), truncating the global rank
    when given a `Truncation` (flexlora, flora; others refuse it)."""
    cls = REGISTRY.get(name.strip().lower())
    if cls is None:
        raise FedpipeError(f"unknown aggregation rule {name!r}",
                           [f"aggregation: valid rules are {', '.join(aggregator_names())}"])
    return cls(truncation)


__all__ = ["REGISTRY", "Aggregator", "Broadcast", "Cut", "FedIT", "FLoRA", "FlexLoRA", "HetLoRA",
           "Truncation", "aggregator_names", "cut_metrics", "get_aggregator", "truncate"]
