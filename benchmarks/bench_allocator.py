"""Which CPU allocator setting keeps peak memory predictable without slowing training?

Run: ``PYTHONPATH=. python benchmarks/bench_allocator.py [--candidates default,mmap-1m,...]
[--bits 4,16] [--batch-sizes 4,8] [--steps 2] [--reps 2] [--json FILE] [--report FILE...]``

Each candidate is an allocator setting for a whole training process: glibc's defaults
(``default``, the untouched allocator every ratio is taken against), ``mallopt`` values, a
``malloc_trim(0)`` after every step, or another allocator preloaded (jemalloc: needs
``libjemalloc.so.2`` on the machine, e.g. ``apt-get install libjemalloc2``), or a process started
plainly that picks its allocator as the ``fedpipe`` command does (``fedpipe-command``). For each candidate x
bits x batch a fresh process loads the bundled SmolLM2-135M (real weights), attaches LoRA r=8 on
all 210 matrices and takes one warm-up and ``--steps`` timed AdamW steps on a fixed batch of
batch x 128 tokens with one torch thread, exactly as ``fedpipe calibrate`` measures: peak resident
set (VmHWM reset right before the first step), median step time. The processes run interleaved
(every configuration of every candidate, then the next repetition, the candidate order rotated
per configuration), so a shared machine's load drifts over all candidates alike; medians per cell.

Reported per candidate:
- step time / the untouched allocator's, per configuration and their median;
- the memory prediction: the cost model's memory factors (activation_factor, runtime overhead)
  fitted on the candidate's own peaks (as ``fedpipe calibrate`` would, run with that setting),
  largest |error| in-sample and leave-one-out, and the spread of the peak between repetitions.

``--json FILE`` keeps every raw measurement (appended as they come, so an interrupted run is not
lost); ``--report FILE...`` prints the tables from such files together, without measuring.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD, M_ARENA_MAX = -1, -2, -3, -8  # malloc.h
MIB = 1 << 20
JEMALLOC = "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2"


@dataclass(frozen=True)
class Candidate:
    """An allocator setting for a whole process."""

    what: str
    mallopt: list[tuple[int, int]] = field(default_factory=list)
    trim_each_step: bool = False
    trim_before_backward: bool = False
    fedpipe_sets: bool = False  # fedpipe.allocator.prepare_for_training runs (at load_base) as in training
    env: dict[str, str] = field(default_factory=dict)
    as_command: bool = False  # starts as the `fedpipe` command does: allocator.start_command first


CANDIDATES = {
    "default": Candidate("glibc defaults (the untouched allocator)"),
    "mmap-1m": Candidate("M_MMAP_THRESHOLD 1 MiB (fedpipe on glibc)", [(M_MMAP_THRESHOLD, MIB)]),
    "trim": Candidate("glibc defaults + malloc_trim(0) after every step", trim_each_step=True),
    "trim-fwd": Candidate("glibc defaults + malloc_trim(0) between forward and backward",
                          trim_before_backward=True),
    "trim-pad": Candidate("M_MMAP_THRESHOLD 32 MiB, M_TRIM_THRESHOLD 1 MiB, M_TOP_PAD 0, "
                          "M_ARENA_MAX 1",
                          [(M_MMAP_THRESHOLD, 32 * MIB), (M_TRIM_THRESHOLD, MIB), (M_TOP_PAD, 0),
                           (M_ARENA_MAX, 1)]),
    "mmap-8m": Candidate("M_MMAP_THRESHOLD 8 MiB", [(M_MMAP_THRESHOLD, 8 * MIB)]),
    "mmap-1m-thp": Candidate("M_MMAP_THRESHOLD 1 MiB + torch's transparent huge pages for "
                             "buffers of 2 MiB and more (THP_MEM_ALLOC_ENABLE=1)",
                             [(M_MMAP_THRESHOLD, MIB)], env={"THP_MEM_ALLOC_ENABLE": "1"}),
    "jemalloc": Candidate("jemalloc 5.3 preloaded (LD_PRELOAD), its defaults",
                          env={"LD_PRELOAD": JEMALLOC}),
    "jemalloc-keep": Candidate("jemalloc 5.3 preloaded, decay off (MALLOC_CONF=dirty_decay_ms:-1,"
                               "muzzy_decay_ms:-1; fedpipe on jemalloc sets the same at load)",
                               env={"LD_PRELOAD": JEMALLOC,
                                    "MALLOC_CONF": "dirty_decay_ms:-1,muzzy_decay_ms:-1"}),
    "fedpipe-jemalloc": Candidate("jemalloc 5.3 preloaded, fedpipe's own setting (decay off at load)",
                                  fedpipe_sets=True, env={"LD_PRELOAD": JEMALLOC}),
    "fedpipe-command": Candidate("started plainly, as the `fedpipe` command: it re-executes itself "
                                 "under jemalloc (decay off) where installed", fedpipe_sets=True,
                                 as_command=True),
}


# ----------------------------------------------------------------------------- one process


def _status_kib(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(f"{key}:"):
                return int(line.split()[1])
    return 0


def measure_here(spec: dict) -> dict:
    """Body of one measuring process: the candidate's setting, then calibrate's measurement."""
    import torch

    import fedpipe.allocator
    import fedpipe.models as models
    from fedpipe.measure import rss_bytes

    candidate = CANDIDATES[spec["candidate"]]
    if candidate.as_command:
        fedpipe.allocator.start_command()  # returns in the re-executed process
    fedpipe.allocator._prepared = not candidate.fedpipe_sets  # else the candidate alone decides
    libc = ctypes.CDLL("libc.so.6")
    for option, value in candidate.mallopt:
        assert libc.mallopt(option, value) == 1, (option, value)
    torch.set_num_threads(1)
    runtime = rss_bytes() / 2**30
    model = models.attach_lora(models.load_base(spec["folder"], spec["bits"]), spec["ranks"],
                               alpha_ratio=spec["alpha_ratio"], seed=0)
    ids = torch.randint(0, model.config.vocab_size, (spec["batch"], spec["seq_len"]),
                        generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=spec["lr"])
    model.train()
    faults = lambda: int(open("/proc/self/stat").read().rsplit(")", 1)[1].split()[7])  # noqa: E731
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM
    times, cpu_times, peaks, start_faults = [], [], [], faults()
    for _ in range(1 + spec["steps"]):
        start, cpu_start = time.perf_counter(), time.process_time()
        loss = model(**batch).loss
        if candidate.trim_before_backward:
            libc.malloc_trim(0)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if candidate.trim_each_step:
            libc.malloc_trim(0)
        times.append(time.perf_counter() - start)
        cpu_times.append(time.process_time() - cpu_start)
        peaks.append(_status_kib("VmHWM") / 2**20)
    return {"step_times": times, "cpu_times": cpu_times, "peaks_gib": peaks, "runtime_gib": runtime,
            "minor_faults_per_step": (faults() - start_faults) / len(times),
            "allocator": fedpipe.allocator.running()}


# ----------------------------------------------------------------------------- the run


def measure(candidate: str, folder: Path, setup, bits: int, batch: int, steps: int) -> dict:
    spec = {"candidate": candidate, "folder": str(folder), "bits": bits, "batch": batch,
            "seq_len": setup.profile.task.seq_len, "steps": steps, "ranks": setup.rank_pattern(),
            "alpha_ratio": setup.profile.candidates.lora_alpha_ratio,
            "lr": setup.profile.task.learning_rate}
    env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "MALLOC_CONF", "FEDPIPE_ALLOCATOR",
                                                           "FEDPIPE_ALLOCATOR_REEXEC")}
    env |= CANDIDATES[candidate].env
    proc = subprocess.run([sys.executable, __file__, "--worker", json.dumps(spec)], env=env,
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{candidate} {bits}-bit batch {batch} failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run(args, setup, names: list[str], configs: list[tuple[int, int]]) -> list[dict]:
    from fedpipe.calibrate import model_weights

    rows = []
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        folder, _ = model_weights(setup.profile, Path(args.profile).parent, Path(tmp))
        for rep in range(args.reps):
            for i, (bits, batch) in enumerate(configs):
                k = (rep * len(configs) + i) % len(names)
                for name in names[k:] + names[:k]:
                    m = measure(name, folder, setup, bits, batch, args.steps)
                    row = {"candidate": name, "rep": rep, "bits": bits, "batch": batch, **m}
                    rows.append(row)
                    if args.json:
                        with args.json.open("a") as f:
                            f.write(json.dumps(row) + "\n")
                    print(f"[{time.perf_counter() - start:5.0f} s] rep {rep} {bits:>2}-bit batch "
                          f"{batch} {name:<12} step {statistics.median(m['step_times'][1:]):.2f} s "
                          f"(cpu {statistics.median(m['cpu_times'][1:]):.2f} s) "
                          f"peak {max(m['peaks_gib']):.3f} GiB "
                          f"({' '.join(f'{p:.2f}' for p in m['peaks_gib'])}) "
                          f"faults/step {m['minor_faults_per_step']:.0f} ({m['allocator']})", flush=True)
    return rows


# ----------------------------------------------------------------------------- the report


def _cells(rows: list[dict]) -> dict[tuple[str, tuple[int, int]], dict]:
    """Medians per candidate x (bits, batch) over its processes (timed steps only)."""
    cells: dict[tuple[str, tuple[int, int]], list[dict]] = {}
    for r in rows:
        cells.setdefault((r["candidate"], (r["bits"], r["batch"])), []).append(r)
    return {k: {"wall": statistics.median(t for r in got for t in r["step_times"][1:]),
                "cpu": statistics.median(t for r in got for t in r["cpu_times"][1:]),
                "peak": statistics.median(max(r["peaks_gib"]) for r in got),
                "peaks": [max(r["peaks_gib"]) for r in got],
                "faults": statistics.median(r["minor_faults_per_step"] for r in got),
                "runtime": statistics.median(r["runtime_gib"] for r in got)}
            for k, got in cells.items()}


def _memory_rows(setup, cells: dict, name: str, configs: list[tuple[int, int]]) -> dict | None:
    """The cost model's memory factors fitted on one candidate's peaks, as calibrate fits them:
    {config: Row} with in-sample and leave-one-out predictions; None without 16-bit points."""
    from fedpipe.calibrate import Measurement, compare, fit_calibration

    if not any(b == 16 for b, _ in configs):
        return None

    ms = [Measurement(bits=b, batch=n, step_s=cells[name, (b, n)]["cpu"],
                      peak_gib=cells[name, (b, n)]["peak"], runtime_gib=cells[name, (b, n)]["runtime"],
                      resident_gib=0.0) for b, n in configs]
    fitted = fit_calibration(setup, ms).calibration
    return {(r.bits, r.batch): r for r in compare(setup, ms, setup.profile.calibration, fitted)}


def report(rows: list[dict], setup) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(width=170)
    names = [n for n in CANDIDATES if any(r["candidate"] == n for r in rows)]
    configs = sorted({(r["bits"], r["batch"]) for r in rows})
    cells = _cells(rows)
    detail = Table(title="per configuration: CPU s per step (x untouched) · peak GiB (fitted memory "
                   "error in-sample, leave-one-out) · minor faults per step · processes",
                   title_justify="left")
    detail.add_column("candidate")
    for bits, batch in configs:
        detail.add_column(f"{bits}-bit batch {batch}", justify="right")
    summary = Table(title="summary: medians over the configurations of ratios against the untouched "
                    "allocator measured in the same run", title_justify="left")
    for col in ("candidate", "CPU time ratio (range)", "wall time ratio", "peak ratio",
                "memory error in-sample", "leave-one-out", "peak spread", "setting"):
        summary.add_column(col, justify="left" if col in ("candidate", "setting") else "right")
    for name in names:
        have = [c for c in configs if (name, c) in cells]
        errors = _memory_rows(setup, cells, name, configs) if have == configs else None
        cpu, wall, mem, spread, texts = [], [], [], [], []
        for c in configs:
            if c not in have:
                texts.append("-")
                continue
            x, base = cells[name, c], cells.get(("default", c))
            cpu.append(x["cpu"] / base["cpu"] if base else float("nan"))
            wall.append(x["wall"] / base["wall"] if base else float("nan"))
            mem.append(x["peak"] / base["peak"] if base else float("nan"))
            spread.append(max(x["peaks"]) / min(x["peaks"]) - 1)
            e = errors[c] if errors else None
            fit = (f" ({e.error(e.after_gib, e.measured_gib):+.0%}, "
                   f"{e.error(e.loo_gib, e.measured_gib):+.0%})" if e else "")
            texts.append(f"{x['cpu']:.2f} s (x{cpu[-1]:.2f}) · {x['peak']:.2f} GiB{fit} · "
                         f"{x['faults'] / 1e3:.0f}k · {len(x['peaks'])}")
        detail.add_row(name, *texts)
        worst_in = max((abs(r.error(r.after_gib, r.measured_gib)) for r in (errors or {}).values()),
                       default=float("nan"))
        worst_loo = max((abs(r.error(r.loo_gib, r.measured_gib)) for r in (errors or {}).values()),
                        default=float("nan"))
        repeated = [v for v, c in zip(spread, have, strict=True) if len(cells[name, c]["peaks"]) > 1]
        summary.add_row(name, f"{statistics.median(cpu):.2f} ({min(cpu):.2f}-{max(cpu):.2f})",
                        f"{statistics.median(wall):.2f}", f"{statistics.median(mem):.2f}",
                        f"{worst_in:.1%}" if errors else "-", f"{worst_loo:.1%}" if errors else "-",
                        f"{max(repeated):.1%}" if repeated else "-",
                        f"{CANDIDATES[name].what} [{len(have)}/{len(configs)} configurations]")
    console.print(detail)
    console.print(summary)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--profile", default="profiles/cluster.yaml")
    ap.add_argument("--candidates", default=",".join(CANDIDATES))
    ap.add_argument("--bits", default="4,16")
    ap.add_argument("--batch-sizes", default="4,8")
    ap.add_argument("--steps", type=int, default=2, help="timed steps after one warm-up step")
    ap.add_argument("--reps", type=int, default=2, help="fresh processes per candidate and configuration")
    ap.add_argument("--json", type=Path, help="raw measurements, one JSON line each (appended)")
    ap.add_argument("--report", type=Path, nargs="+", metavar="FILE",
                    help="report the rows of these --json files together, measure nothing")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(measure_here(json.loads(args.worker))))
        return

    from fedpipe.calibrate import make_setup, parse_int_list

    names = args.candidates.split(",")
    unknown = [n for n in names if n not in CANDIDATES]
    if unknown or "default" not in names:
        raise SystemExit(f"--candidates: need 'default' and names among {', '.join(CANDIDATES)}; "
                         f"unknown: {unknown}")
    if "jemalloc" in names and not Path(JEMALLOC).is_file():
        raise SystemExit(f"--candidates jemalloc: {JEMALLOC} is missing (apt-get install libjemalloc2)")
    setup = make_setup(args.profile, rank=8, device="cpu")
    if args.report:
        rows = [json.loads(line) for path in args.report for line in path.read_text().splitlines()
                if line.strip()]
        rows = [r for r in rows if r["candidate"] in names]
    else:
        print(f"load: {os.getloadavg()}", flush=True)
        configs = [(b, n) for b in parse_int_list(args.bits, "--bits", [4, 8, 16])
                   for n in parse_int_list(args.batch_sizes, "--batch-sizes")]
        rows = run(args, setup, names, configs)
        print(f"load: {os.getloadavg()}", flush=True)
    report(rows, setup)


if __name__ == "__main__":
    main()
