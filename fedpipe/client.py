"""One edge server, one round: receive the broadcast, train the planned adapter, send the update.

Everything crosses the boundary as bytes (`fedpipe.wire` payloads), so what is counted is what
was sent, and the same trainer serves the in-process backend and Flower's SuperNodes.
A broadcast payload carries two groups of factors, told apart by a key prefix:
``base/NAME`` (an update to merge into the base weights: flora) and ``init/NAME`` (the adapter's
starting factors). Modules without an ``init/`` entry start fresh (A random, B = 0).

Sparse communication (the plan entry's ``upload_density`` / ``download_density`` < 1; wire's
top-k, per A and B tensor, bitmask or indices, whichever is smaller):

* Upload: top-k of the update since the round's start. The start is what *both* sides can
  rebuild (`start_reference`): the broadcast's ``init/`` factors as the server decoded them, and
  for fresh modules peft's init drawn from ``fresh_seed`` (sent in the metadata with the entry
  name) by `models.fresh_lora_A`, B = 0. The coordinator adds the sparse delta to the same start,
  so it aggregates exactly the factors the server sent; what top-k drops is lost. No error
  feedback: a residual kept in factor coordinates means nothing a round later under flexlora (the
  global is re-based by an SVD) or flora (a fresh random A every round), and a Flower node keeps
  no trainer between rounds.
* Download: top-k of the change of the ``init/`` factors since the previous broadcast, as the
  server holds it (reconstructed, not exact), so what one round drops is still in the next
  round's difference (error compensation for free). flexlora's start is re-based by an SVD every
  round, so it is first rotated onto what the server holds (`server.align_components`: the same
  products, r x r Procrustes); fedit and hetlora average factors and keep their coordinates.
  The first broadcast after a fresh start or a resume is dense (nothing held). flora's ``base/``
  update is merged into the base for good, so it always travels dense (`plan.check_densities`
  refuses download_density < 1 there). A sparse broadcast names the round it is relative to
  (``reference_round``); a trainer that does not hold that round's broadcast (e.g. a Flower node,
  which starts fresh every round) refuses it.
* Rules: all four take sparse uploads: they aggregate the rebuilt factors, which are ordinary
  factors (fedit/hetlora average them, hetlora's norm weights and flexlora's SVD and flora's stack
  use their products); top-k keeps the largest entries, so those norms shrink only slightly.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from fedpipe import wire
from fedpipe.data import cycle_batches, encode
from fedpipe.errors import FedpipeError
from fedpipe.lora import LoraFactors
from fedpipe.models import (
    apply_base_delta,
    attach_lora,
    fresh_lora_A,
    get_factors,
    load_base,
    reset_lora,
    set_factors,
)
from fedpipe.plan import ServerPlan
from fedpipe.tasks import Example
from fedpipe.train import TrainStats, train_steps

BASE, INIT = "base/", "init/"


def derived_seed(*parts: object) -> int:
    """A seed that depends only on its parts (run seed, round, server...), never on call order."""
    digest = hashlib.sha256(":".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**62 - 1)


def broadcast_payload(base_delta: dict[str, LoraFactors], adapter_init: dict[str, LoraFactors],
                      round_index: int, *, density: float = 1.0,
                      reference: dict[str, LoraFactors] | None = None,
                      reference_round: int | None = None) -> bytes:
    """One server's broadcast; below density 1, ``init/`` is a top-k delta against `reference`
    (the previous broadcast as the server holds it, from round `reference_round`)."""
    factors = {BASE + n: f for n, f in base_delta.items()} | {INIT + n: f for n, f in adapter_init.items()}
    meta = {"round": str(round_index)}
    if density < 1.0:
        if base_delta or reference is None or reference_round is None:
            raise FedpipeError("broadcast: a sparse broadcast carries only init/ factors and needs "
                               "the reference the server holds and its round")
        meta["reference_round"] = str(reference_round)
        reference = {INIT + n: f for n, f in reference.items()}
    return wire.encode(factors, density=density, reference=reference, metadata=meta)


def split_broadcast(payload: bytes, *, reference: dict[str, LoraFactors] | None = None
                    ) -> tuple[dict[str, LoraFactors], dict[str, LoraFactors], int]:
    """(base update, adapter init, round); a sparse broadcast needs the init it is relative to."""
    prefixed = {INIT + n: f for n, f in reference.items()} if reference else None
    factors, meta = wire.decode(payload, reference=prefixed)
    base = {n[len(BASE):]: f for n, f in factors.items() if n.startswith(BASE)}
    init = {n[len(INIT):]: f for n, f in factors.items() if n.startswith(INIT)}
    return base, init, int(meta.get("round", "0"))


def peek_metadata(payload: bytes) -> dict[str, str]:
    """A wire payload's metadata without decoding its tensors (safetensors: an 8-byte
    little-endian header length, then the JSON header): the receiver picks the reference from it."""
    try:
        n = int.from_bytes(payload[:8], "little")
        meta = json.loads(bytes(payload[8:8 + n])).get("__metadata__")
        if not isinstance(meta, dict):
            raise ValueError("no metadata block")
    except (ValueError, AttributeError) as e:
        raise FedpipeError(f"payload: not a valid fedpipe wire payload ({e})") from e
    return dict(meta)


def start_reference(init: dict[str, LoraFactors], fresh_seed: int,
                    shapes: dict[str, tuple[tuple[int, int], tuple[int, int]]]) -> dict[str, LoraFactors]:
    """The factors a server started its round from, as the coordinator can rebuild them: `init`
    where the broadcast had it, else the fresh init (A drawn from `fresh_seed`, B = 0).
    `shapes` maps each module to its (A shape, B shape)."""
    start = {}
    for name, (a_shape, b_shape) in shapes.items():
        if name in init:
            start[name] = init[name]
        else:
            start[name] = LoraFactors(fresh_lora_A(fresh_seed, name, tuple(a_shape)),
                                      torch.zeros(tuple(b_shape)))
    return start


def concat(a: LoraFactors | None, b: LoraFactors) -> LoraFactors:
    """The sum of two folded updates, as one factor pair of the combined rank."""
    if a is None:
        return b.folded()
    b = b.folded()
    return LoraFactors(torch.cat([a.A, b.A]), torch.cat([a.B, b.B], dim=1), 1.0)


@dataclass
class AdaptedModel:
    """A base model at some bits with one adapter shape; shared by servers of one plan entry.

    `merged` is the update merged into its base so far (flora), kept in full precision and
    re-applied from the original weights, so quantized bases never accumulate rounding.
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

    def merge(self, model_dir: Path, delta: dict[str, LoraFactors], round_index: int) -> None:
        """Merge this round's base update once, however many servers share the model."""
        if not delta or self.merged_round >= round_index:
            return
        for name, f in delta.items():
            self.merged[name] = concat(self.merged.get(name), f)
        apply_base_delta(self.model, model_dir, self.merged)
        self.merged_round = round_index


class EdgeTrainer:
    """One edge server: its plan entry, its shard and the model it trains on."""

    def __init__(self, name: str, entry: ServerPlan, shard: list[Example], tokenizer,
                 model_dir: Path, seq_len: int, learning_rate: float, seed: int) -> None:
        self.name, self.entry, self.model_dir = name, entry, model_dir
        self.n_samples = len(shard)
        self.encoded = encode(shard, tokenizer, seq_len)
        self.pad_id = tokenizer.pad_token_id
        self.learning_rate, self.seed = learning_rate, seed
        self.held: tuple[int, dict[str, LoraFactors]] | None = None  # (round, init) last received

    def receive(self, payload: bytes) -> tuple[dict[str, LoraFactors], dict[str, LoraFactors], int]:
        """Decode a broadcast (against the one held, when it is sparse) and hold its init."""
        wanted = peek_metadata(payload).get("reference_round")
        reference = None
        if wanted is not None:
            if self.held is None or self.held[0] != int(wanted):
                holds = f"round {self.held[0]}'s" if self.held else "none"
                raise FedpipeError(
                    f"server {self.name}: the broadcast is a sparse delta against round {wanted}'s, "
                    f"and this trainer holds {holds}; download_density < 1 needs a trainer that "
                    "lives across rounds (the in-process backend)")
            reference = self.held[1]
        base_delta, init, round_index = split_broadcast(payload, reference=reference)
        self.held = (round_index, init)
        return base_delta, init, round_index

    def train_round(self, adapted: AdaptedModel, payload: bytes,
                    local_steps: int) -> tuple[bytes, TrainStats]:
        """Apply the broadcast, train `local_steps` steps, return the update payload and stats."""
        base_delta, init, round_index = self.receive(payload)
        adapted.merge(self.model_dir, base_delta, round_index)
        fresh_seed = derived_seed(self.seed, round_index, self.name)
        reset_lora(adapted.model, fresh_seed)
        set_factors(adapted.model, init)
        batches = cycle_batches(self.encoded, self.entry.batch_size,
                                derived_seed(self.seed, round_index, self.name, "data"), pad_id=self.pad_id)
        stats = train_steps(adapted.model, batches, local_steps, self.learning_rate)
        factors = get_factors(adapted.model)
        start = None
        if self.entry.upload_density < 1.0:
            start = start_reference(init, fresh_seed,
                                    {n: (f.A.shape, f.B.shape) for n, f in factors.items()})
        update = wire.encode(factors, density=self.entry.upload_density, reference=start,
                             metadata={"server": self.name, "entry": self.entry.name,
                                       "n_samples": str(self.n_samples), "round": str(round_index),
                                       "fresh_seed": str(fresh_seed),
                                       "train_loss": f"{stats.mean_loss:.6f}"})
        return update, stats
