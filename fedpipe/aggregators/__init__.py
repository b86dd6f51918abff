"""Aggregation rules by name: fedit, hetlora, flora, flexlora (design §7)."""

from __future__ import annotations

from fedpipe.errors import FedpipeError

from .base import Aggregator, Broadcast
from .fedit import FedIT
from .flexlora import FlexLoRA
from .flora import FLoRA
from .hetlora import HetLoRA

REGISTRY: dict[str, type[Aggregator]] = {
    cls.name: cls for cls in (FedIT, HetLoRA, FLoRA, FlexLoRA)
}


def aggregator_names() -> list[str]:
    """The valid rule names, sorted."""
    return sorted(REGISTRY)


def get_aggregator(name: str) -> Aggregator:
    """A fresh instance of the rule called `name` (case-insensitive)."""
    cls = REGISTRY.get(name.strip().lower())
    if cls is None:
        raise FedpipeError(f"unknown aggregation rule {name!r}",
                           [f"aggregation: valid rules are {', '.join(aggregator_names())}"])
    return cls()


__all__ = ["REGISTRY", "Aggregator", "Broadcast", "FedIT", "FLoRA", "FlexLoRA", "HetLoRA",
           "aggregator_names", "get_aggregator"]
