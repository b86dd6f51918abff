"""The tensors that travel: LoRA factors per module, one server's update, the global adapter.

Every dict is keyed by the full module name relative to the base model
(e.g. ``model.layers.3.self_attn.q_proj``), the same key the plan and peft's ``rank_pattern`` use.
A module's low-rank update is ``delta_W = scale * B @ A`` with ``A: (r, d_in)`` and ``B: (d_out, r)``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class LoraFactors:
    """One module's LoRA factors; `scale` is peft's alpha / r (1.0 once folded)."""

    A: torch.Tensor
    B: torch.Tensor
    scale: float = 1.0

    @property
    def rank(self) -> int:
        return self.A.shape[0]

    def delta(self) -> torch.Tensor:
        """The dense update scale * B @ A (for tests and small matrices only)."""
        return self.scale * (self.B.double() @ self.A.double())

    def folded(self) -> LoraFactors:
        """The same update with the scale folded into B, in float32."""
        return LoraFactors(self.A.float(), self.B.float() * self.scale, 1.0)


@dataclass
class ClientUpdate:
    """What one server sends after local training: its factors and how many samples it used."""

    server: str
    n_samples: int
    factors: dict[str, LoraFactors]
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass
class GlobalAdapter:
    """The server's full-precision master copy of the global update, scale folded (scale 1).

    The global model is ``base + sum over modules of B @ A``. For rules that merge into the base
    (flora) this is the cumulative merged update; for the others it is the current global adapter.
    """

    factors: dict[str, LoraFactors]
    round: int = 0

    def rank_pattern(self) -> dict[str, int]:
        return {name: f.rank for name, f in self.factors.items()}
