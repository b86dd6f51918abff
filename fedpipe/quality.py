"""`fedpipe calibrate --quality`: probe runs that measure the planner's quality model.

The planner values a plan by its quality (``fedpipe.planning.problem``): per server, the
importance of the matrices it adapts times a rank gain g(r), times what its base precision and
batch keep. Each of those is a prior until measured. A probe trains a fresh LoRA on the
profile's model (real weights: quality cannot be measured on random ones) and task data for
`steps` AdamW steps, and measures how far the held-out answer loss falls ("drop"). All probes of
a seed share the LoRA initialisation, the order of the data, the learning rate and the held-out
set, and differ from the reference (every candidate matrix at the top rank, 16-bit base, the
largest batch) in one thing only:

    probe                                   fits (``profile.QualityCalibration``)
    every candidate matrix at rank r        rank_gain[r] = drop(r) / drop(ref), non-decreasing
    one matrix type t alone, top rank       type_share[t] = drop(t) / sum over types of drop
    batch b < the largest                   batch_exponent: least squares of
                                            log(drop(b) / drop(ref)) on log(b / b_max)
    base quantized to q < 16 bits           bits_quality[q] = drop(q) / drop(ref)

A quantized probe trains against the quantized base but is evaluated on the 16-bit base, as the
global model is: what the federation keeps of that server's work. With several seeds the drops
are averaged per probe before the fit. Communication density and wire precision are not probed
here: what top-k and rounding lose is carried across rounds by error feedback, so they are
measured over many rounds by benchmarks/bench_bytes.py (``objective.density_quality`` and
``precision_quality``). How well the fitted model ranks real plans: benchmarks/bench_quality.py.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Literal

import yaml

from fedpipe.atomic import write_atomic
from fedpipe.errors import FedpipeError
from fedpipe.profile import ClusterProfile, QualityCalibration, load_profile_and_shapes
from fedpipe.shapes import ModelShapes

Factor = Literal["reference", "rank", "type", "batch", "bits"]


@dataclass(frozen=True)
class Probe:
    """One probe run's configuration: what it varies from the reference, and to what."""

    factor: Factor
    level: int | str | None
    bits: int
    batch: int
    rank: int
    types: tuple[str, ...]

    @property
    def label(self) -> str:
        return {"reference": "reference", "rank": f"rank {self.level}", "type": f"{self.level} alone",
                "batch": f"batch {self.level}", "bits": f"{self.level}-bit base"}[self.factor]


def probes(profile: ClusterProfile) -> list[Probe]:
    """The reference and one probe per other level of every quality factor the profile can choose."""
    c = profile.candidates
    top, b_max, targets = max(c.ranks), max(c.batch_sizes), tuple(c.targets)
    out = [Probe("reference", None, 16, b_max, top, targets)]
    out += [Probe("rank", r, 16, b_max, r, targets) for r in c.ranks if 0 < r < top]
    if len(targets) > 1:
        out += [Probe("type", t, 16, b_max, top, (t,)) for t in targets]
    out += [Probe("batch", b, 16, b, top, targets) for b in c.batch_sizes if b < b_max]
    out += [Probe("bits", q, q, b_max, top, targets) for q in c.bits if q < 16]
    return out


# ----------------------------------------------------------------------------- the fit (pure)


def fit_quality(profile: ClusterProfile, drops: dict[Probe, float], note: str = "") -> QualityCalibration:
    """The quality calibration from each probe's mean loss drop (module docstring)."""
    c = profile.candidates
    ref = next(d for p, d in drops.items() if p.factor == "reference")
    if ref <= 0:
        raise FedpipeError(f"calibrate --quality: the reference probe did not learn (held-out loss "
                           f"drop {ref:+.4f})", ["give the probes more steps (--probe-steps) or "
                                                 "check task.learning_rate"])
    by = {(p.factor, p.level): d for p, d in drops.items()}
    gains, best = {}, 0.0
    for r in sorted(r for r in c.ranks if r > 0):
        measured = 1.0 if r == max(c.ranks) else min(1.0, max(0.0, by[("rank", r)] / ref))
        best = max(best, measured)  # a lower rank cannot keep more than a higher one: a dip is noise
        gains[r] = round(best, 4)
    if len(c.targets) > 1:
        kept = {t: max(0.0, by[("type", t)]) for t in c.targets}
        if sum(kept.values()) <= 0:
            raise FedpipeError("calibrate --quality: no matrix type alone lowered the held-out loss",
                               ["give the probes more steps (--probe-steps)"])
        shares = {t: round(v / sum(kept.values()), 4) for t, v in kept.items()}
    else:
        shares = {c.targets[0]: 1.0}
    b_max = max(c.batch_sizes)
    points = [(math.log(b / b_max), math.log(max(by[("batch", b)], 1e-6 * ref) / ref))
              for b in c.batch_sizes if b < b_max]
    exponent = (sum(x * y for x, y in points) / sum(x * x for x, _ in points)) if points else 0.25
    bits = {q: 1.0 if q == 16 else round(min(1.0, max(0.0, by[("bits", q)] / ref)), 4)
            for q in sorted(set(c.bits) | {16})}
    return QualityCalibration(rank_gain=gains, type_share=shares,
                              batch_exponent=round(min(2.0, max(0.0, exponent)), 4),
                              bits_quality=bits, probes=note)


# ----------------------------------------------------------------------------- measuring


def parse_seeds(text: str) -> list[int]:
    """'0,1' -> [0, 1]; errors name --seeds."""
    parts = [x.strip() for x in str(text).split(",")]
    if not parts or not all(x.isdigit() for x in parts):
        raise FedpipeError(f"--seeds: {text!r} is not a comma-separated list of whole numbers "
                           "(e.g. 0,1)")
    return sorted({int(x) for x in parts})


@dataclass
class ProbeRow:
    probe: Probe
    losses: list[float]  # held-out loss after the probe, per seed
    drop: float  # mean over seeds of base loss - loss
    seconds: float


@dataclass
class QualityResult:
    profile: ClusterProfile
    base_loss: float
    rows: list[ProbeRow]
    calibration: QualityCalibration
    settings: dict


def run_quality_probes(profile_path: str | Path, *, steps: int = 20, seeds: Sequence[int] = (0,),
                       eval_samples: int = 64, device: str = "cpu",
                       on_probe: Callable[[str, int, int], None] | None = None) -> QualityResult:
    """Run every probe (`probes`) for every seed on the profile's model and data; fit the result.
    `on_probe(label, done, total)` is called before each run."""
    from fedpipe.data import encode, load_examples, split_holdout
    from fedpipe.models import find_weights, load_tokenizer

    if steps < 1:
        raise FedpipeError(f"--probe-steps: {steps} must be at least 1")
    if eval_samples < 1:
        raise FedpipeError(f"--eval-samples: {eval_samples} must be at least 1")
    profile, shapes = load_profile_and_shapes(profile_path)
    folder = find_weights(profile.model, Path(profile_path).parent)
    if folder is None:
        raise FedpipeError(f"calibrate --quality: the profile's model {profile.model!r} has no "
                           "weights here, and quality cannot be measured on random ones",
                           ["use a local Hugging Face folder or smollm2-135m as the profile's model"])
    task, c = profile.task, profile.candidates
    tokenizer = load_tokenizer(folder)
    needed = steps * max(c.batch_sizes) + eval_samples + 64
    examples = load_examples(task.dataset, n=needed if task.dataset.startswith("builtin") else None,
                             seed=task.seed)
    train, held = split_holdout(examples, eval_samples, task.seed)
    encoded = encode(train, tokenizer, task.seq_len)
    runner = _Runner(profile, shapes, folder, tokenizer, encoded, held, steps, device)
    base = runner.base_loss()
    todo = probes(profile)
    rows, total = [], len(todo) * len(seeds)
    for i, probe in enumerate(todo):
        start, losses = time.perf_counter(), []
        for j, seed in enumerate(seeds):
            if on_probe:
                on_probe(probe.label, i * len(seeds) + j, total)
            losses.append(runner.loss_after(probe, seed))
        rows.append(ProbeRow(probe, losses, statistics.mean(base - x for x in losses),
                             time.perf_counter() - start))
    note = (f"{steps} steps per probe, seeds {','.join(map(str, seeds))}, {eval_samples} held-out "
            f"examples of {task.dataset}, lr {task.learning_rate:g}, base loss {base:.4f}")
    fitted = fit_quality(profile, {r.probe: r.drop for r in rows}, note)
    settings = {"steps": steps, "seeds": list(seeds), "eval_samples": eval_samples, "device": device}
    return QualityResult(profile, base, rows, fitted, settings)


class _Runner:
    """Trains and evaluates probes on one model folder, data and held-out set."""

    def __init__(self, profile: ClusterProfile, shapes: ModelShapes, folder: Path, tokenizer,
                 encoded: list[dict], held: list, steps: int, device: str) -> None:
        self.profile, self.shapes, self.folder, self.tokenizer = profile, shapes, folder, tokenizer
        self.encoded, self.held, self.steps, self.device = encoded, held, steps, device

    def _loss(self, model) -> float:
        from fedpipe.data import evaluate

        return evaluate(model, self.tokenizer, self.held, self.profile.task.seq_len,
                        accuracy=False)["loss"]

    def base_loss(self) -> float:
        from fedpipe.models import load_base

        return self._loss(load_base(self.folder, 16, device=self.device))

    def loss_after(self, probe: Probe, seed: int) -> float:
        from fedpipe.data import cycle_batches
        from fedpipe.models import attach_lora, get_factors, load_base, set_factors
        from fedpipe.train import train_steps

        ranks = {m.name: probe.rank for m in self.shapes.candidates(list(probe.types))}
        alpha = self.profile.candidates.lora_alpha_ratio

        def adapted(bits: int):
            return attach_lora(load_base(self.folder, bits, device=self.device), ranks,
                               alpha_ratio=alpha, seed=seed)

        model = adapted(probe.bits)
        batches = cycle_batches(self.encoded, probe.batch, seed=seed,
                                pad_id=self.tokenizer.pad_token_id)
        train_steps(model, batches, self.steps, self.profile.task.learning_rate)
        if probe.bits != 16:  # the federation evaluates (and keeps) the update on the 16-bit base
            factors = get_factors(model)
            del model
            model = adapted(16)
            set_factors(model, factors)
        return self._loss(model)


# ----------------------------------------------------------------------------- the output


def quality_yaml(result: QualityResult, command: str) -> str:
    """The profile's `calibration:` block with the fitted `quality:` in it, and the probes' figures
    as comments."""
    block = result.profile.calibration.model_copy(update={"quality": result.calibration})
    when = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines = [f"# {command}", f"# measured {when}: {result.calibration.probes}",
             "# held-out loss drop per probe (mean over seeds; the reference: every candidate "
             "matrix at the top rank, 16-bit, the largest batch):"]
    lines += [f"#   {r.probe.label:<22} {r.drop:+.4f}  ({r.seconds:.0f} s)" for r in result.rows]
    lines.append("# Paste this block at the top level of the cluster profile (replacing any "
                 "calibration:); the cost factors are the profile's own, unchanged.")
    return "\n".join(lines) + "\n" + yaml.safe_dump({"calibration": block.model_dump()},
                                                     sort_keys=False)


def quality_view(result: QualityResult):
    """Each probe's drop against the reference's, and the fitted model."""
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    ref = next(r.drop for r in result.rows if r.probe.factor == "reference")
    table = Table(title=f"Quality probes (base model held-out loss {result.base_loss:.4f})")
    for col in ("probe", "loss after (per seed)", "drop", "of the reference", "seconds"):
        table.add_column(col, justify="left" if col == "probe" else "right")
    for r in result.rows:
        table.add_row(r.probe.label, " ".join(f"{x:.4f}" for x in r.losses), f"{r.drop:+.4f}",
                      f"{r.drop / ref:.2f}", f"{r.seconds:.0f}")
    q = result.calibration
    fitted = Text("\n".join([
        "fitted: rank gain " + ", ".join(f"r{r} {g:.2f}" for r, g in q.rank_gain.items()),
        "        type share " + ", ".join(f"{t} {v:.2f}" for t, v in q.type_share.items()),
        f"        batch exponent {q.batch_exponent:.2f} (prior 0.25); bits quality "
        + ", ".join(f"{b}-bit {v:.2f}" for b, v in q.bits_quality.items())]))
    return Group(table, fitted)


def write_quality(result: QualityResult, path: str | Path, command: str) -> Path:
    return write_atomic(path, quality_yaml(result, command))
