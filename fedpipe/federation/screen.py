"""The trust boundary: what an update must be before any aggregation rule sees it (design §11).

The coordinator believes the plan, never a payload. An update is refused unless

1. it comes from a member the plan assigned to this round, for this round, naming that member and
   its plan entry (a member replies once: the transport keys replies by the member it asked);
2. it claims exactly the member's sample count in the plan (the weights come from the plan);
3. it adapts exactly the plan's modules at the plan's ranks, with the base model's matrix shapes;
4. every value is finite;
5. its product update ‖s·B·A‖_F is within `norm_bound` times the round's low median (the median
   of the accepted norms, the lower middle one for an even count, so one outlier among two
   servers cannot drag the reference up to itself). A majority of colluding servers is beyond
   any median; this bounds what one broken or lying server does.

A refused update is a missed reply: the round renormalises over the rest. Clipping (`clip_norm`)
is the robust-aggregation option on top: each accepted product update is scaled down to at most
that norm (B scaled, so every rule sees the same direction), and changes nothing below it.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass

import torch

from fedpipe.errors import FedpipeError
from fedpipe.lora import ClientUpdate, LoraFactors


class Refused(FedpipeError):
    """An update that does not pass the boundary; `reason` says why, naming the server."""

    def __init__(self, member: str, reason: str) -> None:
        super().__init__(f"server {member}: update refused: {reason}")
        self.member, self.reason = member, reason


@dataclass(frozen=True)
class Expected:
    """What the plan says one member's update of one round must be."""

    member: str
    entry: str
    round: int
    n_samples: int
    ranks: dict[str, int]
    shapes: dict[str, tuple[int, int]]  # module -> (d_out, d_in) of the base weight


def check_sender(meta: dict[str, str], expected: Expected) -> None:
    """Checks 1-2, on the metadata alone (before the payload is decoded against a reference)."""
    claims = {"server": expected.member, "entry": expected.entry, "round": str(expected.round),
              "n_samples": str(expected.n_samples)}
    for key, want in claims.items():
        got = meta.get(key)
        if got != want:
            raise Refused(expected.member, f"it claims {key} {got!r}, the plan says {want!r}")


def check_content(update: ClientUpdate, expected: Expected) -> None:
    """Checks 3-4: the plan's modules at the plan's ranks and shapes, finite values."""
    got, want = set(update.factors), set(expected.ranks)
    if got != want:
        extra, missing = sorted(got - want), sorted(want - got)
        raise Refused(expected.member, f"its modules differ from the plan's ({len(extra)} extra, e.g. "
                      f"{extra[:2]}; {len(missing)} missing, e.g. {missing[:2]})")
    for name, f in update.factors.items():
        r, (d_out, d_in) = expected.ranks[name], expected.shapes[name]
        if tuple(f.A.shape) != (r, d_in) or tuple(f.B.shape) != (d_out, r):
            raise Refused(expected.member, f"module {name}: A {tuple(f.A.shape)}, B {tuple(f.B.shape)}; "
                          f"the plan gives rank {r}, so A ({r}, {d_in}) and B ({d_out}, {r})")
        if not (torch.isfinite(f.A).all() and torch.isfinite(f.B).all()) or not math.isfinite(f.scale):
            raise Refused(expected.member, f"module {name} holds non-finite values")


def product_norm(factors: dict[str, LoraFactors]) -> float:
    """‖s·B·A‖_F over all modules, from r×r Gram matrices (never the dense m×n product)."""
    total = 0.0
    for f in factors.values():
        A, B = f.A.double(), f.B.double()
        total += f.scale ** 2 * float(((B.T @ B) * (A @ A.T)).sum().clamp(min=0.0))
    return math.sqrt(total)


def norm_outliers(norms: dict[str, float], bound: float | None) -> dict[str, str]:
    """Check 5: members whose norm exceeds `bound` times the low median of all (None: off)."""
    if bound is None or len(norms) < 2:
        return {}
    reference = statistics.median_low(norms.values())
    return {m: f"update norm {n:.3g} is over {bound:g}x the round's median {reference:.3g}"
            for m, n in norms.items() if n > bound * reference}


def clipped(update: ClientUpdate, max_norm: float) -> ClientUpdate:
    """The update with its product scaled down to norm `max_norm` (unchanged when within it)."""
    norm = product_norm(update.factors)
    if norm <= max_norm:
        return update
    factor = max_norm / norm
    factors = {n: LoraFactors(f.A, f.B * factor, f.scale) for n, f in update.factors.items()}
    return ClientUpdate(update.server, update.n_samples, factors, update.metrics)


def check_global(factors: dict[str, LoraFactors], round_index: int) -> None:
    """The new global adapter must be finite before it is saved or broadcast."""
    bad = [n for n, f in factors.items() if not (torch.isfinite(f.A).all() and torch.isfinite(f.B).all())]
    if bad:
        raise FedpipeError(f"round {round_index}: the aggregated global adapter is not finite in "
                           f"{len(bad)} module(s) (e.g. {bad[0]}); nothing was saved, the previous "
                           "checkpoint stands")
