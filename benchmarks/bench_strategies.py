"""Cost to target and quality under budget: every strategy's plan, trained for real, on the clock.

EdgeFlowerTune's protocols (arXiv 2605.08636) on the bundled SmolLM2-135M: for each data set
(the built-in task families, and a user-style Alpaca jsonl this script writes) and each seed
(task.seed: data, partition and initialisation), every strategy plans the profile
(`fedpipe plan --strategy NAME`, data-free importance prior) and its plan is run in-process.

The federation clock is simulated from the plan, the loss is measured: round r ends at
r x the plan's predicted makespan; bytes are the payload bytes counted in metrics.jsonl (upload
and download, all servers). The federation time budget is rounds-cap x the fastest plan's
makespan; each strategy runs the rounds that fit in it (at least 1, at most the cap).
Reported per strategy (means over seeds, with the seed spread):
  * quality under budget: eval loss and exact match after its budgeted rounds, and at the byte
    budget (the fewest total bytes any strategy's run sent: its last round within that);
  * cost to target: predicted federation seconds and counted bytes until the seed-mean eval loss
    first reaches the target, TARGET_SHARE of the way from the base model's loss to the best
    seed-mean loss any strategy reached; per seed too (each seed's curve, same target).

    python benchmarks/bench_strategies.py                                   # the README's figures
    python benchmarks/bench_strategies.py --seeds 0 --rounds-cap 1 --only fedpipe,legend \\
        --data builtin --local-steps 1 --eval-samples 8 --out runs/bench-strategies-smoke   # smoke

Re-running with the same --out reuses finished runs (a crash keeps what finished); each data set
and seed keeps its own state (OUT/DATA-seedN/results.json), so seeds can run as parallel processes
(`--seeds 0 --threads 1` and `--seeds 1 --threads 1`, same --out, each its own --results, or the
one-seed reports overwrite the default one) and a last `--seeds 0,1` run writes the joint report.
--threads 1 matters: two processes at torch's default (one thread per core) on the 2-core box made
a round 6x slower (159 s against 24 s).
"""

from __future__ import annotations

import argparse
import json
import math
import random
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
import yaml
from transformers.utils import logging as hf_logging

from fedpipe.atomic import write_atomic
from fedpipe.data import plan_data
from fedpipe.federation.inprocess import run_plan
from fedpipe.models import plan_model_dir
from fedpipe.plan import Plan, load_plan, save_plan
from fedpipe.planning.strategies import make_plan, strategy_names

ROOT = Path(__file__).resolve().parent
PROFILE = ROOT / "profiles" / "strategies.yaml"
RESULTS = ROOT / "results" / "strategies-cpu"
TARGET_SHARE = 0.6
ALPACA_RECORDS = 1500
SYLLABLES = ["ka", "lo", "mi", "ne", "ru", "sa", "ti", "vo", "be", "da", "fu", "go", "pi", "ze"]
NAMES = ["Ada Lovelace", "Alan Turing", "Grace Hopper", "Edsger Dijkstra", "Barbara Liskov",
         "Donald Knuth", "Frances Allen", "John Backus", "Leslie Lamport", "Margaret Hamilton",
         "Niklaus Wirth", "Radia Perlman", "Tony Hoare", "Ken Thompson", "Dennis Ritchie"]


# ------------------------------------------------------------------------------ data
def alpaca_records(n: int, seed: int) -> list[dict]:
    """Alpaca-style records (instruction, input, output, category) of four tasks a user might
    bring, different from the built-in families; `category` lets the partition be non-IID."""
    rng = random.Random(seed)

    def word() -> str:
        return "".join(rng.choice(SYLLABLES) for _ in range(rng.randint(2, 4)))

    def reverse() -> dict:
        w = word()
        return {"instruction": "Reverse the letters of the word.", "input": w, "output": w[::-1],
                "category": "reverse"}

    def vowels() -> dict:
        w = word()
        return {"instruction": "How many vowels does this word have?", "input": w,
                "output": str(sum(c in "aeiou" for c in w)), "category": "vowels"}

    def fahrenheit() -> dict:
        c = rng.randint(-40, 120)
        return {"instruction": "Convert this Celsius temperature to Fahrenheit, rounded to a "
                "whole degree.", "input": f"{c} C", "output": f"{round(c * 9 / 5 + 32)} F",
                "category": "fahrenheit"}

    def initials() -> dict:
        name = rng.choice(NAMES) if rng.random() < 0.3 else f"{word().title()} {word().title()}"
        return {"instruction": "Write the initials of this name.", "input": name,
                "output": "".join(p[0] + "." for p in name.split()), "category": "initials"}

    makers = [reverse, vowels, fahrenheit, initials]
    return [makers[i % len(makers)]() for i in range(n)]


def write_alpaca(path: Path, seed: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, "".join(json.dumps(r) + "\n" for r in alpaca_records(ALPACA_RECORDS, seed)))
    return path


def profile_for(base: Path, out: Path, dataset: str, seed: int, local_steps: int | None,
                eval_samples: int | None) -> Path:
    """The benchmark profile with this data set and seed (and optional overrides)."""
    raw = yaml.safe_load(base.read_text())
    task = raw.setdefault("task", {})
    task.update({"dataset": dataset, "seed": seed})
    if local_steps:
        task["local_steps"] = local_steps
    if eval_samples:
        task["eval_samples"] = eval_samples
    path = out / "profile.yaml"
    out.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def base_loss(plan: Plan, device: str) -> dict:
    """The untrained model on the held-out split the runs evaluate on."""
    from fedpipe.data import evaluate
    from fedpipe.models import load_base, load_tokenizer

    model_dir = plan_model_dir(plan)
    held_out = plan_data(plan, plan.task.eval_samples)[1]
    r = evaluate(load_base(model_dir, 16, device=device), load_tokenizer(model_dir), held_out,
                 plan.task.seq_len)
    return {"loss": r["loss"], "accuracy": r["accuracy"]}


# ------------------------------------------------------------------------------ runs
def contenders(objectives: list[str]) -> dict[str, tuple[str, str | None]]:
    """Plan name -> (strategy, objective): every strategy as the profile says, and the optimiser
    again under each other objective named (``fedpipe-rate``), in the same budget and seeds."""
    out: dict[str, tuple[str, str | None]] = {n: (n, None) for n in strategy_names()}
    out.update({f"fedpipe-{o}": ("fedpipe", o) for o in objectives})
    return out


def budget_rounds(makespans: dict[str, float], cap: int) -> tuple[float, dict[str, int]]:
    """Federation time budget (cap x the fastest makespan) and the rounds each plan fits in it."""
    budget = cap * min(makespans.values())
    return budget, {n: max(1, min(cap, math.floor(budget / m + 1e-9))) for n, m in makespans.items()}


def curve(rows: list[dict], makespan: float) -> list[dict]:
    """Per round: simulated federation time, cumulative counted bytes, eval loss and accuracy."""
    out, total = [], 0
    for r in rows:
        total += sum(s["upload_bytes"] + s["download_bytes"] for s in r["servers"])
        out.append({"round": r["round"], "time_s": r["round"] * makespan, "bytes": total,
                    "loss": r["eval"]["loss"], "accuracy": r["eval"]["accuracy"]})
    return out


# ------------------------------------------------------------------------------ analysis
def first_reaching(points: list[dict], target: float) -> dict | None:
    return next((p for p in points if p["loss"] <= target), None)


def mean_curve(curves: list[list[dict]]) -> list[dict]:
    """Round by round mean over seeds (rounds all seeds reached)."""
    n = min(len(c) for c in curves)
    return [{k: statistics.fmean(c[i][k] for c in curves) for k in ("time_s", "bytes", "loss", "accuracy")}
            | {"round": curves[0][i]["round"]} for i in range(n)]


def spread(values: list[float]) -> float:
    return statistics.stdev(values) if len(values) > 1 else 0.0


def analyse(runs: dict[str, dict[int, dict]], base: dict[int, dict]) -> dict:
    """Target, per-strategy quality under budget and cost to target (see the module docstring)."""
    means = {n: mean_curve([r["curve"] for r in by_seed.values()]) for n, by_seed in runs.items()}
    base_mean = statistics.fmean(b["loss"] for b in base.values())
    best = min(p["loss"] for c in means.values() for p in c)
    target = base_mean + TARGET_SHARE * (best - base_mean)
    byte_budget = min(c[-1]["bytes"] for c in means.values())
    out = {}
    for name, by_seed in runs.items():
        mean = means[name]
        reached = first_reaching(mean, target)
        in_bytes = [p for p in mean if p["bytes"] <= byte_budget + 0.5]
        per_seed = {s: first_reaching(r["curve"], target) for s, r in by_seed.items()}
        finals = [r["curve"][-1] for r in by_seed.values()]
        out[name] = {
            "seeds": len(by_seed), "rounds": len(mean), "makespan_s": by_seed[min(by_seed)]["makespan_s"],
            "time_to_target_s": reached and reached["time_s"],
            "bytes_to_target": reached and round(reached["bytes"]),
            "time_to_target_per_seed_s": {s: p and p["time_s"] for s, p in per_seed.items()},
            "loss_at_budget": mean[-1]["loss"], "loss_at_budget_spread": spread([f["loss"] for f in finals]),
            "accuracy_at_budget": mean[-1]["accuracy"],
            "accuracy_at_budget_spread": spread([f["accuracy"] for f in finals]),
            "loss_at_byte_budget": in_bytes[-1]["loss"] if in_bytes else None,
            "bytes_per_round": mean[-1]["bytes"] / len(mean),
            "loss_per_round": [p["loss"] for p in mean],
        }
    return {"target_loss": target, "base_loss": base_mean, "best_loss": best,
            "byte_budget": byte_budget, "strategies": out}


def fmt_time(s: float | None) -> str:
    return "not reached" if s is None else f"{s:.0f} s"


def fmt_bytes(b: float | None) -> str:
    return "not reached" if b is None else f"{b / 1e6:.1f} MB"


def report(label: str, a: dict, budget_s: float) -> list[str]:
    """The Markdown table and the fedpipe ratios for one data set."""
    lines = [f"\n### {label}: target loss {a['target_loss']:.4f} (base {a['base_loss']:.4f}, best "
             f"{a['best_loss']:.4f}, {TARGET_SHARE:.0%} of the way); time budget {budget_s:.0f} s, "
             f"byte budget {a['byte_budget'] / 1e6:.1f} MB", "",
             "| strategy | makespan | rounds | loss at time budget | exact match | loss at byte budget "
             "| time to target | bytes to target | time to target per seed |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, s in a["strategies"].items():
        per_seed = ", ".join(fmt_time(t) for t in s["time_to_target_per_seed_s"].values())
        at_bytes = "-" if s["loss_at_byte_budget"] is None else f"{s['loss_at_byte_budget']:.4f}"
        lines.append(f"| {name} | {s['makespan_s']:.1f} s | {s['rounds']} | {s['loss_at_budget']:.4f} ± "
                     f"{s['loss_at_budget_spread']:.4f} | {s['accuracy_at_budget']:.2f} ± "
                     f"{s['accuracy_at_budget_spread']:.2f} | {at_bytes} | "
                     f"{fmt_time(s['time_to_target_s'])} | {fmt_bytes(s['bytes_to_target'])} | {per_seed} |")
    for own, ours in a["strategies"].items():
        if not own.startswith("fedpipe"):
            continue
        lines.append("")
        for name, s in a["strategies"].items():
            if name.startswith("fedpipe"):
                continue
            t0, t1 = ours["time_to_target_s"], s["time_to_target_s"]
            ratio = ("both not reached" if t0 is None and t1 is None else f"{own} not reached"
                     if t0 is None else "∞ (it does not reach the target)" if t1 is None
                     else f"{t1 / t0:.2f}×")
            lines.append(f"{own} vs {name}: time to target {ratio} faster · loss at budget "
                         f"{ours['loss_at_budget']:.4f} vs {s['loss_at_budget']:.4f}")
    return lines


# ------------------------------------------------------------------------------ main
def teller(log: Path) -> Callable[[str], None]:
    """A `say(line)` that prints and appends to `log` (emptied first): the output file is the
    printed report, line for line."""
    log.parent.mkdir(parents=True, exist_ok=True)
    log.write_text("")

    def say(line: str = "") -> None:
        print(line, flush=True)
        with log.open("a") as f:
            f.write(line + "\n")

    return say


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", default=str(PROFILE))
    parser.add_argument("--seeds", default="0,1", help="task seeds, comma-separated")
    parser.add_argument("--rounds-cap", type=int, default=8, help="rounds of the fastest plan")
    parser.add_argument("--only", default="", help="strategies, comma-separated (default: all)")
    parser.add_argument("--data", default="builtin,alpaca", help="builtin, alpaca or both")
    parser.add_argument("--objectives", default="", help="also plan the optimiser under these "
                        "objectives (rate), as fedpipe-OBJECTIVE, in the same budget")
    parser.add_argument("--local-steps", type=int, help="override the profile's task.local_steps")
    parser.add_argument("--eval-samples", type=int, help="override the profile's task.eval_samples")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's, one per core)")
    parser.add_argument("--out", default="runs/bench-strategies")
    parser.add_argument("--results", default=str(RESULTS), help="PATH.txt and PATH.json are written")
    args = parser.parse_args()
    hf_logging.disable_progress_bar()
    if args.threads:
        torch.set_num_threads(args.threads)

    out, results = Path(args.out), Path(args.results)
    log = results.with_suffix(".txt")
    say = teller(log)
    plans_made = contenders([o.strip() for o in args.objectives.split(",") if o.strip()])
    names = [n.strip().lower() for n in args.only.split(",") if n.strip()] or list(plans_made)
    unknown = sorted(set(names) - set(plans_made))
    if unknown:
        parser.error(f"--only: unknown {unknown}; valid: {', '.join(plans_made)}")
    seeds = [int(s) for s in args.seeds.split(",")]
    datasets = [d.strip() for d in args.data.split(",") if d.strip()]
    say("$ python benchmarks/bench_strategies.py"
        + (f" --profile {args.profile}" if Path(args.profile) != PROFILE else "")
        + f" --seeds {args.seeds} --rounds-cap {args.rounds_cap} "
        f"--data {args.data}" + (f" --only {args.only}" if args.only else "")
        + (f" --objectives {args.objectives}" if args.objectives else "")
        + (f" --local-steps {args.local_steps}" if args.local_steps else "")
        + (f" --eval-samples {args.eval_samples}" if args.eval_samples else ""))
    summary: dict = {}
    for data in datasets:
        source = {"builtin": "builtin", "alpaca": str(write_alpaca(out / "alpaca.jsonl").resolve())}[data]
        runs: dict[str, dict[int, dict]] = {}
        base: dict[int, dict] = {}
        for seed in seeds:
            where = out / f"{data}-seed{seed}"
            profile = profile_for(Path(args.profile), where, source, seed, args.local_steps,
                                  args.eval_samples)
            plans = {}
            for name, (strategy, objective) in plans_made.items():  # the budget is the fastest's
                path = where / f"{name}.plan.yaml"
                if not path.is_file():
                    save_plan(make_plan(profile, strategy, objective=objective), path)
                plans[name] = load_plan(path)
            budget_s, rounds = budget_rounds({n: p.summary.makespan_s for n, p in plans.items()},
                                             args.rounds_cap)
            key = f"{data}/seed{seed}"
            state_path = where / "results.json"  # one per data set and seed: seeds run as parallel processes
            entry = json.loads(state_path.read_text()) if state_path.is_file() else {}
            if "base" not in entry:
                entry["base"] = base_loss(plans[names[0]], args.device)
                write_atomic(state_path, json.dumps(entry, indent=2))
            base[seed] = entry["base"]
            say(f"[{key}] base model: loss {base[seed]['loss']:.4f} · time budget {budget_s:.0f} s · "
                + ", ".join(f"{n} {rounds[n]} rounds" for n in names))
            for name in names:
                if name not in entry:
                    start = time.perf_counter()
                    result = run_plan(where / f"{name}.plan.yaml", rounds=rounds[name],
                                      out=where / name, device=args.device, resume=True)
                    makespan = plans[name].summary.makespan_s
                    entry[name] = {"makespan_s": makespan, "curve": curve(result.rows, makespan),
                                   "seconds": time.perf_counter() - start,
                                   "steps": sum(s["steps"] for r in result.rows for s in r["servers"])}
                    write_atomic(state_path, json.dumps(entry, indent=2))  # after every run
                r = entry[name]
                say(f"[{key}] {name}: {len(r['curve'])} rounds · loss "
                    + " ".join(f"{p['loss']:.3f}" for p in r["curve"])
                    + f" · {r['curve'][-1]['bytes'] / 1e6:.1f} MB · {r['seconds']:.0f} s here "
                    f"({r['seconds'] / max(r['steps'], 1):.2f} s per local step incl. eval and loading)")
                runs.setdefault(name, {})[seed] = r
        analysis = analyse(runs, base)
        analysis["time_budget_s"] = budget_s
        summary[data] = analysis
        for line in report(f"{data} data, seeds {args.seeds}", analysis, budget_s):
            say(line)
        write_json(results.with_suffix(".json"), summary, datasets[0], args, seeds)  # per data set
    say(f"\nwrote {log} and {results.with_suffix('.json')}")


def write_json(path: Path, summary: dict, primary: str, args: argparse.Namespace, seeds: list[int]) -> None:
    """{"target_loss", "strategies": {NAME: {time_to_target_s, bytes_to_target, loss_at_budget,
    seeds}}} for the first data set, every data set's full analysis under "datasets"."""
    first = summary.get(primary) or next(iter(summary.values()))
    payload = {"target_loss": first["target_loss"],
               "strategies": {n: {k: s[k] for k in ("time_to_target_s", "bytes_to_target",
                                                      "loss_at_budget", "seeds")}
                              for n, s in first["strategies"].items()},
               "data": primary if primary in summary else next(iter(summary)), "datasets": summary,
               "settings": {"profile": args.profile, "seeds": seeds, "rounds_cap": args.rounds_cap,
                            "local_steps": args.local_steps, "eval_samples": args.eval_samples,
                            "target_share": TARGET_SHARE, "device": args.device}}
    path.write_text(json.dumps(payload, indent=2) + "\n")


if __name__ == "__main__":
    main()
