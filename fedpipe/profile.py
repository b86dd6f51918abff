"""The cluster profile: what the federation looks like and what may be chosen for it.

A profile is YAML validated by the pydantic models below: unknown keys are rejected and every
error names the field, the server and what would be valid. Identical servers are written once
with ``count``; ``expand_servers`` turns them into individual named servers when needed.
"""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path
from typing import Literal, get_args

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from fedpipe.errors import FedpipeError
from fedpipe.precision import PRECISIONS, WirePrecision, bytes_per_value
from fedpipe.rules import AggregationRule, rules_help
from fedpipe.shapes import CARDS_DIR, MATRIX_TYPES, ModelShapes, load_shapes

Bits = Literal[4, 8, 16]
ObjectiveKind = Literal["weighted", "rate"]
LrSchedule = Literal["constant", "cosine"]  # fedpipe.train.round_learning_rate
Selection = Literal["importance", "spread"]  # fedpipe.planning.selection


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class Task(_Strict):
    """What is trained: the data, its length and how much local work a round holds."""

    dataset: str = Field("builtin", description="'builtin' (generated task families), a .jsonl "
                         "path (Alpaca/Dolly fields) or 'hf:NAME_OR_DIR' for a datasets source.")
    seq_len: int = Field(128, ge=8, le=131072, description="Tokens per training sequence.")
    local_steps: int = Field(10, ge=1, le=100000, description="Optimizer steps per server per round.")
    rounds: int = Field(3, ge=1, le=10000, description="Federated rounds.")
    learning_rate: float = Field(5e-4, gt=0, le=1, description="AdamW learning rate of the adapters "
                                 "(the peak, under a decaying lr_schedule).")
    lr_schedule: LrSchedule = Field("constant", description="Learning rate over the rounds: constant, "
                                    "or cosine (a half cosine from learning_rate in round 1 to a tenth "
                                    "of it in the last round, which settles the final model).")
    partition: Literal["iid", "dirichlet", "family"] = Field(
        "dirichlet", description="How data is split across servers: iid, non-IID by a Dirichlet "
        "over task families, or one family per server.")
    dirichlet_alpha: float = Field(0.5, gt=0, description="Dirichlet concentration: small = skewed.")
    eval_samples: int = Field(200, ge=1, description="Held-out examples for evaluating the global model.")
    eval_every: int = Field(1, ge=1, description="Evaluate the global model every N rounds (the last "
                            "round always): evaluation is most of a round's overhead on a CPU.")
    accuracy_every: int = Field(1, ge=1, description="Of the evaluated rounds, generate answers for "
                                "exact match on every Nth and the last; the others score the loss only "
                                "(greedy generation, the slow part where it is latency-bound, as on "
                                "a GPU).")
    reuse_samples: bool = Field(False, description="Allow a data file smaller than the servers' "
                                "samples plus eval_samples: examples are then reused across shards "
                                "(a warning with the numbers); otherwise planning stops with them.")
    seed: int = Field(0, description="Seed for data, initialisation and partitioning.")
    norm_bound: float | None = Field(10.0, gt=0, description="Refuse an update whose norm is over this "
                                     "multiple of the round's median update norm (null: no bound).")
    clip_norm: float | None = Field(None, gt=0, description="Scale every update down to at most this "
                                    "norm before aggregating (robust aggregation; null: off).")
    cohort: int | float | None = Field(None, description="Servers sampled to train each round: a "
                                       "count (8) or a fraction of the training servers (0.125); "
                                       "null: every server, every round.")
    stratify: bool = Field(False, description="Sample the cohort class by class (plan entries), in "
                           "proportion to each class's size.")

    @field_validator("cohort")
    @classmethod
    def _cohort_in_range(cls, v: int | float | None) -> int | float | None:
        if v is None or (isinstance(v, int) and v >= 1) or (isinstance(v, float) and 0 < v <= 1):
            return v
        raise ValueError(f"cohort {v!r}: valid is a count >= 1 or a fraction in (0, 1]")


class Candidates(_Strict):
    """The choices the planner may make for every server."""

    targets: list[str] = Field(list(MATRIX_TYPES), min_length=1,
                               description=f"Matrix types that may be adapted: {', '.join(MATRIX_TYPES)}.")
    ranks: list[int] = Field([0, 4, 8, 16], min_length=1,
                             description="LoRA rank ladder; 0 means 'not adapted'.")
    bits: list[Bits] = Field([4, 8, 16], min_length=1, description="Base-model precisions (4, 8, 16).")
    batch_sizes: list[int] = Field([4], min_length=1, description="Per-step batch sizes to choose from.")
    lora_alpha_ratio: float = Field(2.0, gt=0, description="LoRA alpha = ratio x rank per module.")
    densities: list[float] = Field(
        [1.0, 0.25, 0.0625], min_length=1,
        description="Communication density ladder (share of each factor's entries sent, top-k; "
        "1 = dense). The planner picks one per server: it applies to the upload and, except "
        "under flora (whose stack is broadcast dense), to the download.")
    precisions: list[WirePrecision] = Field(
        ["fp32", "bf16", "int8", "nf4"], min_length=1,
        description=f"Wire precision ladder of the adapter values ({', '.join(PRECISIONS)}; "
        "fedpipe.precision). The planner picks one per server with its density: it applies to the "
        "upload and, except under flora (whose stack is broadcast exact), to the download.")
    selection: Selection = Field(
        "importance", description="Which sets of matrices a server may adapt: 'importance' (any: "
        "the most importance covered, which piles onto a few types and layers) or 'spread' (for "
        "the n it adapts, the n most important with at most ceil(n / layers) per layer and per-type "
        "counts within one of each other: the rule that beat random selection in "
        "benchmarks/bench_importance.py; fedpipe.planning.selection).")

    @field_validator("targets")
    @classmethod
    def _known_targets(cls, v: list[str]) -> list[str]:
        bad = [t for t in v if t not in MATRIX_TYPES]
        if bad:
            raise ValueError(f"unknown matrix type(s) {bad}; valid: {list(MATRIX_TYPES)}")
        if len(set(v)) != len(v):
            raise ValueError("targets repeat an entry")
        return v

    @field_validator("ranks")
    @classmethod
    def _valid_ranks(cls, v: list[int]) -> list[int]:
        if any(r < 0 or r > 4096 for r in v):
            raise ValueError("ranks must lie in 0..4096")
        if not any(r > 0 for r in v):
            raise ValueError("the rank ladder needs at least one rank > 0")
        return sorted(set(v) | {0})

    @field_validator("batch_sizes")
    @classmethod
    def _valid_batches(cls, v: list[int]) -> list[int]:
        if any(b < 1 or b > 4096 for b in v):
            raise ValueError("batch sizes must lie in 1..4096")
        return sorted(set(v))

    @field_validator("bits")
    @classmethod
    def _unique_bits(cls, v: list[int]) -> list[int]:
        return sorted(set(v))

    @field_validator("densities")
    @classmethod
    def _valid_densities(cls, v: list[float]) -> list[float]:
        if any(not 0 < d <= 1 for d in v):
            raise ValueError("densities must lie in (0, 1]")
        return sorted(set(v), reverse=True)

    @field_validator("precisions")
    @classmethod
    def _widest_first(cls, v: list[str]) -> list[str]:
        """Most bytes per value first, like the densities: the baseline takes the first."""
        return sorted(dict.fromkeys(v), key=lambda p: -bytes_per_value(1.0, p))


class Objective(_Strict):
    """How the planner trades quality (importance covered) against round time."""

    kind: ObjectiveKind = Field(
        "rate", description="rate (the default): maximise quality per second of round time "
        "(quality / round time, the progress towards a target per second; time_weight is unused, "
        "and every server trains at least one matrix at the smallest rank, so no server's data is "
        "dropped to shorten the round); weighted: maximise quality - time_weight x round time / "
        "the baseline's round time. rate reached benchmarks/bench_strategies.py's target sooner "
        "than weighted and every peer rule on both benchmark clusters (link- and compute-bound).")
    time_weight: float = Field(0.2, ge=0, description="Quality given up to shorten the round by "
                               "the homogeneous baseline's round time (0 = quality only).")
    deadline_s: float | None = Field(None, gt=0, description="Hard upper bound on the round time.")
    bits_quality: dict[int, float] = Field(
        {4: 0.97, 8: 0.99, 16: 1.0},
        description="Quality kept at each base precision (QLoRA: 4-bit NF4 is close to 16-bit).")
    density_quality: dict[float, float] = Field(
        {1.0: 1.0, 0.25: 0.95, 0.0625: 0.4},
        description="Quality kept at each communication density, a prior measured by "
        "benchmarks/bench_sparse.py (share of dense's loss improvement after 5 rounds on the "
        "bundled model: 0.96 at 1/4, 0.40 at 1/16); every candidate density needs an entry.")
    precision_quality: dict[WirePrecision, float] = Field(
        {"fp32": 1.0, "fp16": 1.0, "bf16": 1.0, "int8": 1.0, "nf4": 0.997, "fp4": 0.85, "int2": 0.987,
         "int3": 0.99},
        description="Quality kept at each wire precision, multiplied with density_quality: the "
        "share of dense fp32's loss improvement after 10 rounds, mean of 2 seeds, capped at 1, "
        "measured by benchmarks/bench_bytes.py (bf16 1.001, int8 1.001, nf4 0.997; the seed "
        "spread, about 0.07, is larger than every difference; int2 0.987 after 20 rounds, mean "
        "of 6 seeds, under fedit with error feedback, the only rules where it holds); fp16 "
        "(smaller error than bf16), fp4 (larger than nf4) and int3 are priors. Every candidate "
        "precision needs an entry.")


class Server(_Strict):
    """One edge server, or `count` identical ones."""

    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9_.-]+$", description="Unique name.")
    memory_gib: float = Field(gt=0, le=1e5, description="Memory available for training (GiB).")
    tflops: float = Field(gt=0, le=1e5, description="Effective training throughput (TFLOP/s).")
    uplink_mbps: float = Field(gt=0, le=1e6, description="Upload bandwidth to the server (Mbit/s).")
    downlink_mbps: float = Field(gt=0, le=1e6, description="Download bandwidth (Mbit/s).")
    samples: int = Field(gt=0, description="Local training samples.")
    count: int = Field(1, ge=1, le=100000, description="Number of identical servers of this kind.")
    device: Literal["cuda", "cpu"] = Field("cuda", description="cuda: bf16 compute; cpu: fp32.")
    bits: list[Bits] | None = Field(None, min_length=1, description="Allowed precisions here.")

    def member_names(self) -> list[str]:
        """Names of the individual servers this entry stands for."""
        if self.count == 1:
            return [self.name]
        width = len(str(self.count))
        return [f"{self.name}-{i:0{width}d}" for i in range(1, self.count + 1)]


class QualityCalibration(_Strict):
    """The quality side of the model, measured by `fedpipe calibrate --quality` (probe runs on the
    profile's model and data, `fedpipe.quality`). Each field replaces the prior it names; the
    share of the loss improvement is against a reference probe (every candidate matrix at the top
    rank, 16-bit base, the largest batch)."""

    rank_gain: dict[int, float] = Field(
        description="Share of the top rank's improvement each rank keeps, on every candidate matrix "
        "(replaces g(r) = log2(1+r)/log2(1+r_max)); every rank of the ladder above 0, values in "
        "[0, 1], non-decreasing with the rank, 1 at the top rank.")
    type_share: dict[str, float] = Field(
        description="Share of the improvement that each matrix type carries, measured by adapting "
        "that type alone (non-negative, normalised over the candidate types when used); importance "
        "distributes a type's share among its matrices. Every candidate type needs an entry.")
    batch_exponent: float = Field(
        ge=0, le=2, description="Quality per round grows as (batch / largest batch)^exponent "
        "(replaces 1/4): the least-squares fit over the batch probes.")
    bits_quality: dict[int, float] = Field(
        description="Share of the 16-bit base's improvement kept at each base precision "
        "(replaces objective.bits_quality); every candidate precision, values in [0, 1].")
    probes: str = Field("", description="How it was measured (steps, seeds, held-out examples).")

    @field_validator("rank_gain")
    @classmethod
    def _monotone_gain(cls, v: dict[int, float]) -> dict[int, float]:
        gains = [v[r] for r in sorted(v)]
        if any(not 0 <= g <= 1 for g in gains):
            raise ValueError(f"gains must lie in [0, 1], got {v}")
        if any(a > b for a, b in zip(gains, gains[1:], strict=False)):
            raise ValueError(f"gains must not decrease with the rank, got {v}")
        return dict(sorted(v.items()))

    @field_validator("type_share")
    @classmethod
    def _known_types(cls, v: dict[str, float]) -> dict[str, float]:
        bad = [t for t in v if t not in MATRIX_TYPES]
        if bad:
            raise ValueError(f"unknown matrix type(s) {bad}; valid: {list(MATRIX_TYPES)}")
        if any(s < 0 for s in v.values()) or sum(v.values()) <= 0:
            raise ValueError(f"shares must be non-negative and not all 0, got {v}")
        return v

    @field_validator("bits_quality")
    @classmethod
    def _share(cls, v: dict[int, float]) -> dict[int, float]:
        if any(not 0 <= q <= 1 for q in v.values()):
            raise ValueError(f"values must lie in [0, 1], got {v}")
        return v


class Calibration(_Strict):
    """Factors of the cost model, measured by `fedpipe calibrate` (defaults documented in cost.py),
    and optionally of the quality model (`fedpipe calibrate --quality`)."""

    activation_factor: float = Field(1.0, gt=0, description="Multiplier on predicted activation memory.")
    utilisation: float = Field(0.4, gt=0, le=1, description="Fraction of peak TFLOP/s reached.")
    dequant_time: dict[int, float] = Field({4: 1.25, 8: 1.5, 16: 1.0},
                                           description="Step-time multiplier per base precision.")
    runtime_overhead_gib: float = Field(0.5, ge=0, description="Framework memory (CUDA context, "
                                        "allocator slack, Python) per server.")
    quality: QualityCalibration | None = Field(
        None, description="Measured quality model (`fedpipe calibrate --quality`); null: the priors "
        "(rank gain log2(1+r)/log2(1+r_max), importance alone, batch exponent 1/4, "
        "objective.bits_quality).")


class ClusterProfile(_Strict):
    """A federation: the model, the task, the choices, the objective and the servers."""

    name: str | None = Field(None, description="Name used for the plan file; defaults to the file stem.")
    model: str = Field(description="A shape card (e.g. llama-2-7b), a local HF folder, or smollm2-135m.")
    task: Task = Task()
    candidates: Candidates = Candidates()
    aggregation: AggregationRule = Field("flexlora", description=f"{rules_help()}.")
    objective: Objective = Objective()
    calibration: Calibration = Calibration()
    servers: list[Server] = Field(min_length=1)

    @model_validator(mode="after")
    def _consistent(self) -> ClusterProfile:
        names = Counter(m for s in self.servers for m in s.member_names())
        dup = sorted(n for n, c in names.items() if c > 1)
        if dup:
            raise ValueError(f"server names must be unique; repeated: {', '.join(dup)}")
        missing = [d for d in self.candidates.densities if d not in self.objective.density_quality]
        if missing:
            raise ValueError(f"objective.density_quality has no entry for candidates.densities "
                             f"{missing}; it covers {sorted(self.objective.density_quality)}")
        missing = [p for p in self.candidates.precisions if p not in self.objective.precision_quality]
        if missing:
            raise ValueError(f"objective.precision_quality has no entry for candidates.precisions "
                             f"{missing}; it covers {list(self.objective.precision_quality)}")
        self._quality_covers_candidates()
        for s in self.servers:
            if s.bits and not set(s.bits) & set(self.candidates.bits):
                raise ValueError(f"server {s.name!r}: bits {s.bits} share nothing with "
                                 f"candidates.bits {self.candidates.bits}")
        return self

    def _quality_covers_candidates(self) -> None:
        q, c = self.calibration.quality, self.candidates
        if q is None:
            return
        for name, have, need in (("rank_gain", q.rank_gain, [r for r in c.ranks if r > 0]),
                                 ("type_share", q.type_share, c.targets),
                                 ("bits_quality", q.bits_quality, c.bits)):
            missing = [x for x in need if x not in have]
            if missing:
                raise ValueError(f"calibration.quality.{name} has no entry for the candidates "
                                 f"{missing}; it covers {list(have)} (re-run fedpipe calibrate "
                                 "--quality after changing the candidates)")
        top = max(c.ranks)
        if q.rank_gain[top] != 1.0:
            raise ValueError(f"calibration.quality.rank_gain: the top rank {top} must keep 1.0, "
                             f"got {q.rank_gain[top]}")

    def allowed_bits(self, server: Server) -> list[int]:
        return [b for b in self.candidates.bits if not server.bits or b in server.bits]

    @property
    def n_servers(self) -> int:
        return sum(s.count for s in self.servers)


def field_path(loc: tuple, raw: object) -> str:
    """'servers[2] (edge-c).memory_gib' from pydantic's location tuple."""
    parts: list[str] = []
    for i, key in enumerate(loc):
        if isinstance(key, int):
            parts[-1] += f"[{key}]"
            if loc[:i] == ("servers",):
                servers = raw.get("servers") if isinstance(raw, dict) else None
                if isinstance(servers, list) and key < len(servers) and isinstance(servers[key], dict):
                    parts[-1] += f" (server {servers[key].get('name', '?')!r})"
        else:
            parts.append(str(key))
    return ".".join(parts)


def parse_profile(raw: object, source: str = "profile") -> ClusterProfile:
    """Validate a mapping; every problem becomes one line naming its field and server."""
    if not isinstance(raw, dict):
        raise FedpipeError(f"{source}: expected a mapping of fields at the top level, "
                           f"got {type(raw).__name__}")
    try:
        return ClusterProfile.model_validate(raw)
    except ValidationError as e:
        problems = []
        for err in e.errors():
            msg = err["msg"].removeprefix("Value error, ")
            value = err.get("input")
            shown = "" if isinstance(value, dict | list) or err["type"] == "missing" else f" (got {value!r})"
            problems.append(f"{field_path(tuple(err['loc']), raw) or 'profile'}: {msg}{shown}")
        raise FedpipeError(f"{source}: {len(problems)} problem(s) in the profile", problems) from None


def load_profile(path: str | Path) -> ClusterProfile:
    """Read and validate a profile YAML file; its relative paths are resolved against its folder."""
    path = Path(path)
    raw = read_yaml(path, "profile")
    if is_plan(raw):
        raise FedpipeError(f"{path} is a plan, not a profile: run it with `fedpipe run {path}` "
                           f"(or `fedpipe show {path}`)")
    return resolve_paths(parse_profile(raw, str(path)), path.parent)


_Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml's parser: 6-7x faster


def read_yaml(path: Path, kind: str) -> object:
    """The YAML in `path`; a missing file or a folder is named by its absolute path."""
    if path.is_dir():
        found = sorted(p.name for p in path.glob("*.yaml"))[:8]
        raise FedpipeError(f"{kind}: {path.absolute()} is a folder, not a {kind} file",
                           [f"{kind}s there: {', '.join(found)}"] if found else None)
    if not path.is_file():
        raise FedpipeError(f"{kind}: no such file {path.absolute()}")
    try:
        return yaml.load(path.read_text(), Loader=_Loader)
    except yaml.YAMLError as e:
        raise FedpipeError(f"{path}: not valid YAML ({e})") from None


def is_plan(raw: object) -> bool:
    """A plan written by `fedpipe plan` (it records its schema version; a profile never does)."""
    return isinstance(raw, dict) and "schema_version" in raw and "profile" in raw


def is_model_folder(model: str) -> bool:
    """A model named by a folder, not by a shape card (the bundled model has a card too)."""
    return not (CARDS_DIR / f"{model.lower()}.json").is_file()


def is_data_path(dataset: str) -> bool:
    """A dataset given as a file path (not generated, not a Hugging Face source)."""
    return not dataset.startswith(("builtin", "hf:"))


def resolve_against(base_dir: Path, path: str) -> str:
    """`path` as an absolute path, a relative one read from `base_dir` (not the working folder)."""
    return os.path.abspath(base_dir / Path(path).expanduser())


def resolve_paths(profile: ClusterProfile, base_dir: Path) -> ClusterProfile:
    """The profile with its model folder and data file made absolute against `base_dir`, so it
    means the same from every working folder. A `hf:` name stays a name unless it is a folder there."""
    update: dict = {}
    if is_model_folder(profile.model):
        update["model"] = resolve_against(base_dir, profile.model)
    dataset = profile.task.dataset
    if is_data_path(dataset):
        dataset = resolve_against(base_dir, dataset)
    elif dataset.startswith("hf:") and (base_dir / dataset[3:]).exists():
        dataset = "hf:" + resolve_against(base_dir, dataset[3:])
    if dataset != profile.task.dataset:
        update["task"] = profile.task.model_copy(update={"dataset": dataset})
    return profile.model_copy(update=update) if update else profile


def check_objective_kind(kind: str) -> None:
    """An unknown ``--objective`` is an error naming the valid ones."""
    valid = get_args(ObjectiveKind)
    if kind not in valid:
        raise FedpipeError(f"--objective: unknown objective {kind!r}", [f"valid: {', '.join(valid)}"])


def with_objective(profile: ClusterProfile, kind: str | None) -> ClusterProfile:
    """The profile with `objective.kind` replaced (``fedpipe plan --objective``); None keeps it."""
    if kind is None or kind == profile.objective.kind:
        return profile
    check_objective_kind(kind)
    return profile.model_copy(update={"objective": profile.objective.model_copy(update={"kind": kind})})


def load_profile_and_shapes(path: str | Path) -> tuple[ClusterProfile, ModelShapes]:
    """The profile and its model's shapes; a model folder is looked up next to the profile."""
    path = Path(path)
    profile = load_profile(path)
    return profile, load_shapes(profile.model, path.parent)
