"""How much adapting each weight matrix is expected to help: the planner's value per matrix.

A report maps full module names to non-negative scores and says which scorer produced them
(the scorers and their formulas are in `fedpipe.scorers`). `compute_report` scores a profile's
federation the way it would run for real:

- data: the profile's task (dataset, seed, held-out split, partition) gives each server its shard,
  dealt per member exactly as ``fedpipe run`` deals them. A profile entry with ``count: c`` is
  scored as one server on the union of its c members' shards, weighted by c x samples: its
  members are identical hardware that the planner treats as one class, and scoring every member
  would multiply the cost by c.
- each server scores its own shard on the base model at 16 bits (fp32 on CPU): ``batches``
  calibration batches of ``batch_size`` examples at the profile's ``seq_len``. Only one float per
  matrix leaves a server, never its data. Here all servers share one loaded model, and each batch
  runs as one packed sequence (`fedpipe.gradients.AnswerLoss`: the shared prompt prefix once, no
  padding, logits only at answer tokens): the plain pass's scores, up to float noise, for 60 % of
  its CPU time on the shipped cluster (README, importance).
- the server combines the vectors weighted by sample counts (`fedpipe.scorers.combine`), so the
  report's scores are shares that sum to 1.

Reports are cached under ``cache_dir()/importance`` keyed by model + data + scorer (see
`ScoringRequest.key`). The data-free ``prior`` needs only shapes and is the fallback whenever
weights are missing. ``fedpipe plan`` never scores on its own: by default (``--importance
auto``) it plans with the latest report ``fedpipe importance`` made for the profile's model and
data, else with the prior, and the plan records the scorer, digest and source
(`importance_for_plan`); the CLI says when it picked up a cached report (`auto_notice`).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from fedpipe.atomic import write_atomic
from fedpipe.cache import cache_dir, weights_dir
from fedpipe.digest import file_sha256
from fedpipe.errors import FedpipeError
from fedpipe.profile import ClusterProfile, load_profile_and_shapes
from fedpipe.scorers import DEFAULT_SCORER, SCORERS, Scorer, combine, depth_scores, get_scorer
from fedpipe.shapes import ModelShapes

DEFAULT_BATCHES = 8
DEFAULT_BATCH_SIZE = 4
_OPTIONAL_FIELDS = ("servers", "settings")  # left out of the digest while unset (older reports)


class ImportanceReport(BaseModel):
    """Scores per matrix and their provenance."""

    model_config = ConfigDict(extra="forbid")

    scorer: str = Field(description="Name of the scorer that produced the scores.")
    model: str = Field(description="Model the scores belong to.")
    data: str | None = Field(None, description="Data the scores were computed on (None: data-free).")
    scores: dict[str, float] = Field(description="Full module name -> non-negative score.")
    servers: dict[str, int] | None = Field(
        None, description="Server (profile entry) -> samples its scores were weighted by.")
    settings: dict[str, Any] | None = Field(
        None, description="Calibration settings: batches, batch_size, seq_len, seed, targets, "
        "scorer parameters, cache key.")

    def digest(self) -> str:
        """A short content hash, recorded in the plan."""
        dump = self.model_dump()
        for key in _OPTIONAL_FIELDS:
            if dump[key] is None:
                del dump[key]
        blob = json.dumps(dump, sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    def normalised(self, names: list[str]) -> dict[str, float]:
        """Scores of `names` scaled to sum to 1 (uniform when all are zero or missing)."""
        raw = {n: max(0.0, self.scores.get(n, 0.0)) for n in names}
        total = sum(raw.values())
        return {n: (v / total if total > 0 else 1 / len(names)) for n, v in raw.items()}

    def ranked(self) -> list[tuple[str, float]]:
        """(module, score) from most to least important; ties in module order."""
        return sorted(self.scores.items(), key=lambda kv: -kv[1])


def depth_prior(shapes: ModelShapes) -> ImportanceReport:
    """The data-free prior: later layers score higher (`fedpipe.scorers.depth_scores`)."""
    return ImportanceReport(scorer="prior", model=shapes.name, scores=depth_scores(shapes))


def load_report(path: str | Path) -> ImportanceReport:
    """Read an importance report written as YAML or JSON."""
    path = Path(path)
    if not path.is_file():
        raise FedpipeError(f"--importance: no such file {path.absolute()}")
    try:
        return ImportanceReport.model_validate(yaml.safe_load(path.read_text()))
    except (yaml.YAMLError, ValidationError) as e:
        raise FedpipeError(f"--importance: {path} is not an importance report ({e})") from None


def save_report(report: ImportanceReport, path: str | Path, *, as_json: bool = False) -> Path:
    """Write `report` atomically: JSON for a .json path (or `as_json`), YAML otherwise."""
    path = Path(path)
    dump = report.model_dump(exclude_none=True)
    text = (json.dumps(dump, indent=2) + "\n" if as_json or path.suffix.lower() == ".json"
            else yaml.safe_dump(dump, sort_keys=False))
    return write_atomic(path, text)


def check_covers(report: ImportanceReport, names: list[str], source: str) -> None:
    """A report used for planning must score every candidate matrix."""
    missing = [n for n in names if n not in report.scores]
    if missing:
        raise FedpipeError(
            f"importance report {source} (scorer {report.scorer}, model {report.model}) has no "
            f"score for {len(missing)} of the {len(names)} candidate matrices",
            [f"first missing: {', '.join(missing[:3])}",
             "score the same model and candidate targets: `fedpipe importance PROFILE`"])


# ----------------------------------------------------------------------------- one request


@dataclass(frozen=True)
class ScoringRequest:
    """Everything that determines a report: profile (model, task, servers), scorer, settings."""

    profile_path: Path
    profile: ClusterProfile
    shapes: ModelShapes
    scorer: Scorer
    batches: int = DEFAULT_BATCHES
    batch_size: int = DEFAULT_BATCH_SIZE
    seq_len: int | None = None  # None: the profile's task.seq_len
    seed: int | None = None  # calibration seed (which batches are drawn); None: task.seed

    @classmethod
    def make(cls, profile_path: str | Path, scorer: str = DEFAULT_SCORER, *,
             batches: int = DEFAULT_BATCHES, batch_size: int = DEFAULT_BATCH_SIZE,
             seq_len: int | None = None, seed: int | None = None) -> ScoringRequest:
        """Validate the settings, load the profile and its model's shapes."""
        problems = [f"{label} must be a whole number >= 1, got {value!r}"
                    for label, value in (("batches", batches), ("batch_size", batch_size),
                                         ("seq_len", 1 if seq_len is None else seq_len))
                    if isinstance(value, bool) or not isinstance(value, int) or value < 1]
        if problems:
            raise FedpipeError("importance: bad calibration settings", problems)
        spec = get_scorer(scorer)
        profile_path = Path(profile_path)
        profile, shapes = load_profile_and_shapes(profile_path)
        return cls(profile_path, profile, shapes, spec, batches, batch_size, seq_len, seed)

    @property
    def candidates(self) -> list[str]:
        return [m.name for m in self.shapes.candidates(self.profile.candidates.targets)]

    @property
    def task_seq_len(self) -> int:
        return self.seq_len or self.profile.task.seq_len

    @property
    def calibration_seed(self) -> int:
        return self.profile.task.seed if self.seed is None else self.seed

    def sample_weights(self) -> dict[str, int]:
        """Samples per scored server: one per profile entry (count x samples)."""
        return {s.name: s.samples * s.count for s in self.profile.servers}

    def settings(self) -> dict[str, Any]:
        return {"batches": self.batches, "batch_size": self.batch_size,
                "seq_len": self.task_seq_len, "seed": self.calibration_seed,
                "targets": list(self.profile.candidates.targets), **self.scorer.settings}

    def data_description(self) -> str:
        t = self.profile.task
        part = f"dirichlet(alpha={t.dirichlet_alpha})" if t.partition == "dirichlet" else t.partition
        return (f"{t.dataset}, {part} partition, seed {t.seed}, {len(self.profile.servers)} servers; "
                f"{self.batches} x {self.batch_size} examples per server at seq_len "
                f"{self.task_seq_len}, calibration seed {self.calibration_seed}")

    def _model_and_data(self, model_dir: Path) -> dict[str, Any]:
        weights = sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns)
                         for p in model_dir.glob("*.safetensors"))
        task = self.profile.task
        dataset = Path(_dataset_source(self))
        return {
            "model": {"name": self.profile.model,
                      "config": file_sha256(model_dir / "config.json"), "weights": weights},
            "data": {"task": task.model_dump(include={"dataset", "partition", "dirichlet_alpha",
                                                      "eval_samples", "seed"}),
                     "file": file_sha256(dataset) if dataset.is_file() else None,
                     "servers": [(s.name, s.samples, s.count) for s in self.profile.servers],
                     "targets": list(self.profile.candidates.targets)},
        }

    def key(self, model_dir: Path) -> str:
        """Cache key: hash of the model's identity, the data and the scorer with its settings.

        Model: config.json bytes and each weight file's name, size and modification time
        (hashing half a gigabyte on every `fedpipe plan` would be slow). Data: the task fields
        that shape the shards, the dataset file's sha256 when it is a file, each entry's sample
        count and count, the candidate targets. Scorer: name, version, parameters and
        calibration settings.
        """
        blob = {**self._model_and_data(model_dir),
                "scorer": {"name": self.scorer.name, "version": self.scorer.version,
                           **self.settings()}}
        return hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()[:20]

    def cache_path(self, model_dir: Path) -> Path:
        return _cache_root() / f"{self._slug()}-{self.scorer.name}-{self.key(model_dir)}.json"

    def latest_path(self, model_dir: Path) -> Path:
        """A pointer to the latest cached report for this model and data (any scorer, any
        settings): what ``fedpipe plan --importance auto`` picks up."""
        blob = json.dumps(self._model_and_data(model_dir), sort_keys=True).encode()
        return _cache_root() / f"{self._slug()}-latest-{hashlib.sha256(blob).hexdigest()[:20]}.json"

    def _slug(self) -> str:
        return "".join(c if c.isalnum() or c in "-_." else "_" for c in Path(self.profile.model).name)


def _cache_root() -> Path:
    return cache_dir() / "importance"


# ----------------------------------------------------------------------------- the federation


def server_shards(request: ScoringRequest) -> dict[str, list]:
    """Each server's (profile entry's) training data, dealt as a run deals it.

    As `fedpipe.federation.spec.plan_data` deals it when every server trains: the pool is the task's
    dataset (builtin: enough of every family that a skewed shard never repeats examples), the
    held-out examples are removed first, then `fedpipe.data.partition` deals the rest over the
    individual members. An entry's data is the union of its members' shards.
    """
    from fedpipe.data import load_examples, partition, split_holdout
    from fedpipe.tasks import FAMILIES

    task = request.profile.task
    members = {m: s for s in request.profile.servers for m in s.member_names()}
    needed = (sum(s.samples for s in members.values()) + task.eval_samples) * len(FAMILIES)
    examples = load_examples(_dataset_source(request),
                             needed if task.dataset.startswith("builtin") else None, task.seed)
    if len(examples) <= task.eval_samples:
        raise FedpipeError(
            f"task.dataset {task.dataset!r}: {len(examples)} examples leave no training data "
            f"after holding out task.eval_samples = {task.eval_samples}",
            ["lower task.eval_samples or add examples"])
    train, _ = split_holdout(examples, task.eval_samples, task.seed)
    shards = partition(train, {m: s.samples for m, s in members.items()}, task.partition,
                       task.dirichlet_alpha, task.seed)
    out: dict[str, list] = {s.name: [] for s in request.profile.servers}
    for member, server in members.items():
        out[server.name] += shards[member]
    return out


def _dataset_source(request: ScoringRequest) -> str:
    """The task's dataset as given (as a run reads it), or next to the profile when only there."""
    dataset = request.profile.task.dataset
    if dataset.startswith(("builtin", "hf:")) or Path(dataset).exists():
        return dataset
    beside = request.profile_path.parent / dataset
    return str(beside) if beside.exists() else dataset


class ScoringProgress(Protocol):
    """What scoring reports while it runs (the CLI draws a bar and a line per server)."""

    def batch_done(self, server: str) -> None: ...

    def server_done(self, server: str, batches: int, seconds: float) -> None: ...


def score_shards(model: Any, tokenizer: Any, shards: dict[str, list], weights: dict[str, float],
                 names: list[str], scorer: Scorer, *, batches: int, batch_size: int,
                 seq_len: int, seed: int,
                 progress: ScoringProgress | None = None) -> dict[str, float]:
    """Score each server on its own shard, then combine by sample weight (shares sum to 1).

    Each server draws `batches` x `batch_size` examples from its shard (seeded by `seed` and the
    server's name; a small shard is cycled) and runs `fedpipe.gradients.score_server`. The
    servers share the loaded model and one `AnswerLoss` (packed batches, checked once).
    """
    from fedpipe.data import cycle_batches, encode
    from fedpipe.gradients import AnswerLoss, score_server

    empty = [name for name, shard in shards.items() if not shard]
    if empty:
        raise FedpipeError(f"no data for server(s) {', '.join(map(repr, empty))}: every server "
                           "scores on its own shard",
                           ["give each server samples >= 1 and a dataset with examples"])
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    loss = AnswerLoss(model)
    per_server = {}
    for server, shard in shards.items():
        start = time.perf_counter()
        need = batches * batch_size
        rng = random.Random(f"fedpipe-importance:{seed}:{server}")
        picked = rng.sample(shard, min(need, len(shard)))
        encoded = encode(picked, tokenizer, seq_len)
        stream = itertools.islice(cycle_batches(encoded, batch_size, seed, pad), batches)
        per_server[server] = score_server(
            model, stream, names, scorer.accumulator(), loss=loss,
            on_batch=None if progress is None else (lambda s=server: progress.batch_done(s)))
        if progress is not None:
            progress.server_done(server, batches, time.perf_counter() - start)
    return combine(per_server, weights)


@dataclass
class ScoringResult:
    """A report and how it was obtained."""

    report: ImportanceReport
    cache_path: Path | None  # where it is cached (None for data-free scorers)
    cached: bool  # True: loaded from the cache, nothing was computed
    seconds: float


def _read_cached(path: Path) -> ImportanceReport | None:
    try:
        return ImportanceReport.model_validate_json(path.read_text())
    except (OSError, ValidationError):
        return None  # missing or damaged: recompute


def _point_latest(pointer: Path, report_path: Path) -> None:
    write_atomic(pointer, json.dumps({"report": str(report_path)}) + "\n")


def _follow_latest(pointer: Path) -> tuple[ImportanceReport, Path] | None:
    try:
        target = Path(json.loads(pointer.read_text())["report"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    report = _read_cached(target)
    return None if report is None else (report, target)


def compute_report(request: ScoringRequest, *, use_cache: bool = True, set_latest: bool = True,
                   device: str = "cpu", progress: ScoringProgress | None = None) -> ScoringResult:
    """The importance report for a profile: from the cache, or scored on the servers' data.

    Data-free scorers return at once. Gradient scorers need the weights (the bundled model or a
    local folder) and refuse shape cards with a pointer to ``--scorer prior``. A computed report
    is always cached; `use_cache` False recomputes instead of reading it. `set_latest` makes it
    the one ``fedpipe plan --importance auto`` picks up for this model and data (benchmarks
    turn that off). `device` runs the base model there (cuda: bf16, cpu: fp32); it is
    not part of the cache key. `progress` hears of every batch and every scored server.
    """
    start = time.perf_counter()
    profile, scorer = request.profile, request.scorer
    shapes = request.shapes
    names = request.candidates
    if not scorer.needs_weights:
        scores = scorer.from_shapes(shapes)
        report = ImportanceReport(scorer=scorer.name, model=profile.model,
                                  scores={n: scores[n] for n in names})
        return ScoringResult(report, None, False, time.perf_counter() - start)

    from fedpipe.models import find_weights  # torch, and the bundled model's first-use conversion

    model_dir = find_weights(profile.model, request.profile_path.parent)
    if model_dir is None:
        raise FedpipeError(
            f"scorer {scorer.name!r} needs the weights of model {profile.model!r}, and they are "
            "not on this machine (a shape card plans without weights)",
            ["use the data-free scorer: --scorer prior (fedpipe plan: --importance prior)",
             "or point `model:` at a local Hugging Face folder with safetensors weights"])
    seq_len = request.task_seq_len
    if seq_len > shapes.max_positions:
        raise FedpipeError(
            f"seq_len {seq_len} is longer than the context of model {profile.model!r} "
            f"({shapes.max_positions} positions, config max_position_embeddings)",
            [f"use seq_len <= {shapes.max_positions} (task.seq_len or --seq-len)"])
    cache_path = request.cache_path(model_dir)
    if use_cache and (hit := _read_cached(cache_path)) is not None:
        if set_latest:
            _point_latest(request.latest_path(model_dir), cache_path)
        return ScoringResult(hit, cache_path, True, time.perf_counter() - start)

    from fedpipe.models import load_base, load_tokenizer

    shards = server_shards(request)
    model = load_base(model_dir, 16, device=device)
    scores = score_shards(model, load_tokenizer(model_dir), shards, request.sample_weights(),
                          names, scorer, batches=request.batches, batch_size=request.batch_size,
                          seq_len=seq_len, seed=request.calibration_seed, progress=progress)
    report = ImportanceReport(
        scorer=scorer.name, model=profile.model, data=request.data_description(),
        scores={n: scores[n] for n in names}, servers=request.sample_weights(),
        settings={**request.settings(), "cache_key": request.key(model_dir)})
    save_report(report, cache_path, as_json=True)
    if set_latest:
        _point_latest(request.latest_path(model_dir), cache_path)
    return ScoringResult(report, cache_path, False, time.perf_counter() - start)


# ----------------------------------------------------------------------------- planning


AUTO = "auto"


def auto_notice(choice: str | None, report: ImportanceReport | None, source: str | None) -> str | None:
    """A line for the user when ``--importance auto`` planned with a cached report: whichever
    ``fedpipe importance`` ran last for this model and data (any scorer, any settings) changes
    the plan, and a plan that changes with the machine's cache must not do so silently."""
    if (choice or AUTO).strip().lower() != AUTO or report is None:
        return None
    made = report.settings or {}
    how = (f", {made['batches']} x {made['batch_size']} examples per server, seed {made['seed']}"
           if {"batches", "batch_size", "seed"} <= set(made) else "")
    return (f"--importance auto plans with the {report.scorer} report cached at {source}{how} "
            "(the latest `fedpipe importance` made for this model and data); "
            "--importance prior plans without it")


def importance_for_plan(profile_path: str | Path,
                        choice: str | None) -> tuple[ImportanceReport | None, str | None]:
    """What ``fedpipe plan --importance CHOICE`` plans with: (report, source), or (None, None)
    for the planner's built-in data-free prior.

    - ``auto`` (the default, also None): the latest report that ``fedpipe importance`` (or a
      scorer name here) made for this profile's model and data, whatever the scorer and
      settings; else the data-free prior. Planning never starts a slow scoring run on its own,
      and never converts the bundled model.
    - a scorer name (``sensitivity``, ``fisher``, ``prior``): that report, from the cache or
      computed now (a minute or so for SmolLM2 on CPU).
    - a path to a report file (YAML/JSON), e.g. written by ``fedpipe importance``.

    The source is a loadable path (the file or the cached report), so ``fedpipe explain`` can
    reload the scores the plan was made with.
    """
    profile_path = Path(profile_path)
    choice = AUTO if choice is None else choice
    if Path(choice).is_file():
        report, source = load_report(choice), choice
    elif choice.strip().lower() == AUTO:
        request = ScoringRequest.make(profile_path)
        model_dir = weights_dir(request.profile.model, profile_path.parent)
        found = None if model_dir is None else _follow_latest(request.latest_path(model_dir))
        if found is None:
            return None, None
        report, source = found[0], str(found[1])
    elif choice.strip().lower() in SCORERS:
        result = compute_report(ScoringRequest.make(profile_path, choice))
        if result.cache_path is None:  # data-free: the planner's own prior
            return None, None
        report, source = result.report, str(result.cache_path)
    else:
        raise FedpipeError(f"--importance: {choice!r} is neither a report file nor a scorer",
                           [f"valid: {AUTO}, {', '.join(SCORERS)}, or a path to a report "
                            "written by `fedpipe importance`"])
    check_covers(report, ScoringRequest.make(profile_path).candidates, source)
    return report, source
