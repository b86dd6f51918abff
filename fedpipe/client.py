"""One edge server, one round: receive the broadcast, train the planned adapter, send the update.

Everything crosses the boundary as bytes (the messages of `fedpipe.protocol`), so what is counted
is what was sent, and the same trainer serves every transport (in-process, Flower's SuperNodes).

Lossy communication (the plan entry's ``upload_density`` / ``download_density`` < 1: wire's top-k,
per A and B tensor, bitmask or indices, whichever is smaller; and ``upload_precision`` /
``download_precision`` below fp32: bf16, fp16, blockwise int8, nf4, fp4, int2 or int3, `fedpipe.precision`):

* Upload: top-k of the update since the round's start. The start is what *both* sides can
  rebuild (`start_reference`): the broadcast's ``init/`` factors as the server decoded them, and
  for fresh modules peft's init drawn from ``fresh_seed`` (sent in the metadata with the entry
  name) by `models.fresh_lora_A`, B = 0. The coordinator adds the sparse delta to the same start,
  so it aggregates exactly the factors the server sent. What top-k and rounding drop is carried to
  the next round by error feedback (`fedpipe.feedback`) where a residual in factor coordinates
  still means something a round later: under fedit and hetlora (``keeps_factor_coordinates``), on a
  trainer that lives across rounds (in-process, a Flower node's resident trainer), reset whenever
  the round's start is not the continuation of the last. Not under flexlora (the global is
  re-based by an SVD) or flora (a fresh random A every round), nor on a Flower node that loads
  per message (`fedpipe node --no-resident`): there it is lost.
* Download: top-k of the change of the ``init/`` factors since the previous broadcast, as the
  server holds it (reconstructed, not exact), so what one round drops is still in the next
  round's difference (error compensation for free). flexlora's start is re-based by an SVD every
  round, so it is first rotated onto what the server holds (`coordinator.align_components`: the same
  products, r x r Procrustes); fedit and hetlora average factors and keep their coordinates.
  Under fedit and hetlora every server of a round starts its fresh modules from the same A (drawn
  from ``fresh_seed`` = the run seed and the round, not the server: FedIT's shared initialisation),
  so after round 1 the coordinator knows what every server held, its fresh start, and round 2's
  broadcast is already a delta against it: a few AdamW steps' worth, which a 2-bit code holds,
  rather than the absolute factors (random init included), which it does not. Under flexlora and
  flora each server draws its own A. The first broadcast after a resume is dense, and so is
  round 2's under flexlora (nothing held to take a difference from). flora's ``base/``
  update is merged into the base for good, so it always travels dense (`plan.check_densities`
  refuses download_density < 1 there). A sparse broadcast names the round it is relative to
  (``reference_round``); a trainer that does not hold that round's broadcast (e.g. on a Flower node
  that loads per message, `fedpipe node --no-resident`) refuses it.
* Rules: all four take sparse uploads: they aggregate the rebuilt factors, which are ordinary
  factors (fedit/hetlora average them, hetlora's norm weights and flexlora's SVD and flora's stack
  use their products); top-k keeps the largest entries, so those norms shrink only slightly.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from fedpipe.data import cycle_batches, encode
from fedpipe.errors import FedpipeError
from fedpipe.feedback import ErrorFeedback
from fedpipe.lora import LoraFactors
from fedpipe.models import apply_base_delta, attach_lora, get_factors, load_base, reset_lora, set_factors
from fedpipe.plan import ServerPlan
from fedpipe.protocol import (
    Broadcast,
    concat,
    derived_seed,
    factor_shapes,
    fresh_seed_of,
    peek_metadata,
    read_broadcast,
    start_reference,
    update_payload,
)
from fedpipe.tasks import Example
from fedpipe.train import TrainStats, round_learning_rate, train_steps


@dataclass
class AdaptedModel:
    """A base model at some bits with one adapter shape; shared by servers of one plan entry.

    `merged` is the update merged into its base so far (rules that merge into the base), kept in
    full precision and re-applied from the original weights, so quantized bases never accumulate
    rounding.
    """

    model: torch.nn.Module
    bits: int
    merged: dict[str, LoraFactors] = field(default_factory=dict)
    merged_round: int = 0

    @classmethod
    def load(cls, model_dir: Path, entry: ServerPlan, device: str, seed: int) -> AdaptedModel:
        base = load_base(model_dir, entry.bits, device=device)
        return cls(attach_lora(base, entry.rank_pattern, alpha_ratio=entry.lora_alpha_ratio, seed=seed),
                   entry.bits)

    def merge(self, model_dir: Path, broadcast: Broadcast, server: str) -> None:
        """Bring the base to what the broadcast says: add the merges it carries that the base does
        not hold yet (once, however many servers share the model), or replace what is held by the
        cumulative one."""
        if broadcast.base == "none" or (broadcast.base == "delta" and self.merged_round >= broadcast.round):
            return
        if broadcast.base == "full":
            self.merged = {name: f.folded() for update in broadcast.merges.values()
                           for name, f in update.items()}
        else:
            if self.merged_round < broadcast.since:
                raise FedpipeError(f"server {server}: its base holds round {self.merged_round}'s merge, "
                                   f"round {broadcast.round}'s broadcast adds to round {broadcast.since}'s")
            for r, update in broadcast.merges.items():
                if r > self.merged_round:
                    for name, f in update.items():
                        self.merged[name] = concat(self.merged.get(name), f)
        if any(r > self.merged_round for r in broadcast.merges) or broadcast.base == "full":
            apply_base_delta(self.model, model_dir, self.merged)
        self.merged_round = broadcast.round


class EdgeTrainer:
    """One edge server: its plan entry, its shard and the model it trains on."""

    def __init__(self, name: str, entry: ServerPlan, shard: list[Example], tokenizer,
                 model_dir: Path, seq_len: int, learning_rate: float, seed: int,
                 feedback: bool = False, shared_init: bool = False, lr_schedule: str = "constant") -> None:
        """`learning_rate`, `lr_schedule`: the peak and its decay over the run's rounds
        (`train.round_learning_rate`). `feedback`: keep upload error feedback across rounds (a
        trainer that lives across rounds, under a rule that keeps factor coordinates:
        `fedpipe.rules`). `shared_init`: fresh modules start from the round's A, the same on every
        server (`fresh_seed`)."""
        self.name, self.entry, self.model_dir = name, entry, model_dir
        self.n_samples = len(shard)
        self.encoded = encode(shard, tokenizer, seq_len)
        self.pad_id = tokenizer.pad_token_id
        self.learning_rate, self.lr_schedule, self.seed = learning_rate, lr_schedule, seed
        self.held: tuple[int, dict[str, LoraFactors]] | None = None  # (round, init) last received
        self.feedback = ErrorFeedback() if feedback else None
        self.shared_init = shared_init
        self.last_round = 0

    def receive(self, payload: bytes) -> Broadcast:
        """Decode a broadcast (against the one held, when it is sparse) and hold its init."""
        wanted = peek_metadata(payload).get("reference_round")
        reference = None
        if wanted is not None:
            if self.held is None or self.held[0] != int(wanted):
                holds = f"round {self.held[0]}'s" if self.held else "none"
                raise FedpipeError(
                    f"server {self.name}: the broadcast is a sparse delta against round {wanted}'s, "
                    f"and this trainer holds {holds}; download_density < 1 needs a trainer that "
                    "lives across rounds (the in-process backend, or a Flower node's resident trainer: "
                    "not `fedpipe node --no-resident`)")
            reference = self.held[1]
        broadcast = read_broadcast(payload, reference=reference)
        self.held = (broadcast.round, broadcast.init)
        return broadcast

    def train_round(self, adapted: AdaptedModel, payload: bytes, local_steps: int,
                    rounds: int) -> tuple[bytes, TrainStats]:
        """Apply the broadcast, train `local_steps` steps at the round's learning rate (of a run
        of `rounds`), return the update payload and stats."""
        broadcast = self.receive(payload)
        round_index = broadcast.round
        learning_rate = round_learning_rate(self.learning_rate, self.lr_schedule, round_index, rounds)
        adapted.merge(self.model_dir, broadcast, self.name)
        fresh_seed = fresh_seed_of(self.seed, round_index, None if self.shared_init else self.name)
        reset_lora(adapted.model, fresh_seed)
        set_factors(adapted.model, broadcast.init)
        if self.shared_init and not broadcast.init:  # the coordinator can rebuild this start: hold it
            shapes = factor_shapes(get_factors(adapted.model))
            self.held = (round_index, start_reference({}, fresh_seed, shapes))
        batches = cycle_batches(self.encoded, self.entry.batch_size,
                                derived_seed(self.seed, round_index, self.name, "data"), pad_id=self.pad_id)
        stats = train_steps(adapted.model, batches, local_steps, learning_rate)
        factors = get_factors(adapted.model)
        start = None
        if self.entry.upload_density < 1.0 or self.entry.upload_precision != "fp32":
            start = start_reference(broadcast.init, fresh_seed, factor_shapes(factors))
        if self.feedback is not None and (broadcast.base == "full" or self.last_round != round_index - 1):
            self.feedback.reset()  # the start is not the continuation of the last one
        self.last_round = round_index
        update = update_payload(factors, server=self.name, entry=self.entry.name, n_samples=self.n_samples,
                                round_index=round_index, fresh_seed=fresh_seed, train_loss=stats.mean_loss,
                                density=self.entry.upload_density, precision=self.entry.upload_precision,
                                reference=start, feedback=self.feedback)
        return update, stats

