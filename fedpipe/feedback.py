"""Error feedback for uploads: what rounding and top-k dropped this round goes out in a later one.

A sender keeps one `ErrorFeedback`. Each round it encodes ``meant + carried residual`` (meant: the
update since the round's start, in factor coordinates) and keeps ``meant + residual - received``
(exactly what the receiver decodes: wire computes it with the same routines), so over rounds the
sum of what was received equals the sum of what was meant less one bounded residual.

Where the residual lives, and why: in the coordinates of the update itself, per module and
factor. That is only meaningful while the next round's start for the module is in the same
coordinates: true for rules that average factors and restart by truncation (fedit, hetlora:
``fedpipe.rules``: keeps_factor_coordinates), false for flexlora (the global is re-based by an SVD every
round) and flora (a fresh random A every round), where a factor residual a round later would add
noise, not the lost update. So the residual of a module is dropped when its shape changes (the
rank changed) and the caller calls `reset` whenever the basis changes (every round under flexlora
and flora). Downloads need no residual: a lossy broadcast is a delta against what the server
holds, and the coordinator keeps that as the server decoded it, so whatever one round drops is
still in the next round's difference.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from fedpipe import wire
from fedpipe.lora import LoraFactors


class ErrorFeedback:
    """A sender's residuals, keyed ``NAME.A`` / ``NAME.B`` (what the receiver is still owed)."""

    def __init__(self) -> None:
        self.residual: dict[str, torch.Tensor] = {}

    def encode(
        self,
        factors: dict[str, LoraFactors],
        *,
        reference: dict[str, LoraFactors] | None = None,
        density: float = 1.0,
        precision: str = "fp32",
        metadata: dict[str, str] | None = None,
    ) -> bytes:
        """`wire.encode` of `factors` plus the carried residual; the residual is updated."""
        for name, f in factors.items():
            for part in ("A", "B"):
                key = f"{name}.{part}"
                if key in self.residual and self.residual[key].shape != getattr(f, part).shape:
                    del self.residual[key]  # the rank changed: old coordinates mean nothing now
        return wire.encode(factors, reference=reference, density=density, precision=precision,
                           metadata=metadata, residual=self.residual)

    def reset(self, modules: Iterable[str] | None = None) -> None:
        """Forget the residual of `modules` (all when None): their basis changed."""
        if modules is None:
            self.residual.clear()
            return
        for name in modules:
            self.residual.pop(f"{name}.A", None)
            self.residual.pop(f"{name}.B", None)

    def owed(self) -> float:
        """Frobenius norm of everything still owed, over all modules (a per-round metric)."""
        return float(sum(r.double().pow(2).sum() for r in self.residual.values())) ** 0.5
