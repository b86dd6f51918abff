"""What travels between the coordinator and an edge server, and nothing else.

Two messages, both `fedpipe.wire` payloads (safetensors bytes, so what is counted is what was sent):

* **Broadcast** (coordinator -> server, one per plan entry and round): two groups of factors told
  apart by a key prefix, ``base/ROUND/NAME`` (an update to merge into the base weights, first
  broadcast in round ROUND: rules that merge, see `fedpipe.rules`) and ``init/NAME`` (the adapter's
  starting factors; a module without one starts fresh: A drawn from the round's seed, B = 0).
  Metadata: ``round``; ``base`` = ``none`` | ``delta`` (add the merges of rounds ``since`` + 1 ..
  ``round`` the server does not hold yet: the round's own, or everything a server that sat out
  rounds missed) | ``full`` (replace what is held by the cumulative merge: a resumed run, or when
  that is fewer bytes); when the ``init/`` values are a lossy delta (top-k, or a precision below
  fp32: `fedpipe.precision`) against that round's broadcast as the server holds it,
  ``reference_round``.
* **Update** (server -> coordinator): the trained factors; when lossy (upload density below 1 or
  a precision below fp32) a delta against the round's start that both sides can rebuild
  (`start_reference`), possibly with the sender's error feedback (`fedpipe.feedback`). Metadata: ``server``,
  ``entry``, ``round``, ``n_samples``, ``fresh_seed``, ``train_loss``.

Client and coordinator both import this module; neither imports the other.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Literal

import torch

from fedpipe import wire
from fedpipe.errors import FedpipeError
from fedpipe.feedback import ErrorFeedback
from fedpipe.lora import ClientUpdate, LoraFactors
from fedpipe.models import fresh_lora_A

BASE, INIT = "base/", "init/"
BaseMode = Literal["none", "delta", "full"]
BASE_MODES: tuple[BaseMode, ...] = ("none", "delta", "full")


def derived_seed(*parts: object) -> int:
    """A seed that depends only on its parts (run seed, round, server...), never on call order."""
    digest = hashlib.sha256(":".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**62 - 1)


def fresh_seed_of(seed: int, round_index: int, server: str | None) -> int:
    """The seed of a round's fresh LoRA A (`models.fresh_lora_A`): the server's own, or with
    `server` None the one every server of the round shares."""
    return derived_seed(seed, round_index) if server is None else derived_seed(seed, round_index, server)


@dataclass
class Broadcast:
    """A broadcast as the server decoded it."""

    merges: dict[int, dict[str, LoraFactors]]  # round first broadcast -> update ("full": one, the sum)
    init: dict[str, LoraFactors]
    round: int
    base: BaseMode
    since: int  # "delta": the merges held before this broadcast must reach at least this round


def broadcast_payload(merges: dict[int, dict[str, LoraFactors]], adapter_init: dict[str, LoraFactors],
                      round_index: int, *, base: BaseMode = "none", since: int | None = None,
                      density: float = 1.0, precision: str = "fp32",
                      reference: dict[str, LoraFactors] | None = None,
                      reference_round: int | None = None) -> bytes:
    """One server's broadcast: `merges` by the round that first broadcast each (under "delta",
    rounds `since` + 1 .. `round_index`, default the round's own); with a `reference` (the previous
    broadcast as the server holds it, from round `reference_round`) ``init/`` is a lossy delta
    against it, else values at `precision` (and dense)."""
    if base not in BASE_MODES:
        raise FedpipeError(f"broadcast: base mode {base!r} is not one of {', '.join(BASE_MODES)}")
    factors = {f"{BASE}{r}/{n}": f for r, update in merges.items() for n, f in update.items()}
    factors |= {INIT + n: f for n, f in adapter_init.items()}
    meta = {"round": str(round_index), "base": base,
            "since": str(round_index - 1 if since is None else since)}
    if reference is not None:
        if merges or reference_round is None:
            raise FedpipeError("broadcast: a delta broadcast carries only init/ factors and needs "
                               "the round of the reference the server holds")
        meta["reference_round"] = str(reference_round)
        reference = {INIT + n: f for n, f in reference.items()}
    elif density < 1.0:
        raise FedpipeError("broadcast: a sparse broadcast needs the reference the server holds")
    return wire.encode(factors, density=density, precision=precision, reference=reference, metadata=meta)


def read_broadcast(payload: bytes, *, reference: dict[str, LoraFactors] | None = None) -> Broadcast:
    """Decode a broadcast; a sparse one needs the init it is relative to."""
    prefixed = {INIT + n: f for n, f in reference.items()} if reference else None
    factors, meta = wire.decode(payload, reference=prefixed)
    base = meta.get("base", "none")
    if base not in BASE_MODES:
        raise FedpipeError(f"broadcast: base mode {base!r} is not one of {', '.join(BASE_MODES)}")
    merges: dict[int, dict[str, LoraFactors]] = {}
    for key, f in factors.items():
        if key.startswith(BASE):
            r, _, name = key[len(BASE):].partition("/")
            merges.setdefault(int(r), {})[name] = f
    round_index = int(meta.get("round", "0"))
    return Broadcast(merges=dict(sorted(merges.items())),
                     init={n[len(INIT):]: f for n, f in factors.items() if n.startswith(INIT)},
                     round=round_index, base=base, since=int(meta.get("since", round_index - 1)))


def peek_metadata(payload: bytes) -> dict[str, str]:
    """A payload's metadata without decoding its tensors: the receiver picks the reference from it."""
    return wire.read_metadata(payload)


def update_payload(factors: dict[str, LoraFactors], *, server: str, entry: str, n_samples: int,
                   round_index: int, fresh_seed: int, train_loss: float, density: float = 1.0,
                   precision: str = "fp32", reference: dict[str, LoraFactors] | None = None,
                   feedback: ErrorFeedback | None = None) -> bytes:
    """One server's update after local training; lossy (density below 1, a precision below fp32)
    it is a delta against `reference`, the round's start, carrying `feedback`'s residual."""
    meta = {"server": server, "entry": entry, "n_samples": str(n_samples), "round": str(round_index),
            "fresh_seed": str(fresh_seed), "train_loss": f"{train_loss:.6f}"}
    encode = feedback.encode if feedback is not None else wire.encode
    return encode(factors, density=density, precision=precision, reference=reference, metadata=meta)


def is_relative(meta: dict[str, str]) -> bool:
    """Whether a payload's values are deltas against a reference the receiver must hold."""
    return meta.get("fedpipe.relative") == "true"


def read_update(payload: bytes, reference: dict[str, LoraFactors] | None = None) -> ClientUpdate:
    """Decode an update; a sparse one needs the start it is relative to (`start_reference`)."""
    factors, meta = wire.decode(payload, reference=reference)
    try:
        n_samples = int(meta["n_samples"])
    except (KeyError, ValueError) as e:
        raise FedpipeError(f"payload: update metadata has no valid n_samples ({e})") from None
    try:
        train_loss = float(meta.get("train_loss", "nan"))
    except ValueError as e:
        raise FedpipeError(f"payload: update metadata has no valid train_loss ({e})") from None
    return ClientUpdate(server=meta.get("server", "?"), n_samples=n_samples, factors=factors,
                        metrics={"train_loss": train_loss})


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


def factor_shapes(factors: dict[str, LoraFactors]) -> dict[str, tuple[tuple[int, int], tuple[int, int]]]:
    """Each module's (A shape, B shape): what `start_reference` needs to rebuild fresh modules."""
    return {n: (tuple(f.A.shape), tuple(f.B.shape)) for n, f in factors.items()}


def concat(a: LoraFactors | None, b: LoraFactors) -> LoraFactors:
    """The sum of two folded updates, as one factor pair of the combined rank."""
    if a is None:
        return b.folded()
    b = b.folded()
    return LoraFactors(torch.cat([a.A, b.A]), torch.cat([a.B, b.B], dim=1), 1.0)
