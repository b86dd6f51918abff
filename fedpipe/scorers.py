"""Importance scorers: one number per weight matrix, computed where the data is.

Two kinds, in one registry keyed by lowercase name (``SCORERS``, ``get_scorer``):

- gradient scorers run on a server: a few calibration batches through the frozen base model,
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

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Protocol

import torch

from fedpipe.errors import FedpipeError
from fedpipe.shapes import ModelShapes


class Accumulator(Protocol):
    """Per-server state of a gradient scorer: fed one (weight, gradient) pair per matrix and
    batch, it returns one score per matrix."""

    def update(self, name: str, weight: torch.Tensor, grad: torch.Tensor) -> None: ...

    def scores(self) -> dict[str, float]: ...


class SensitivityAccumulator:
    """AdaLoRA's smoothed sensitivity times smoothed uncertainty, summed per matrix."""

    def __init__(self, beta1: float = 0.85, beta2: float = 0.85) -> None:
        self.beta1, self.beta2 = beta1, beta2
        self.avg: dict[str, torch.Tensor] = {}
        self.unc: dict[str, torch.Tensor] = {}

    def update(self, name: str, weight: torch.Tensor, grad: torch.Tensor) -> None:
        ipt = (weight.float() * grad.float()).abs_()
        if name not in self.avg:
            self.avg[name], self.unc[name] = torch.zeros_like(ipt), torch.zeros_like(ipt)
        avg, unc = self.avg[name], self.unc[name]
        avg.mul_(self.beta1).add_(ipt, alpha=1 - self.beta1)
        unc.mul_(self.beta2).add_(ipt.sub_(avg).abs_(), alpha=1 - self.beta2)

    def scores(self) -> dict[str, float]:
        return {n: float((self.avg[n] * self.unc[n]).sum(dtype=torch.float64)) for n in self.avg}


class FisherAccumulator:
    """Mean over batches of the squared mini-batch gradient, summed per matrix."""

    def __init__(self) -> None:
        self.total: dict[str, float] = {}
        self.steps: dict[str, int] = {}

    def update(self, name: str, weight: torch.Tensor, grad: torch.Tensor) -> None:
        self.total[name] = self.total.get(name, 0.0) + float(grad.float().pow(2).sum(dtype=torch.float64))
        self.steps[name] = self.steps.get(name, 0) + 1

    def scores(self) -> dict[str, float]:
        return {n: self.total[n] / self.steps[n] for n in self.total}


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

SCORERS: dict[str, Scorer] = {
    "sensitivity": Scorer(
        "sensitivity", "AdaLoRA |W*grad|, EMA-smoothed sensitivity x uncertainty (needs weights, data)",
        settings=_SENSITIVITY_BETAS,
        accumulator=lambda: SensitivityAccumulator(**_SENSITIVITY_BETAS)),
    "fisher": Scorer(
        "fisher", "empirical Fisher, mean squared gradient (needs weights, data)",
        accumulator=FisherAccumulator),
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


def score_server(model: torch.nn.Module, batches: Iterable[dict[str, torch.Tensor]],
                 names: list[str], accumulator: Accumulator,
                 on_batch: Callable[[], None] | None = None) -> dict[str, float]:
    """What one server computes: its scores for `names` over its calibration `batches`.

    Only the candidate weights get gradients (not embeddings or lm_head, which saves a
    vocab-sized matmul per batch); each gradient is handed to `accumulator` as soon as it is
    complete and then freed, so at most one matrix's gradient is alive at a time. The model's
    requires_grad flags and train/eval mode are restored afterwards.
    """
    modules = dict(model.named_modules())
    missing = [n for n in names if not isinstance(getattr(modules.get(n), "weight", None), torch.Tensor)]
    if missing:
        raise FedpipeError(f"the model has no weight matrix for {len(missing)} candidate(s)",
                           missing[:5])
    weights = {n: modules[n].weight for n in names}
    flags = {p: p.requires_grad for p in model.parameters()}
    was_training = model.training
    handles = []

    def hook_for(name: str) -> Callable[[torch.Tensor], None]:
        def hook(param: torch.Tensor) -> None:
            with torch.no_grad():
                accumulator.update(name, param.detach(), param.grad)
            param.grad = None
        return hook

    try:
        for p in model.parameters():
            p.requires_grad_(False)
        for name, w in weights.items():
            w.requires_grad_(True)
            handles.append(w.register_post_accumulate_grad_hook(hook_for(name)))
        model.eval()  # no dropout: the scores are a property of the weights and the data
        device = next(iter(weights.values())).device
        for batch in batches:
            batch = {k: v.to(device) for k, v in batch.items()}
            loss = model(**batch, use_cache=False).loss
            if not torch.isfinite(loss):
                raise FedpipeError(f"calibration loss is {loss.item()}: check the data and the "
                                   "model's weights")
            loss.backward()
            if on_batch is not None:
                on_batch()
    finally:
        for handle in handles:
            handle.remove()
        for p, flag in flags.items():
            p.requires_grad_(flag)
            p.grad = None
        model.train(was_training)
    return accumulator.scores()


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
