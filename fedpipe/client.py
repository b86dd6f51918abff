"""One edge server, one round: receive the broadcast, train the planned adapter, send the update.

Everything crosses the boundary as bytes (`fedpipe.wire` payloads), so what is counted is what
was sent, and the same trainer serves the in-process backend and Flower's SuperNodes.
A broadcast payload carries two groups of factors, told apart by a key prefix:
``base/NAME`` (an update to merge into the base weights: flora) and ``init/NAME`` (the adapter's
starting factors). Modules without an ``init/`` entry start fresh (A random, B = 0).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import torch

from fedpipe import wire
from fedpipe.data import cycle_batches, encode
from fedpipe.lora import LoraFactors
from fedpipe.models import apply_base_delta, attach_lora, get_factors, load_base, reset_lora, set_factors
from fedpipe.plan import ServerPlan
from fedpipe.tasks import Example
from fedpipe.train import TrainStats, train_steps

BASE, INIT = "base/", "init/"


def derived_seed(*parts: object) -> int:
    """A seed that depends only on its parts (run seed, round, server...), never on call order."""
    digest = hashlib.sha256(":".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**62 - 1)


def broadcast_payload(base_delta: dict[str, LoraFactors], adapter_init: dict[str, LoraFactors],
                      round_index: int) -> bytes:
    factors = {BASE + n: f for n, f in base_delta.items()} | {INIT + n: f for n, f in adapter_init.items()}
    return wire.encode(factors, metadata={"round": str(round_index)})


def split_broadcast(payload: bytes) -> tuple[dict[str, LoraFactors], dict[str, LoraFactors], int]:
    factors, meta = wire.decode(payload)
    base = {n[len(BASE):]: f for n, f in factors.items() if n.startswith(BASE)}
    init = {n[len(INIT):]: f for n, f in factors.items() if n.startswith(INIT)}
    return base, init, int(meta.get("round", "0"))


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

    def train_round(self, adapted: AdaptedModel, payload: bytes,
                    local_steps: int) -> tuple[bytes, TrainStats]:
        """Apply the broadcast, train `local_steps` steps, return the update payload and stats."""
        base_delta, init, round_index = split_broadcast(payload)
        adapted.merge(self.model_dir, base_delta, round_index)
        reset_lora(adapted.model, derived_seed(self.seed, round_index, self.name))
        set_factors(adapted.model, init)
        batches = cycle_batches(self.encoded, self.entry.batch_size,
                                derived_seed(self.seed, round_index, self.name, "data"), pad_id=self.pad_id)
        stats = train_steps(adapted.model, batches, local_steps, self.learning_rate)
        update = wire.encode(get_factors(adapted.model),
                             metadata={"server": self.name, "n_samples": str(self.n_samples),
                                       "round": str(round_index), "train_loss": f"{stats.mean_loss:.6f}"})
        return update, stats
