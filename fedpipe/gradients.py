"""The torch side of the gradient scorers: per-matrix accumulators and one server's scoring pass.

The formulas are documented in ``fedpipe.scorers`` (the registry); this module is imported only
when a server actually scores, because importing torch costs seconds that planning never needs.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Protocol

import torch

from fedpipe.errors import FedpipeError


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
