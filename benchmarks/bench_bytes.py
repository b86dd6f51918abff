"""Bytes on the wire against final quality (issue 15): precision, density, error feedback, global rank.

On the bundled SmolLM2-135M and the built-in non-IID task data (bench_sparse's profile and
Dirichlet split, `PROFILE` below), plan a two-server profile once, then run the same plan per seed
  * dense fp32 (the reference every "vs dense" is against),
  * each payload precision alone, both directions: bf16, int8, nf4, int2 (and int2 without error
    feedback), and int2 up with int3 down (the download averages servers' updates, off int2's grid),
  * precision x density (top-k, both directions): int8 and nf4 at 1/4, nf4 at 1/3 and 1/16,
  * error feedback off for the two nf4 top-k rows (`--no-error-feedback`; on everywhere else),
  * a thresholded global rank: flora dense, and flora with the global stack cut to rank 8,
  * the planner's own choice: `PROFILE` planned with the schema's default communication
    candidates and run as planned (whatever the planner can choose, it chooses here),
and report bytes up / down / total (counted on the payloads, every server, every round) and the
global model's final eval loss, per run and as a mean over seeds with the seed spread, each
against dense fp32, and paired (each seed's run against dense fp32 on the same seed: the mean and
its standard error over seeds, and each seed's); the headline is the largest byte reduction whose
mean loss is within 1% of dense's, and whether it reaches 10x.

Why these rules: the grid runs under fedit, which averages factors and restarts from them, so an
upload residual stays in the same coordinates and error feedback is on (`fedpipe.feedback`); under
flexlora or flora it is off whatever the option says, and the on/off pair would mean nothing. The
truncation pair runs under flora, not flexlora: flexlora's broadcast is each server's rank-r_k
restart, padded to r_k, so cutting its global rank changes the saved adapter but not one byte on
the wire, while flora broadcasts the whole stack (rank sum r_k) and the cut shrinks every download.
Rank 8 is the largest server rank of the plan: the global keeps what the biggest adapter can hold.

Each run evaluates once, after its last round, on the seed's held-out split (the same split for
every variant of a seed); the untrained base model's loss on it is reported too. `--lr-schedule
cosine` decays each round's learning rate to a tenth of the peak by the last round: at a
constant 2e-3 the global loss goes back up in some rounds (by 9% at the median of the 21 rises in
bench_strategies' per-round evals, up to 81%), so one seed's final loss is partly where the swing
ends, and a 1% band is inside that noise. Each (variant,
seed) result is its own file under --out, so variants split by --only run as parallel processes
and re-running skips what is done (an interrupted run resumes); the process that completes the set
writes the report (or `--report` rebuilds it from the files).

    python benchmarks/bench_bytes.py --only base,fp32,bf16,int8,nf4,int8-d4,nf4-d4 > a.log 2>&1 &
    python benchmarks/bench_bytes.py --only nf4-d16,nf4-d4-noef,nf4-d16-noef,flora,flora-rank8,planner \\
        > b.log 2>&1; wait
    python benchmarks/bench_bytes.py --report     # benchmarks/results/bytes-cpu.{txt,json}
    python benchmarks/bench_bytes.py --predict --rounds 20   # each variant's predicted bytes, no training
    python benchmarks/bench_bytes.py --rounds 20 --seeds 0,2,4 --lr-schedule cosine \\
        --only base,fp32,int2,int2-int3 --out runs/bench-bytes-20r-cosine    # and 1,3,5 beside it
    python benchmarks/bench_bytes.py --rounds 1 --seeds 0 --only base,fp32,nf4-d16 \\
        --out runs/bench-bytes-smoke --results /tmp/bytes-smoke    # smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch
import yaml
from bench_sparse import PROFILE as SPARSE_PROFILE
from bench_sparse import base_eval
from transformers.utils import logging as hf_logging

from fedpipe.atomic import write_atomic
from fedpipe.federation.inprocess import run_plan
from fedpipe.plan import Plan, load_plan, save_plan

ROOT = Path(__file__).resolve().parent.parent
PROFILE = {**SPARSE_PROFILE, "name": "bytes-bench", "aggregation": "fedit"}
DENSE = {"upload_density": 1.0, "download_density": 1.0, "upload_precision": "fp32",
         "download_precision": "fp32"}


def both(precision: str, density: float = 1.0) -> dict:
    return {"upload_precision": precision, "download_precision": precision,
            "upload_density": density, "download_density": density}


# name -> (rule, overrides of the dense plan; None: the planner's own plan, run as it is)
VARIANTS: dict[str, tuple[str, dict | None]] = {
    "fp32": ("fedit", {}),
    "bf16": ("fedit", both("bf16")),
    "int8": ("fedit", both("int8")),
    "nf4": ("fedit", both("nf4")),
    "int2": ("fedit", both("int2")),
    "int2-noef": ("fedit", both("int2") | {"error_feedback": False}),
    "int2-int3": ("fedit", both("int2") | {"download_precision": "int3"}),
    "int8-d4": ("fedit", both("int8", 1 / 4)),
    "nf4-d4": ("fedit", both("nf4", 1 / 4)),
    "nf4-d3": ("fedit", both("nf4", 1 / 3)),
    "nf4-d16": ("fedit", both("nf4", 1 / 16)),
    "nf4-d4-noef": ("fedit", both("nf4", 1 / 4) | {"error_feedback": False}),
    "nf4-d16-noef": ("fedit", both("nf4", 1 / 16) | {"error_feedback": False}),
    "flora": ("flora", {}),
    "flora-rank8": ("flora", {"truncate_rank": 8}),
    "planner": ("fedit", None),
}
LABELS = {"fp32": "dense fp32", "bf16": "bf16", "int8": "int8", "nf4": "nf4", "int2": "int2",
          "int2-noef": "int2, no error feedback", "int2-int3": "int2 up, int3 down",
          "int8-d4": "int8, density 1/4",
          "nf4-d4": "nf4, density 1/4", "nf4-d3": "nf4, density 1/3", "nf4-d16": "nf4, density 1/16",
          "nf4-d4-noef": "nf4, density 1/4, no error feedback",
          "nf4-d16-noef": "nf4, density 1/16, no error feedback", "flora": "flora, dense fp32",
          "flora-rank8": "flora, global rank <= 8", "planner": "the planner's choice"}
BASE = "base"  # the untrained base model's eval, per seed
UNRECORDED = {"lr_schedule": "constant"}  # settings results written before they were recorded had


def plans(out: Path, seed: int, lr_schedule: str) -> dict[str, Path]:
    """The seed's dense plan and the planner's own plan (planned once; a re-run reuses them)."""
    from fedpipe.planning.strategies import make_plan

    folder = out / f"seed{seed}"
    folder.mkdir(parents=True, exist_ok=True)
    paths = {"dense": folder / "dense.plan.yaml", "planner": folder / "planner.plan.yaml"}
    candidates = {k: v for k, v in PROFILE["candidates"].items() if k != "densities"}
    profiles = {"dense": PROFILE, "planner": {**PROFILE, "candidates": candidates}}  # schema defaults
    for name, path in paths.items():
        if path.is_file():
            planned = load_plan(path).task.lr_schedule
            if planned != lr_schedule:
                raise SystemExit(f"{path} was planned with lr_schedule {planned}, not {lr_schedule}: "
                                 "pass the same --lr-schedule, or another --out")
            continue
        profile = folder / f"{name}.profile.yaml"
        raw = {**profiles[name], "task": {**profiles[name]["task"], "seed": seed, "lr_schedule": lr_schedule}}
        write_atomic(profile, yaml.safe_dump(raw, sort_keys=False))
        save_plan(make_plan(profile), path)
    return paths


def run_one(name: str, seed: int, paths: dict[str, Path], args: argparse.Namespace) -> dict:
    rule, overrides = VARIANTS[name]
    settings = dict(rounds=args.rounds, local_steps=args.local_steps, eval_samples=args.eval_samples,
                    eval_every=args.rounds, out=args.out / f"seed{seed}" / name, resume=True)
    start, cpu = time.perf_counter(), time.process_time()
    if overrides is None:
        result = run_plan(paths["planner"], **settings)
    else:
        result = run_plan(paths["dense"], aggregation=rule, **(DENSE | overrides), **settings)
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu
    up = sum(s["upload_bytes"] for r in result.rows for s in r["servers"])
    down = sum(s["download_bytes"] for r in result.rows for s in r["servers"])
    last = result.rows[-1]
    plan: Plan = load_plan(paths["planner" if overrides is None else "dense"])
    return {"variant": name, "seed": seed, "rule": rule, "overrides": overrides,
            "communication": {s.name: {k: getattr(s, k) for k in DENSE} for s in plan.servers}
            if overrides is None else None,
            "upload_bytes": up, "download_bytes": down, "total_bytes": up + down,
            "loss": last["eval"]["loss"], "accuracy": last["eval"]["accuracy"],
            "global_rank": last.get("global_rank"), "rounds": len(result.rows),
            "local_steps": args.local_steps, "lr_schedule": args.lr_schedule,
            "eval_samples": args.eval_samples, "seconds": seconds,
            "cpu_seconds": cpu_seconds}


def predict(plan: Plan, rounds: int) -> str:
    """Each fedit variant's bytes as the planner prices them (v(d, p) x P(r), headers left out) over
    `rounds`, against dense fp32: the upload every round, no broadcast in round 1, a dense one at
    the download precision in round 2 (nothing is held yet to be relative to), sparse from round 3."""
    from fedpipe.precision import bytes_per_value
    from fedpipe.shapes import load_shapes

    matrices = {m.name: m for m in load_shapes(plan.model).matrices}
    values = sum(matrices[n].lora_params(r) for s in plan.servers for n, r in s.rank_pattern.items())

    def total(c: dict) -> float:
        up = rounds * bytes_per_value(c["upload_density"], c["upload_precision"])
        down = (bytes_per_value(1.0, c["download_precision"]) + (rounds - 2) * bytes_per_value(
            c["download_density"], c["download_precision"])) if rounds > 1 else 0.0
        return values * (up + down)

    dense = total(DENSE)
    lines = [f"predicted bytes over {rounds} rounds ({values:,} adapter values per round, all servers):",
             "| variant | total (MB) | reduction |", "|---|---|---|"]
    for name, (rule, overrides) in VARIANTS.items():
        if rule == "fedit" and overrides is not None:
            t = total(DENSE | {k: v for k, v in overrides.items() if k in DENSE})
            lines.append(f"| {LABELS[name]} | {t / 1e6:.2f} | {dense / t:.1f}× |")
    return "\n".join(lines)


def result_path(out: Path, name: str, seed: int) -> Path:
    return out / "results" / f"{name}.seed{seed}.json"


def mean_spread(values: list[float]) -> tuple[float, float]:
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def done(out: Path, seeds: list[int]) -> list[str]:
    """The names (base and variants) with a result for every seed."""
    return [n for n in [BASE, *VARIANTS] if all(result_path(out, n, s).is_file() for s in seeds)]


def report(out: Path, seeds: list[int], settings: dict) -> tuple[str, dict]:
    """The Markdown report and its JSON, from the result files of every seed (base and dense fp32
    needed; a variant without all seeds is listed as not run)."""
    names = done(out, seeds)
    variants = [n for n in VARIANTS if n in names]
    runs = {(n, s): json.loads(result_path(out, n, s).read_text()) for n in names for s in seeds}
    for key in ("rounds", "local_steps", "eval_samples", "lr_schedule"):
        found = {r.get(key, UNRECORDED.get(key)) for r in runs.values() if key in r or key in UNRECORDED}
        if found != {settings[key]}:
            raise SystemExit(f"the results in {out} were run with {key} {sorted(found)}, not "
                             f"{settings[key]}: pass the same settings, or another --out")
    dense = [runs["fp32", s] for s in seeds]
    dense_bytes = statistics.mean(r["total_bytes"] for r in dense)
    dense_loss = statistics.mean(r["loss"] for r in dense)
    lines = ["| variant | seed | rule | up (MB) | down (MB) | total (MB) | final eval loss | exact match |",
             "|---|---|---|---|---|---|---|---|"]
    for s in seeds:
        base = runs[BASE, s]
        lines.append(f"| base model (untrained) | {s} | | | | | {base['loss']:.4f} | "
                     f"{base['accuracy']:.3f} |")
        for n in variants:
            r = runs[n, s]
            lines.append(f"| {LABELS[n]} | {s} | {r['rule']} | {r['upload_bytes'] / 1e6:.2f} | "
                         f"{r['download_bytes'] / 1e6:.2f} | {r['total_bytes'] / 1e6:.2f} | "
                         f"{r['loss']:.4f} | {r['accuracy']:.3f} |")
    lines += ["", f"Mean over seeds {', '.join(map(str, seeds))} (spread: the stdev over seeds); "
              "paired: this run's loss against dense fp32's on the same seed, the mean over seeds ± its "
              "standard error (stdev / sqrt(seeds)), and per seed.", "",
              "| variant | rule | up (MB) | down (MB) | total (MB) | bytes vs dense | reduction | "
              "final eval loss (mean ± spread) | loss vs dense (means) | paired ± s.e. | paired per seed | "
              "within 1% |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    summary, best = {}, None
    base_mean, base_spread = mean_spread([runs[BASE, s]["loss"] for s in seeds])
    for n in variants:
        rs = [runs[n, s] for s in seeds]
        up, down, total = (statistics.mean(r[k] for r in rs) for k in ("upload_bytes", "download_bytes",
                                                                       "total_bytes"))
        loss, spread = mean_spread([r["loss"] for r in rs])
        per_seed = [r["loss"] / d["loss"] - 1 for r, d in zip(rs, dense, strict=True)]
        paired, paired_spread = mean_spread(per_seed)
        paired_se = paired_spread / len(per_seed) ** 0.5
        change = loss / dense_loss - 1
        within = change <= 0.01
        reduction = dense_bytes / total
        if n != "fp32" and within and (best is None or reduction > best[1]):
            best = (n, reduction)
        summary[n] = {"label": LABELS[n], "rule": rs[0]["rule"], "upload_bytes": up, "download_bytes": down,
                      "total_bytes": total, "bytes_vs_dense": total / dense_bytes, "reduction": reduction,
                      "loss_mean": loss, "loss_spread": spread, "loss_vs_dense": change,
                      "loss_vs_dense_paired": paired, "loss_vs_dense_paired_se": paired_se,
                      "loss_vs_dense_paired_per_seed": per_seed, "within_1pct": within,
                      "loss_per_seed": [r["loss"] for r in rs]}
        lines.append(f"| {LABELS[n]} | {rs[0]['rule']} | {up / 1e6:.2f} | {down / 1e6:.2f} | "
                     f"{total / 1e6:.2f} | "
                     f"{total / dense_bytes:.3f}× | {reduction:.1f}× | {loss:.4f} ± {spread:.4f} | "
                     f"{change:+.2%} | {paired:+.2%} ± {paired_se:.2%} | "
                     f"{' / '.join(f'{x:+.1%}' for x in per_seed)} | {'yes' if within else 'no'} |")
    headline = {"variant": best[0] if best else None, "reduction": best[1] if best else None,
                "reaches_10x": bool(best and best[1] >= 10)}
    lines += ["", f"base model (untrained): loss {base_mean:.4f} ± {base_spread:.4f}; dense fp32 "
              f"{dense_loss:.4f} ± {summary['fp32']['loss_spread']:.4f} (a 1% band is "
              f"{0.01 * dense_loss:.4f})",
              ]
    if "flora" in summary and "flora-rank8" in summary:
        flora, cut = summary["flora"], summary["flora-rank8"]
        lines.append(f"global rank cut (flora, rank <= 8, against flora dense): "
                     f"{cut['total_bytes'] / flora['total_bytes']:.3f}× the bytes, loss "
                     f"{cut['loss_mean'] / flora['loss_mean'] - 1:+.2%}")
    if "planner" in summary:
        lines.append(f"the planner's choice (seed {seeds[0]}): " + "; ".join(
            f"{server} " + ", ".join(f"{k} {v:g}" if isinstance(v, float) else f"{k} {v}"
                                     for k, v in c.items())
            for server, c in runs["planner", seeds[0]]["communication"].items()))
    not_run = [n for n in VARIANTS if n not in summary]
    if not_run:
        lines.append("not run (no result for every seed): " + ", ".join(not_run))
    lines += ["",
              "largest byte reduction with mean final eval loss within 1% of dense fp32: "
              + (f"{best[1]:.1f}× ({LABELS[best[0]]}); 10× {'reached' if best[1] >= 10 else 'not reached'}"
                 if best else "none (no reduced run stays within 1%); 10× not reached" if len(summary) > 1
                 else "no reduced variant has a result for every seed: not answered"),
              "(" + ", ".join(f"{k} {v}" for k, v in settings.items()) + ")"]
    data = {"settings": settings, "runs": [runs[k] for k in sorted(runs)], "base_loss": {"mean": base_mean,
            "spread": base_spread}, "summary": summary, "headline": headline}
    return "\n".join(lines) + "\n", data


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--seeds", default="0,1")
    parser.add_argument("--local-steps", type=int, default=3)
    parser.add_argument("--eval-samples", type=int, default=128)
    parser.add_argument("--lr-schedule", choices=["constant", "cosine"], default="constant",
                        help="the plans' task.lr_schedule (cosine settles the final model, so one "
                        "seed's final loss swings less with where the round-to-round swing ends)")
    parser.add_argument("--only", default="", help=f"comma-separated, of: {BASE}, {', '.join(VARIANTS)} "
                        "(default: all)")
    parser.add_argument("--out", type=Path, default=Path("runs/bench-bytes"), help="run folders and "
                        "per-run results")
    parser.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "results" / "bytes-cpu",
                        help="report path without suffix: writes .txt and .json")
    parser.add_argument("--report", action="store_true", help="only write the report from the files")
    parser.add_argument("--predict", action="store_true", help="only print each variant's predicted bytes "
                        "(the first seed's dense plan; no training)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    hf_logging.disable_progress_bar()
    seeds = [int(s) for s in args.seeds.split(",")]
    wanted = [v.strip() for v in args.only.split(",") if v.strip()] or [BASE, *VARIANTS]
    unknown = sorted(set(wanted) - {BASE, *VARIANTS})
    if unknown:
        parser.error(f"--only: unknown {', '.join(unknown)}; valid: {BASE}, {', '.join(VARIANTS)}")
    settings = {"rounds": args.rounds, "local_steps": args.local_steps, "eval_samples": args.eval_samples,
                "lr_schedule": args.lr_schedule,
                "eval": "after the last round", "seeds": args.seeds, "torch threads": 1,
                "cores": os.cpu_count(),
                "profile": "bench_bytes.PROFILE (bench_sparse's, fedit)"}
    if args.predict:
        print(predict(load_plan(plans(args.out, seeds[0], args.lr_schedule)["dense"]), args.rounds))
        return
    for seed in seeds if not args.report else []:
        paths = plans(args.out, seed, args.lr_schedule)
        for name in (n for n in [BASE, *VARIANTS] if n in wanted):
            target = result_path(args.out, name, seed)
            if target.is_file():
                continue
            if name == BASE:
                start, cpu = time.perf_counter(), time.process_time()
                record = base_eval(load_plan(paths["dense"]), args.eval_samples, "cpu") | {
                    "variant": BASE, "seed": seed, "eval_samples": args.eval_samples,
                    "lr_schedule": args.lr_schedule,
                    "seconds": time.perf_counter() - start,
                    "cpu_seconds": time.process_time() - cpu}
            else:
                record = run_one(name, seed, paths, args)
            write_atomic(target, json.dumps(record, indent=2))
            print(f"seed {seed} · {name}: loss {record['loss']:.4f}"
                  + (f", {record['total_bytes'] / 1e6:.2f} MB" if name != BASE else "")
                  + f" ({record['seconds']:.0f} s, {record['cpu_seconds']:.0f} s CPU)", flush=True)
    missing = [f"{n} seed {s}" for n in [BASE, *VARIANTS] for s in seeds
               if not result_path(args.out, n, s).is_file()]
    if missing and not args.report:
        print(f"the report waits for {len(missing)} runs (or --report): {', '.join(missing)}")
        return
    if not {BASE, "fp32"} <= set(done(args.out, seeds)):
        parser.error(f"--report: needs base and fp32 for seeds {args.seeds} in {args.out}")
    text, data = report(args.out, seeds, settings)
    args.results.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(args.results.with_suffix(".txt"), text)
    write_atomic(args.results.with_suffix(".json"), json.dumps(data, indent=2))
    print(text)


if __name__ == "__main__":
    main()
