"""Does the planner's quality model rank real plans? Spearman over plans, prior against fitted (issue 12.4).

The planner values a plan by its predicted quality (``fedpipe.planning.problem.evaluate``): per
round, sample-weighted importance covered x rank gain x what bits and batch keep. This benchmark
makes at least eight different plans for one profile (the six strategies, the optimiser under
other objectives, and the optimiser planning with the fitted model), trains each for the same
rounds in-process on the bundled SmolLM2-135M (non-IID built-in data, each seed: data, partition
and initialisation), and correlates each plan's predicted quality with its measured eval-loss
improvement (the base model's held-out loss minus the loss after the last round; mean over
seeds), under the prior quality model and under the one `fedpipe calibrate --quality` fitted.
Target (issue 12.4): Spearman rho >= 0.8 over >= 8 plans.

    fedpipe calibrate --quality benchmarks/profiles/strategies.yaml --probe-steps 8 --eval-samples 32 \\
        -o runs/bench-quality/quality.yaml
    python benchmarks/bench_quality.py --quality runs/bench-quality/quality.yaml

Without --quality the probes run first (seed 0, 8 steps). Re-running with the same --out reuses
finished runs (a crash keeps what finished; --analyse-only reports what did). On the 2-core CPU
a SmolLM2 step at batch 4 costs seconds, so the defaults are one seed, one round of two local
steps and 32 held-out examples (about 1-9 minutes a plan, 8-bit servers the slowest).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import yaml
from bench_strategies import base_loss, curve, profile_for, teller
from transformers.utils import logging as hf_logging

from fedpipe.atomic import write_atomic
from fedpipe.federation.inprocess import run_plan
from fedpipe.plan import load_plan, save_plan
from fedpipe.planning.explain import plan_problem_context
from fedpipe.planning.problem import evaluate
from fedpipe.planning.strategies import make_plan, strategy_names

ROOT = Path(__file__).resolve().parent
PROFILE = ROOT / "profiles" / "strategies.yaml"
RESULTS = ROOT / "results" / "quality-cpu"
TARGET_RHO = 0.8
TIME_WEIGHTS = {"tw0": 0.0, "tw5": 5.0}  # the optimiser's other time weights, as profile variants


def ranks(values: list[float]) -> list[float]:
    """1-based ranks, ties sharing their mean rank."""
    order = sorted(range(len(values)), key=values.__getitem__)
    out = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in range(i, j + 1):
            out[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return out


def spearman(a: list[float], b: list[float]) -> float:
    """Spearman's rho: Pearson's correlation of the ranks (ties averaged)."""
    ra, rb = ranks(a), ranks(b)
    ma, mb = statistics.mean(ra), statistics.mean(rb)
    cov = sum((x - ma) * (y - mb) for x, y in zip(ra, rb, strict=True))
    var = (sum((x - ma) ** 2 for x in ra) * sum((y - mb) ** 2 for y in rb)) ** 0.5
    return cov / var if var else float("nan")


def variant_profile(prior: Path, name: str, quality: Path) -> Path:
    """The prior profile (prior), other time weights (tw0, tw5), or the prior with the fitted
    quality model (fitted; `quality` is read only then, so the prior plans can run while the
    probes still do)."""
    if name == "prior":
        return prior
    raw = yaml.safe_load(prior.read_text())
    path = prior.with_name(f"{name}.yaml")
    if not path.is_file():
        update = ({"calibration": yaml.safe_load(quality.read_text())["calibration"]}
                  if name == "fitted" else
                  {"objective": {**raw.get("objective", {}), "time_weight": TIME_WEIGHTS[name]}})
        write_atomic(path, yaml.safe_dump({**raw, **update}, sort_keys=False))
    return path


def plan_recipes() -> list[tuple[str, str, str, str | None]]:
    """(plan name, profile variant, strategy, objective)."""
    return ([(n, "prior", n, None) for n in strategy_names()]
            + [("fedpipe-rate", "prior", "fedpipe", "rate"), ("fedpipe-tw0", "tw0", "fedpipe", None),
               ("fitted", "fitted", "fedpipe", None), ("fitted-rate", "fitted", "fedpipe", "rate"),
               ("fedpipe-tw5", "tw5", "fedpipe", None)])


def predicted(plan_path: Path, profile: Path) -> float:
    problem, choices, _ = plan_problem_context(load_plan(plan_path), profile)
    return evaluate(problem, choices).quality


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", default=str(PROFILE))
    parser.add_argument("--quality", help="YAML with the calibration block of fedpipe calibrate "
                        "--quality (default: run the probes first, seed 0)")
    parser.add_argument("--seeds", default="0", help="task seeds, comma-separated")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--local-steps", type=int, default=2)
    parser.add_argument("--eval-samples", type=int, default=32)
    parser.add_argument("--analyse-only", action="store_true", help="no training: the analysis of "
                        "the runs finished in --out (plans with a run for every seed)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", default="runs/bench-quality")
    parser.add_argument("--results", default=str(RESULTS), help="PATH.txt and PATH.json are written")
    args = parser.parse_args()
    hf_logging.disable_progress_bar()
    out, results = Path(args.out), Path(args.results)
    out.mkdir(parents=True, exist_ok=True)
    log = results.with_suffix(".txt")
    say = teller(log)
    say("$ python benchmarks/bench_quality.py " + " ".join(
        f"--{k.replace('_', '-')}" + ("" if v is True else f" {v}")
        for k, v in vars(args).items() if v not in (None, False)))
    quality_path = Path(args.quality) if args.quality else out / "quality.yaml"
    if not args.quality and not quality_path.is_file():
        from fedpipe.quality import run_quality_probes, write_quality

        base_profile = profile_for(Path(args.profile), out / "probe", "builtin", 0, args.local_steps,
                                   args.eval_samples)
        write_quality(run_quality_probes(base_profile, steps=8, seeds=[0], eval_samples=32,
                                         device=args.device),
                      quality_path, "benchmarks/bench_quality.py (probes, seed 0, 8 steps)")
    seeds = [int(s) for s in args.seeds.split(",")]
    state_path = out / "results.json"
    state = json.loads(state_path.read_text()) if state_path.is_file() else {}
    recipes = plan_recipes()
    for seed in [] if args.analyse_only else seeds:
        where = out / f"seed{seed}"
        prior = profile_for(Path(args.profile), where, "builtin", seed, args.local_steps,
                            args.eval_samples)
        entry = state.setdefault(f"seed{seed}", {})
        for name, variant, strategy, objective in recipes:
            path = where / f"{name}.plan.yaml"
            if not path.is_file():
                profile = variant_profile(prior, variant, quality_path)
                save_plan(make_plan(profile, strategy, objective=objective), path)
            if "base" not in entry:
                entry["base"] = base_loss(load_plan(path), args.device)
                write_atomic(state_path, json.dumps(state, indent=1))
            if name not in entry:
                start = time.perf_counter()
                result = run_plan(where / f"{name}.plan.yaml", rounds=args.rounds, out=where / name,
                                  device=args.device, resume=True)
                points = curve(result.rows, load_plan(where / f"{name}.plan.yaml").summary.makespan_s)
                entry[name] = {"losses": [p["loss"] for p in points], "bytes": points[-1]["bytes"],
                               "seconds": round(time.perf_counter() - start, 1)}
                write_atomic(state_path, json.dumps(state, indent=1))
            r = entry[name]
            say(f"[seed {seed}] {name}: base {entry['base']['loss']:.4f} -> "
                + " ".join(f"{x:.4f}" for x in r["losses"]) + f" ({r['seconds']:.0f} s here)")

    quality_model = yaml.safe_load(quality_path.read_text())["calibration"]["quality"]
    say(f"quality model: {quality_path} ({quality_model['probes']})")
    where = out / f"seed{seeds[0]}"
    prior = where / "profile.yaml"
    done = [name for name, *_ in recipes if all(name in state.get(f"seed{s}", {}) for s in seeds)]
    pred = {name: {m: predicted(where / f"{name}.plan.yaml", variant_profile(prior, m, quality_path))
                   for m in ("prior", "fitted")} for name in done}
    rows = []
    for name in done:
        gains = [state[f"seed{s}"]["base"]["loss"] - state[f"seed{s}"][name]["losses"][-1] for s in seeds]
        rows.append({"plan": name, "prior": pred[name]["prior"], "fitted": pred[name]["fitted"],
                     "improvement": statistics.mean(gains), "per_seed": gains})
    rho = {m: spearman([r[m] for r in rows], [r["improvement"] for r in rows]) for m in ("prior", "fitted")}
    per_seed = {m: [spearman([r[m] for r in rows], [r["per_seed"][i] for r in rows])
                    for i in range(len(seeds))] for m in ("prior", "fitted")}
    say("")
    say(f"{len(rows)} plans, {args.rounds} rounds of {args.local_steps} local steps, seeds {args.seeds}, "
        f"{args.eval_samples} held-out examples"
        + (f"; not run for every seed: {', '.join(n for n, *_ in recipes if n not in done)}"
           if len(done) < len(recipes) else ""))
    say("| plan | predicted quality (prior) | predicted quality (fitted) | measured improvement "
        "(mean) | per seed |")
    say("|---|---|---|---|---|")
    for r in sorted(rows, key=lambda r: -r["improvement"]):
        say(f"| {r['plan']} | {r['prior']:.3f} | {r['fitted']:.3f} | {r['improvement']:.4f} | "
            + ", ".join(f"{g:.4f}" for g in r["per_seed"]) + " |")
    for m in ("prior", "fitted"):
        verdict = "met" if rho[m] >= TARGET_RHO else "missed"
        say(f"Spearman rho, {m} model: {rho[m]:.3f} on the seed means (per seed "
            + ", ".join(f"{x:.3f}" for x in per_seed[m]) + f"); target >= {TARGET_RHO}: {verdict}")
    write_atomic(results.with_suffix(".json"), json.dumps(
        {"target_rho": TARGET_RHO, "rho": rho, "rho_per_seed": per_seed, "plans": rows,
         "quality_model": quality_model, "settings": {
             "rounds": args.rounds, "local_steps": args.local_steps, "seeds": seeds,
             "eval_samples": args.eval_samples, "profile": args.profile}}, indent=1) + "\n")
    say(f"\nwrote {log} and {results.with_suffix('.json')}")


if __name__ == "__main__":
    main()
