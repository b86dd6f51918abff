"""How the round loop reaches the edge servers: send each its broadcast, collect what comes back.

A transport carries `fedpipe.protocol` payloads and nothing else: it neither aggregates nor
evaluates nor decides who trains. One file per transport (`inprocess`; Flower's in
`fedpipe.flower_app`).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass

from fedpipe.plan import ServerPlan


@dataclass(frozen=True)
class Delivery:
    """One member's broadcast for this round."""

    member: str
    entry: ServerPlan
    payload: bytes


@dataclass(frozen=True)
class Reply:
    """One member's update payload and what its training measured."""

    member: str
    payload: bytes
    train_loss: float
    steps: int
    train_s: float
    tokens: int
    memory_gib: float


def late_reason(delivery: Delivery, what: str) -> str:
    """Why a member missed the round's deadline, beside the round time its plan predicted."""
    return f"{what}; the plan predicted {delivery.entry.predicted.round_s:.3g}s"


class Transport(ABC):
    """Carries one round's broadcasts out and the updates back."""

    def unreachable(self, members: list[str]) -> dict[str, str]:
        """Members that cannot be sent anything now, and why (before a round is sent)."""
        return {}

    @abstractmethod
    def exchange(self, round_index: int, deliveries: list[Delivery], local_steps: int,
                 on_sent: Callable[[str], None]) -> tuple[dict[str, Reply], dict[str, str]]:
        """Send every delivery, train `local_steps` there, and return (replies by member, members
        that did not reply and why). `on_sent(member)` is called as each member's work starts."""

    def close(self) -> None:  # noqa: B027 - most transports hold nothing to release
        """Release what the transport holds (models, connections)."""
