"""Importance scorers: one number per weight matrix, computed where the data is.

Two kinds, in one registry keyed by lowercase name (``SCORERS``, ``get_scorer``):

- gradient scorers run on a server (their torch side is ``fedpipe.gradients``, imported only
  when scoring, so planning never loads torch): a few calibration batches through the frozen base model,
  gradients of the answer-token loss with respect to the candidate weights, one statistic per
  matrix. Only those floats leave the server.
- data-free scorers need neither data nor weights, only shapes, so they also work for models
  whose weights are not on this machine (the 70B shape cards).

Formulas (W a matrix, G_t = dL_t/dW on calibration batch t = 1..T, elementwise products):

- ``sensitivity`` (AdaLoRA, Zhang et al. 2023): I_t = |W * G_t|;
  Ibar_t = b1 Ibar_(t-1) + (1 - b1) I_t;  Ubar_t = b2 Ubar_(t-1) + (1 - b2) |I_t - Ibar_t|
  (both start at 0, b1 = b2 = 0.85 as in AdaLoRA); score = sum over elements of Ibar_T * Ubar_T.
- ``fisher``: empirical Fisher information of the matrix, (1/T) sum_t sum_ij G_t,ij^2, with
  mini-batch gradients (per-example gradients would cost one backward pass per example).
- ``prior``: data-free depth ramp, 1 + layer / (layers - 1): later layers matter more
  (AdaLoRA's finding); every matrix type of a layer scores the same.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from fedpipe.errors import FedpipeError
from fedpipe.shapes import ModelShapes

if TYPE_CHECKING:  # the gradient side imports torch: only scoring needs it, not planning
    from fedpipe.gradients import Accumulator


def depth_scores(shapes: ModelShapes) -> dict[str, float]:
    """The data-free prior: 1 + layer / (layers - 1) for every matrix."""
    span = max(1, shapes.layers - 1)
    return {m.name: 1.0 + m.layer / span for m in shapes.matrices}


@dataclass(frozen=True)
class Scorer:
    """A registered scorer. Gradient scorers have `accumulator`; data-free ones `from_shapes`.

    `settings` and `version` enter the report cache key: bump `version` when the formula changes.
    """

    name: str
    summary: str
    version: int = 1
    settings: dict[str, float] = field(default_factory=dict)
    accumulator: Callable[[], Accumulator] | None = None
    from_shapes: Callable[[ModelShapes], dict[str, float]] | None = None

    @property
    def needs_weights(self) -> bool:
        return self.accumulator is not None


_SENSITIVITY_BETAS = {"beta1": 0.85, "beta2": 0.85}

def _sensitivity() -> Accumulator:
    from fedpipe.gradients import SensitivityAccumulator

    return SensitivityAccumulator(**_SENSITIVITY_BETAS)


def _fisher() -> Accumulator:
    from fedpipe.gradients import FisherAccumulator

    return FisherAccumulator()


SCORERS: dict[str, Scorer] = {
    "sensitivity": Scorer(
        "sensitivity", "AdaLoRA |W*grad|, EMA-smoothed sensitivity x uncertainty (needs weights, data)",
        settings=_SENSITIVITY_BETAS, accumulator=_sensitivity),
    "fisher": Scorer(
        "fisher", "empirical Fisher, mean squared gradient (needs weights, data)",
        accumulator=_fisher),
    "prior": Scorer(
        "prior", "data-free depth ramp 1 + layer/(layers-1) (needs only shapes: any model)",
        from_shapes=depth_scores),
}
DEFAULT_SCORER = "sensitivity"


def get_scorer(name: str) -> Scorer:
    """The registered scorer `name` (case-insensitive); unknown names list the valid ones."""
    scorer = SCORERS.get(name.strip().lower())
    if scorer is None:
        raise FedpipeError(f"scorer: unknown scorer {name!r}",
                           [f"{s.name}: {s.summary}" for s in SCORERS.values()])
    return scorer


def combine(per_server: dict[str, dict[str, float]], weights: dict[str, float]) -> dict[str, float]:
    """Sample-weighted mean of each server's scores, each first scaled to sum 1.

    Scaling first keeps a server whose loss (hence gradients) happens to be larger from
    outvoting others: a server's say is its share of the samples, nothing else. A server whose
    scores are all zero counts as uniform. The result sums to 1.
    """
    names = sorted({n for scores in per_server.values() for n in scores})
    total_w = sum(weights[s] for s in per_server)
    out = dict.fromkeys(names, 0.0)
    for server, scores in per_server.items():
        total = sum(max(0.0, scores.get(n, 0.0)) for n in names)
        for n in names:
            share = max(0.0, scores.get(n, 0.0)) / total if total > 0 else 1 / len(names)
            out[n] += weights[server] / total_w * share
    return out
