"""The torch side of the gradient scorers: per-matrix accumulators and one server's scoring pass.

The formulas are documented in ``fedpipe.scorers`` (the registry); this module is imported only
when a server actually scores, because importing torch costs seconds that planning never needs.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F  # noqa: N812 - torch's own spelling

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
        self._scratch: dict[torch.Size, torch.Tensor] = {}  # |W*G| of the matrix at hand, per shape

    def update(self, name: str, weight: torch.Tensor, grad: torch.Tensor) -> None:
        """One EMA step, in place: |W*G| goes into a scratch buffer per shape (a model's matrices
        come in a few shapes) rather than a fresh tensor per matrix and batch, and each moving
        average is one `lerp_` pass over memory instead of two."""
        ipt = self._scratch.get(weight.shape)
        if ipt is None:
            ipt = self._scratch[weight.shape] = torch.empty(weight.shape, dtype=torch.float32,
                                                            device=weight.device)
        torch.mul(weight.float(), grad.float(), out=ipt).abs_()
        if name not in self.avg:
            self.avg[name], self.unc[name] = torch.zeros_like(ipt), torch.zeros_like(ipt)
        avg, unc = self.avg[name], self.unc[name]
        avg.lerp_(ipt, 1 - self.beta1)  # b1 avg + (1 - b1) ipt
        unc.lerp_(ipt.sub_(avg).abs_(), 1 - self.beta2)

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


class AnswerLoss:
    """`model(**batch).loss` (mean cross-entropy over the labelled tokens) for less work.

    Calibration batches are short prompts with shorter answers, padded to the longest row, so a
    plain pass spends most of its work where the loss does not look. This one runs the batch as
    a single packed sequence (`pack_rows`):

    - the rows' common prompt prefix (the chat template's system preamble: about half of each
      built-in example) appears once, and every row attends to it: with causal attention a
      prefix's states do not depend on what follows it;
    - no padding: each row keeps only its real tokens, at their own positions, attending only to
      the prefix and to itself;
    - the vocabulary projection runs only where a labelled token is predicted (lm_head is about
      a fifth of SmolLM2's forward per position).

    It is the same function of the weights, so gradients and scores agree with the plain pass up
    to float noise, and each weight still enters once, so its gradient is one matmul. The first
    batch checks the agreement: a model whose loss is more than decoder + projection (logit
    scaling, soft-capping) or that ignores a custom attention mask keeps the plain pass.
    """

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model
        self.shortcut: bool | None = None  # None: not checked yet
        ends = {id(m.weight) for m in (model.get_input_embeddings(), model.get_output_embeddings())
                if m is not None}  # embeddings and lm_head (often one tied tensor)
        self._body = sum(p.numel() for p in model.parameters() if p.ndim >= 2 and id(p) not in ends)

    def __call__(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        if self.shortcut is None:
            self.shortcut = self._shortcut_agrees(batch)
        if self.shortcut and self.packing_pays(batch):
            return self._packed(batch)
        return self.model(**batch, use_cache=False).loss

    def packing_pays(self, batch: dict[str, torch.Tensor]) -> bool:
        """Whether the packed sequence costs less than the padded batch. Its attention mask is
        dense, so attention grows with the square of all rows' tokens together: many long rows
        are cheaper padded. Cost per token: about the body's weights (multiply-adds) plus
        2 x layers x hidden x the keys it attends to."""
        ids = batch["input_ids"]
        rows, width = ids.shape
        packed = len(pack_rows(ids, batch["attention_mask"], batch["labels"]).tokens)
        config = self.model.config
        per_key = 2 * config.num_hidden_layers * config.hidden_size
        return packed * (self._body + per_key * packed) < rows * width * (self._body + per_key * width)

    def _shortcut_agrees(self, batch: dict[str, torch.Tensor]) -> bool:
        if not hasattr(self.model, "get_decoder"):
            return False
        with torch.no_grad():
            plain = self.model(**batch, use_cache=False).loss
            packed = self._packed(batch)
        return bool(torch.isclose(packed, plain, rtol=1e-4, atol=1e-6))

    def _packed(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        packed = pack_rows(batch["input_ids"], batch["attention_mask"], batch["labels"])
        allowed = packed.attends()
        bias = torch.zeros(allowed.shape, dtype=self.model.dtype, device=allowed.device)
        bias.masked_fill_(~allowed, torch.finfo(bias.dtype).min)
        hidden = self.model.get_decoder()(
            input_ids=packed.tokens[None], position_ids=packed.positions[None],
            attention_mask=bias[None, None], use_cache=False).last_hidden_state[0]
        keep = packed.targets != -100
        logits = self.model.get_output_embeddings()(hidden[keep])
        return F.cross_entropy(logits.float(), packed.targets[keep])


@dataclass
class PackedRows:
    """A batch as one sequence: a shared prefix (segment -1), then each row's remaining real
    tokens (segment = row), with their original positions and next-token targets."""

    tokens: torch.Tensor
    positions: torch.Tensor
    segments: torch.Tensor
    targets: torch.Tensor  # -100 where no logit is wanted

    def attends(self) -> torch.Tensor:
        """[query, key] True where the key is visible: earlier (or the same) and in the shared
        prefix or the query's own row."""
        n = len(self.tokens)
        earlier = torch.ones(n, n, dtype=torch.bool, device=self.tokens.device).tril_()
        seg = self.segments
        return earlier & ((seg[None, :] == -1) | (seg[None, :] == seg[:, None]))


def pack_rows(ids: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor) -> PackedRows:
    """Pack a padded batch (any padding side): the columns every row shares at the start (real
    tokens, the same ids, no logit wanted) once, then each row's other real tokens."""
    targets = torch.full_like(labels, -100)
    targets[:, :-1] = labels[:, 1:]  # position t predicts token t + 1
    start = shared_prefix(ids, mask, targets != -100)
    columns = torch.arange(ids.shape[1], device=ids.device)
    parts = [(ids[0, :start], columns[:start], torch.full((start,), -1, device=ids.device),
              targets[0, :start])]
    for row in range(len(ids)):
        cols = columns[(mask[row] == 1) & (columns >= start)]
        parts.append((ids[row, cols], cols, torch.full((len(cols),), row, device=ids.device),
                      targets[row, cols]))
    return PackedRows(*(torch.cat(part) for part in zip(*parts, strict=True)))


def shared_prefix(ids: torch.Tensor, mask: torch.Tensor, wanted: torch.Tensor) -> int:
    """Leading columns that every row has in common (real tokens, the same ids) and at which no
    logit is wanted; 0 for a single row."""
    if len(ids) < 2:
        return 0
    wanted_at = wanted.any(0).nonzero()
    limit = int(wanted_at[0]) if len(wanted_at) else ids.shape[1]
    same = ((ids == ids[:1]).all(0) & (mask == 1).all(0))[:limit]
    return int(same.int().cumprod(0).sum())


def score_server(model: torch.nn.Module, batches: Iterable[dict[str, torch.Tensor]],
                 names: list[str], accumulator: Accumulator,
                 on_batch: Callable[[], None] | None = None,
                 loss: Callable[[dict[str, torch.Tensor]], torch.Tensor] | None = None
                 ) -> dict[str, float]:
    """What one server computes: its scores for `names` over its calibration `batches`.

    Only the candidate weights get gradients (not embeddings or lm_head, which saves a
    vocab-sized matmul per batch); each gradient is handed to `accumulator` as soon as it is
    complete and then freed, so at most one matrix's gradient is alive at a time. The model's
    requires_grad flags and train/eval mode are restored afterwards. `loss` maps a batch to the
    loss (default: a new `AnswerLoss`; the servers that score on one model share one, so its
    check runs once).
    """
    loss = loss or AnswerLoss(model)
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
            value = loss(batch)
            if not torch.isfinite(value):
                raise FedpipeError(f"calibration loss is {value.item()}: check the data and the "
                                   "model's weights")
            value.backward()
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
