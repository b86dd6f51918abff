"""`fedpipe calibrate`: measure LoRA training here, fit the cost model's factors to it.

The cost model (``fedpipe.planning.cost``) has four calibrated factors (``fedpipe.profile.Calibration``).
This module measures, on the local machine, the step time and peak memory of LoRA training of a
profile's model at each base precision x batch size, and fits those factors so the predictions
hold against the measurements.

What runs: a fresh Python subprocess per configuration loads the model at the given bits (the real
weights when the profile's model has them, e.g. the bundled SmolLM2; otherwise a random-weight
model built from the shape card's config, which costs the same time and memory), attaches LoRA at
one rank on every candidate matrix, and takes one warm-up and N timed AdamW steps on a fixed batch
of exactly batch x seq_len random tokens (the cost model's assumption; real batches pad only to
their longest example, so real steps are often shorter than predicted).

What is measured, and held against the *whole* prediction (runtime overhead included):
- step time: the median of the timed steps (CUDA synchronised).
- memory on a CPU: the process's peak resident set during training (Linux VmHWM, reset through
  /proc/self/clear_refs right before the first step, so exact and not sampled; where that is not
  possible it is sampled every 5 ms). It holds the interpreter and libraries, the model, the
  adapters, their gradients and AdamW state and the activations: what a server must have.
- memory on CUDA: device memory in use before the model (CUDA context and libraries, read from
  cudaMemGetInfo, so it assumes no other process uses the GPU) + the allocator's peak reserved
  memory. The allocator's peak allocated memory is recorded too.
  On a CPU two things outside the formulas used to show up here, and `models.load_base` now
  removes both: glibc kept freed activation buffers (below its 32 MiB mmap threshold) in the
  heap, so the resident set was about twice the live activations and erratic (see
  `fedpipe.allocator`: under jemalloc nothing is needed, under glibc the mmap threshold is set to
  1 MiB, at a measured step-time cost); and transformers kept the fp32 checkpoint's memory map
  alive after quantizing, so 4- and 8-bit processes held about the 16-bit weights in
  file-backed pages too (the unquantized tensors now get their own copies). The measuring
  processes inherit this process's environment, so they run with the allocator fedpipe was
  started with (LD_PRELOAD), as training does; each records which one it ran with.
  See benchmarks/results/predictions-cpu.txt and benchmarks/results/allocator-cpu.txt.
- runtime: the process before the model is loaded (RSS after imports on a CPU, the context on
  CUDA), recorded for reference and as the fallback overhead.

The fit (closed form; see `fit_calibration`):
- utilisation from the 16-bit points (dequant_time[16] = 1 by definition), least squares on the
  relative error (so small and large configurations count alike), relative to the declared
  TFLOP/s of the profile server this machine stands for (`server`);
- dequant_time[q] for every other measured q, given that utilisation, the same way;
- memory: measured - (base weights + LoRA state + logits) = runtime_overhead_gib +
  activation_factor x (per-layer activations), by ordinary least squares over all points (two or
  more batch sizes separate the two; with one, the overhead is the measured runtime).
Base-weight bytes, LoRA state and logits are formulas, not factors: their error stays visible.

The result is a YAML ``calibration:`` block to paste into the profile (top level).
"""

from __future__ import annotations

import gc
import json
import math
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import yaml

from fedpipe.atomic import write_atomic
from fedpipe.cache import BUNDLED
from fedpipe.errors import FedpipeError
from fedpipe.planning.cost import GIB, LOGIT_BYTES, CostModel, server_cost
from fedpipe.profile import Calibration, ClusterProfile, Server, load_profile_and_shapes
from fedpipe.shapes import CARDS_DIR, ModelShapes

NEUTRAL = Calibration(activation_factor=1.0, utilisation=1.0, dequant_time={4: 1.0, 8: 1.0, 16: 1.0},
                      runtime_overhead_gib=0.0)
MIN_ACTIVATION_FACTOR = 0.05
_MODEL_TYPES = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral", "Qwen2ForCausalLM": "qwen2"}


# ----------------------------------------------------------------------------- what is calibrated


@dataclass(frozen=True)
class Setup:
    """The model, task and server the measurements are predicted for."""

    profile: ClusterProfile
    shapes: ModelShapes
    server: Server  # the profile's server this machine stands for, with the local device
    rank: int

    @property
    def device(self) -> str:
        return self.server.device

    def rank_pattern(self) -> dict[str, int]:
        return {m.name: self.rank for m in self.shapes.candidates(self.profile.candidates.targets)}

    def predict(self, bits: int, batch: int, calibration: Calibration) -> tuple[float, float]:
        """(peak memory GiB, seconds per step) as the planner would predict them."""
        cost = CostModel(self.shapes, self.profile.task, calibration)
        matrices = {m.name: m for m in self.shapes.matrices}
        c = server_cost(cost, self.server, bits, batch, self.rank_pattern(), matrices, 0)
        return c.memory_gib, c.compute_s / self.profile.task.local_steps


@dataclass(frozen=True)
class Terms:
    """The cost model's pieces for one configuration at the neutral calibration (per step)."""

    base_s: float  # frozen-base compute at utilisation 1, no dequantization factor
    lora_s: float  # LoRA compute at utilisation 1
    fixed_gib: float  # base weights + LoRA state and intermediates + logits
    layers_gib: float  # per-layer activations at activation_factor 1


def terms(setup: Setup, bits: int, batch: int) -> Terms:
    """Split the prediction into its calibrated and uncalibrated parts (prediction with calibration
    c = fixed + c.activation_factor x layers + c.runtime_overhead;
    time = (base x c.dequant_time[bits] + lora) / c.utilisation)."""
    cost = CostModel(setup.shapes, setup.profile.task, NEUTRAL)
    steps, device = setup.profile.task.local_steps, setup.device
    adapted = [(m, setup.rank) for m in setup.shapes.candidates(setup.profile.candidates.targets)]
    logits = batch * setup.profile.task.seq_len * setup.shapes.vocab * LOGIT_BYTES / GIB
    return Terms(
        base_s=cost.base_compute_s(bits, batch, setup.server) / steps,
        lora_s=sum(cost.lora_compute_s(m, r, batch, setup.server) for m, r in adapted) / steps,
        fixed_gib=cost.base_weights_gib(bits, device) + logits
        + sum(cost.lora_memory_gib(m, r, batch, device) for m, r in adapted),
        layers_gib=cost.activations_gib(batch, device) - logits,
    )


@dataclass(frozen=True)
class Measurement:
    """One configuration measured on this machine (see the module docstring for definitions)."""

    bits: int
    batch: int
    step_s: float
    peak_gib: float
    runtime_gib: float
    resident_gib: float
    allocated_gib: float | None = None
    file_gib: float | None = None  # CPU: file-backed part of the resident set after training
    allocator: str | None = None  # CPU: fedpipe.allocator.running() in the measuring process
    step_times: list[float] = field(default_factory=list, compare=False)
    losses: list[float] = field(default_factory=list, compare=False)
    grad_norms: list[float] = field(default_factory=list, compare=False)  # LoRA gradients, per step


# ----------------------------------------------------------------------------- the fit


@dataclass(frozen=True)
class Fit:
    calibration: Calibration
    notes: list[str]


def fit_calibration(setup: Setup, measurements: Sequence[Measurement],
                    start: Calibration | None = None) -> Fit:
    """Fit utilisation, dequant_time, activation_factor and runtime_overhead_gib (module docstring).

    Factors the measurements cannot determine keep their value in `start` (default: the profile's).
    """
    start = start or setup.profile.calibration
    if not measurements:
        raise FedpipeError("calibrate: no measurements to fit")
    notes: list[str] = []
    t = {(m.bits, m.batch): terms(setup, m.bits, m.batch) for m in measurements}

    # time: v = 1/utilisation minimises sum (v x_i - 1)^2 with x_i = predicted(u=1)/measured
    sixteen = [m for m in measurements if m.bits == 16]
    if not sixteen:
        raise FedpipeError("calibrate: fitting needs 16-bit measurements (utilisation is fitted at "
                           "16 bits, dequant_time relative to it)")
    x = [(t[m.bits, m.batch].base_s + t[m.bits, m.batch].lora_s) / m.step_s for m in sixteen]
    utilisation = sum(x) / sum(v * v for v in x)
    utilisation = 1 / utilisation
    if utilisation > 1:
        achieved = setup.server.tflops * utilisation
        notes.append(f"this machine trains at {achieved:.3g} effective TFLOP/s, above server "
                     f"{setup.server.name!r}'s declared {setup.server.tflops:g}: utilisation capped "
                     f"at 1; raise its tflops to at least {achieved:.3g}")
        utilisation = 1.0
    dequant = dict(start.dequant_time) | {16: 1.0}
    for bits in sorted({m.bits for m in measurements} - {16}):
        a, c = zip(*((t[m.bits, m.batch].base_s / (utilisation * m.step_s),
                      t[m.bits, m.batch].lora_s / (utilisation * m.step_s))
                     for m in measurements if m.bits == bits), strict=True)
        dequant[bits] = sum(ai * (1 - ci) for ai, ci in zip(a, c, strict=True)) / sum(ai * ai for ai in a)

    # memory: y = overhead + factor * x, x = layer activations, y = measured - fixed terms
    xs = [t[m.bits, m.batch].layers_gib for m in measurements]
    ys = [m.peak_gib - t[m.bits, m.batch].fixed_gib for m in measurements]
    runtime = statistics.median(m.runtime_gib for m in measurements)
    factor, overhead = math.nan, math.nan
    if len({round(v, 9) for v in xs}) >= 2:
        mx, my = statistics.fmean(xs), statistics.fmean(ys)
        factor = (sum((a - mx) * (b - my) for a, b in zip(xs, ys, strict=True))
                  / sum((a - mx) ** 2 for a in xs))
        overhead = my - factor * mx
    if not (factor >= MIN_ACTIVATION_FACTOR and overhead >= 0):
        if not math.isnan(factor):
            notes.append(f"least squares gave activation_factor {factor:.3g}, overhead "
                         f"{overhead:.3g} GiB; using the measured runtime {runtime:.3g} GiB instead")
        overhead = max(runtime, 0.0)
        factor = sum(a * (b - overhead) for a, b in zip(xs, ys, strict=True)) / sum(a * a for a in xs)
        factor = max(factor, MIN_ACTIVATION_FACTOR)
    calibration = Calibration(activation_factor=_sig(factor), utilisation=_sig(utilisation),
                              dequant_time={k: _sig(v) for k, v in sorted(dequant.items())},
                              runtime_overhead_gib=_sig(overhead))
    return Fit(calibration, notes)


def _sig(x: float) -> float:
    """Four significant digits: readable in YAML, far below the measurement noise."""
    return float(f"{float(x):.4g}")


# ----------------------------------------------------------------------------- comparing


@dataclass(frozen=True)
class Row:
    """Measured against predicted for one configuration, before and after calibration."""

    bits: int
    batch: int
    measured_s: float
    measured_gib: float
    before_s: float
    before_gib: float
    after_s: float  # calibrated on all measurements (in-sample)
    after_gib: float
    loo_s: float = math.nan  # calibrated on all other measurements (leave-one-out)
    loo_gib: float = math.nan

    @staticmethod
    def error(predicted: float, measured: float) -> float:
        """Signed relative error of the prediction, (predicted - measured) / measured."""
        return predicted / measured - 1


def compare(setup: Setup, measurements: Sequence[Measurement], before: Calibration,
            after: Calibration) -> list[Row]:
    """Rows of predictions before, after (in-sample) and leave-one-out: each point predicted by a
    calibration fitted without it (NaN where the rest cannot be fitted, e.g. no 16-bit point left),
    an honest estimate of the error on a configuration that was not measured."""
    rows = []
    for i, m in enumerate(measurements):
        b_gib, b_s = setup.predict(m.bits, m.batch, before)
        a_gib, a_s = setup.predict(m.bits, m.batch, after)
        rest = [o for j, o in enumerate(measurements) if j != i]
        loo_gib = loo_s = math.nan
        if any(o.bits == 16 for o in rest):
            loo = fit_calibration(setup, rest, before).calibration
            if m.bits in {o.bits for o in rest}:
                loo_gib, loo_s = setup.predict(m.bits, m.batch, loo)
            else:  # its precision's dequant_time was not measured without it: memory only
                loo_gib = setup.predict(m.bits, m.batch, loo)[0]
        rows.append(Row(m.bits, m.batch, m.step_s, m.peak_gib, b_s, b_gib, a_s, a_gib, loo_s, loo_gib))
    return rows


def error_summary(rows: Sequence[Row]) -> dict[str, float]:
    """Largest |relative error| of time (`*_s`) and memory (`*_gib`): before, after, loo."""
    out = {}
    for k in ("before", "after", "loo"):
        for q in ("s", "gib"):
            errs = [abs(Row.error(getattr(r, f"{k}_{q}"), getattr(r, f"measured_{q}"))) for r in rows]
            errs = [e for e in errs if not math.isnan(e)]
            out[f"{k}_{q}"] = max(errs) if errs else math.nan
    return out


# ----------------------------------------------------------------------------- inputs


def parse_int_list(text: str, option: str, allowed: Sequence[int] | None = None) -> list[int]:
    """'4,8,16' -> [4, 8, 16]; errors name the option and what is valid."""
    values = []
    for part in str(text).split(","):
        part = part.strip()
        if not part.isdigit() or int(part) < 1:
            example = ",".join(map(str, allowed or [4, 8]))
            raise FedpipeError(f"{option}: {part!r} is not a positive whole number "
                               f"(expected a comma-separated list like {example})")
        values.append(int(part))
    bad = [v for v in values if allowed is not None and v not in allowed]
    if bad:
        raise FedpipeError(f"{option}: {bad} not supported; choose from {list(allowed)}")
    return sorted(set(values))


def local_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def choose_server(profile: ClusterProfile, name: str | None, device: str) -> Server:
    """The profile server this machine stands for (its tflops), with this machine's device."""
    if name is not None:
        found = [s for s in profile.servers if name == s.name or name in s.member_names()]
        if not found:
            raise FedpipeError(f"--server: no server {name!r} in the profile",
                               [f"servers: {', '.join(s.name for s in profile.servers)}"])
        server = found[0]
    else:
        same = [s for s in profile.servers if s.device == device]
        if not same:
            raise FedpipeError(f"--server: the profile has no {device} server to stand for this "
                               "machine; name one with --server",
                               [f"servers: {', '.join(f'{s.name} ({s.device})' for s in profile.servers)}"])
        server = same[0]
    return server.model_copy(update={"device": device})


def model_weights(profile: ClusterProfile, profile_dir: Path, workdir: Path) -> tuple[Path, str]:
    """(HF folder with weights, 'real weights' | 'random weights from ...') for the profile's model."""
    from fedpipe.models import find_weights  # torch, and a first-use conversion

    try:
        folder = find_weights(profile.model, profile_dir)
    except FedpipeError:  # the bundled package is missing: its shape card gives a same-sized model
        folder = None
    if folder is not None:
        return folder, f"real weights ({'bundled SmolLM2-135M' if profile.model == BUNDLED else folder})"
    card = CARDS_DIR / f"{profile.model.lower()}.json"
    source = card if card.is_file() else profile_dir / profile.model / "config.json"
    if not source.is_file():
        source = Path(profile.model).expanduser() / "config.json"
    return random_model(json.loads(source.read_text()), workdir / "random-model"), \
        f"random weights from {source}"


def random_model(config: dict, folder: Path) -> Path:
    """A random-weight model of the config's shape, saved as an HF folder (bf16 to save disk;
    `load_base` casts to the compute dtype): time and memory do not depend on weight values."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    arch = (config.get("architectures") or ["LlamaForCausalLM"])[0]
    if arch not in _MODEL_TYPES:
        raise FedpipeError(f"calibrate: cannot build a {arch} model; supported: {', '.join(_MODEL_TYPES)}")
    fields = {k: v for k, v in config.items() if k not in ("architectures", "model_type")}
    hf_config = AutoConfig.for_model(_MODEL_TYPES[arch], **fields)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(hf_config, dtype=torch.bfloat16)
    model.save_pretrained(folder)
    del model
    gc.collect()
    return folder


# ----------------------------------------------------------------------------- measuring


def measure(folder: Path, setup: Setup, bits: int, batch: int, steps: int,
            threads: int | None = None) -> Measurement:
    """Measure one configuration in a fresh Python process (nothing of one configuration's
    allocations or caches leaks into the next, and the runtime's own memory is counted).
    `threads`: torch's CPU threads there (default: torch's choice, one per core)."""
    spec = {"folder": str(folder), "device": setup.device, "bits": bits, "batch": batch,
            "seq_len": setup.profile.task.seq_len, "steps": steps, "ranks": setup.rank_pattern(),
            "alpha_ratio": setup.profile.candidates.lora_alpha_ratio,
            "lr": setup.profile.task.learning_rate, "threads": threads}
    proc = subprocess.run([sys.executable, "-m", "fedpipe.calibrate", json.dumps(spec)],
                          capture_output=True, text=True)
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        tail = "\n".join(proc.stderr.strip().splitlines()[-6:])
        raise FedpipeError(f"calibrate: measuring {bits}-bit, batch {batch} failed (exit "
                           f"{proc.returncode})", [tail or "no output"])
    return Measurement(**json.loads(lines[-1]))


def _reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark (VmHWM) of this process; False where not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _status_bytes(key: str) -> int:
    """A memory line of /proc/self/status (VmHWM, RssFile, ...) in bytes; 0 where unavailable."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(f"{key}:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def measure_here(spec: dict) -> Measurement:
    """The body of one measuring subprocess (see `measure`)."""
    import torch

    from fedpipe import allocator
    from fedpipe.measure import PeakMemory, resident_gib, rss_bytes
    from fedpipe.models import attach_lora, load_base

    device, cuda = spec["device"], spec["device"].startswith("cuda")
    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    if cuda:
        torch.zeros(1, device=device)
        free, total = torch.cuda.mem_get_info()
        runtime = (total - free) / GIB
    else:
        runtime = rss_bytes() / GIB
    model = attach_lora(load_base(spec["folder"], spec["bits"], device=device), spec["ranks"],
                        alpha_ratio=spec["alpha_ratio"], seed=0)
    resident = resident_gib(model)
    vocab = model.config.vocab_size
    ids = torch.randint(0, vocab, (spec["batch"], spec["seq_len"]),
                        generator=torch.Generator().manual_seed(0)).to(device)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=spec["lr"])
    model.train()
    gc.collect()
    exact = cuda or _reset_peak_rss()
    entry_gib = rss_bytes() / GIB
    sampler = None if exact else PeakMemory("cpu").__enter__()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    times, losses, norms = [], [], []
    for _ in range(1 + spec["steps"]):
        start = time.perf_counter()
        loss = model(**batch).loss
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        norms.append(norm.item())  # not finite if any LoRA gradient is not
        times.append(time.perf_counter() - start)
    allocated = file = malloc = None
    if cuda:
        peak = runtime + torch.cuda.max_memory_reserved() / GIB
        allocated = torch.cuda.max_memory_allocated() / GIB
    else:
        file = _status_bytes("RssFile") / GIB
        malloc = allocator.running()
        if sampler is None:
            peak = _status_bytes("VmHWM") / GIB
        else:
            sampler.__exit__(None, None, None)
            peak = entry_gib + sampler.peak_gib
    return Measurement(bits=spec["bits"], batch=spec["batch"], step_s=statistics.median(times[1:]),
                       peak_gib=peak, runtime_gib=runtime, resident_gib=resident,
                       allocated_gib=allocated, file_gib=file, allocator=malloc, step_times=times,
                       losses=losses, grad_norms=norms)


# ----------------------------------------------------------------------------- the command


@dataclass
class CalibrationResult:
    setup: Setup
    weights: str
    measurements: list[Measurement]
    before: Calibration
    after: Calibration
    rows: list[Row]
    notes: list[str]


def make_setup(profile_path: str | Path, server: str | None = None, rank: int = 8,
               device: str | None = None) -> Setup:
    profile, shapes = load_profile_and_shapes(profile_path)
    if rank < 1:
        raise FedpipeError(f"--rank: {rank} must be at least 1")
    return Setup(profile, shapes, choose_server(profile, server, device or local_device()), rank)


def run_calibration(profile_path: str | Path, *, bits: Sequence[int] = (4, 8, 16),
                    batch_sizes: Sequence[int] = (4, 8), steps: int = 4, server: str | None = None,
                    rank: int = 8, device: str | None = None, threads: int | None = None,
                    on_config: Callable[[int, int, int, int], None] | None = None) -> CalibrationResult:
    """Measure every bits x batch configuration here and fit the calibration (module docstring).

    `on_config(bits, batch, done, total)` is called before each configuration.
    """
    if 16 not in bits:
        raise FedpipeError("--bits: must include 16 (utilisation is fitted at 16 bits and "
                           f"dequant_time relative to it), got {list(bits)}")
    if steps < 1:
        raise FedpipeError(f"--steps: {steps} must be at least 1")
    setup = make_setup(profile_path, server, rank, device)
    configs = [(b, n) for b in sorted(bits) for n in sorted(batch_sizes)]
    with tempfile.TemporaryDirectory(prefix="fedpipe-calibrate-") as tmp:
        folder, weights = model_weights(setup.profile, Path(profile_path).parent, Path(tmp))
        measurements = []
        for i, (b, n) in enumerate(configs):
            if on_config:
                on_config(b, n, i, len(configs))
            measurements.append(measure(folder, setup, b, n, steps, threads))
    before = setup.profile.calibration
    fit = fit_calibration(setup, measurements, before)
    return CalibrationResult(setup, weights, measurements, before, fit.calibration,
                             compare(setup, measurements, before, fit.calibration), fit.notes)


def calibration_yaml(result: CalibrationResult, command: str) -> str:
    """The `calibration:` block with comments saying where and how it was measured."""
    s = result.setup
    block = yaml.safe_dump({"calibration": result.after.model_dump()}, sort_keys=False)
    when = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines = [f"# {command}",
             f"# measured {when} on {platform.node()} ({s.device}, "
             f"{platform.processor() or platform.machine()})",
             f"# model {s.profile.model}: {result.weights}; LoRA rank {s.rank} on "
             f"{len(s.rank_pattern())} matrices; seq_len {s.profile.task.seq_len}",
             f"# utilisation is relative to the {s.server.tflops:g} TFLOP/s declared for server "
             f"{s.server.name!r}",
             "# Paste this block at the top level of the cluster profile (replacing any calibration:)."]
    allocators = sorted({m.allocator for m in result.measurements if m.allocator})
    if allocators:
        lines.append(f"# CPU allocator while measuring: {', '.join(allocators)} (memory holds for "
                     "training started with the same one; see fedpipe/allocator.py)")
    for r in result.rows:
        lines.append(f"#   {r.bits:>2}-bit batch {r.batch:>3}: step {r.measured_s:.3f} s "
                     f"(predicted {r.after_s:.3f}), peak {r.measured_gib:.3f} GiB "
                     f"(predicted {r.after_gib:.3f})")
    return "\n".join(lines) + "\n" + block


def write_calibration(result: CalibrationResult, path: str | Path, command: str) -> Path:
    return write_atomic(path, calibration_yaml(result, command))


def result_view(result: CalibrationResult):
    """A rich table of predicted against measured, before and after calibration."""
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    s = result.setup
    t = Table(title=f"calibration · {s.profile.model} ({result.weights}) · {s.device} · rank "
              f"{s.rank} · seq {s.profile.task.seq_len}", title_justify="left")
    for col in ("bits", "batch", "step s", "before", "after", "leave-one-out",
                "peak GiB", "before", "after", "leave-one-out"):
        t.add_column(col, justify="right")
    for r in result.rows:
        t.add_row(str(r.bits), str(r.batch), f"{r.measured_s:.3f}",
                  *(_versus(p, r.measured_s) for p in (r.before_s, r.after_s, r.loo_s)),
                  f"{r.measured_gib:.3f}",
                  *(_versus(p, r.measured_gib) for p in (r.before_gib, r.after_gib, r.loo_gib)))
    runtime = statistics.median(m.runtime_gib for m in result.measurements)
    worst = error_summary(result.rows)
    lines = [
        Text(f"before: {_describe(result.before)}"),
        Text(f"after:  {_describe(result.after)}"),
        Text(f"largest error: time {worst['before_s']:.0%} before, {worst['after_s']:.0%} after, "
             f"{worst['loo_s']:.0%} leave-one-out · memory {worst['before_gib']:.0%} before, "
             f"{worst['after_gib']:.0%} after, {worst['loo_gib']:.0%} leave-one-out"),
        Text(f"runtime before the model: {runtime:.3f} GiB · time relative to server "
             f"{s.server.name!r} ({s.server.tflops:g} TFLOP/s declared)"),
        *[Text(f"note: {n}") for n in result.notes],
    ]
    return Group(t, *lines)


def _versus(predicted: float, measured: float) -> str:
    if math.isnan(predicted):
        return "-"
    return f"{predicted:.3f} ({Row.error(predicted, measured):+.0%})"


def _describe(c: Calibration) -> str:
    dq = ", ".join(f"{k}: {v:.3g}" for k, v in sorted(c.dequant_time.items()))
    return (f"utilisation {c.utilisation:.4g} · dequant_time {{{dq}}} · activation_factor "
            f"{c.activation_factor:.4g} · runtime_overhead {c.runtime_overhead_gib:.3g} GiB")


if __name__ == "__main__":  # the measuring subprocess: one JSON spec in, one JSON line out
    print(json.dumps(asdict(measure_here(json.loads(sys.argv[1])))))
