"""Local training: a few AdamW steps on a LoRA-wrapped model, with what was measured on the way."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from fedpipe.measure import PeakMemory


@dataclass
class TrainStats:
    """What one local training run did and cost."""

    steps: int
    mean_loss: float
    last_loss: float
    tokens: int
    seconds: float
    peak_extra_gib: float  # working memory above the resident model (activations, grads, AdamW)


def trainable(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def train_steps(model: torch.nn.Module, batches: Iterator[dict[str, torch.Tensor]], steps: int,
                lr: float, *, weight_decay: float = 0.0, max_grad_norm: float = 1.0,
                on_step: Callable[[int, float], None] | None = None) -> TrainStats:
    """Run `steps` optimizer steps with a fresh AdamW on the trainable (LoRA) parameters.

    A fresh optimizer per call matches federated practice: clients keep no optimizer state
    across rounds (and the planner's memory model counts it once).
    """
    params = trainable(model)
    if not params:
        raise ValueError("the model has no trainable parameters")
    device = params[0].device
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    model.train()
    losses, tokens = [], 0
    start = time.perf_counter()
    with PeakMemory(str(device)) as peak:
        for step in range(steps):
            batch = {k: v.to(device) for k, v in next(batches).items()}
            loss = model(**batch).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss.item())
            tokens += int(batch["attention_mask"].sum())
            if on_step is not None:
                on_step(step, losses[-1])
    del optimizer
    return TrainStats(steps=steps, mean_loss=sum(losses) / len(losses), last_loss=losses[-1],
                      tokens=tokens, seconds=time.perf_counter() - start,
                      peak_extra_gib=peak.peak_gib)
