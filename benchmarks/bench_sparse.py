"""Sparse communication: bytes per round and final quality, dense against top-k and lower ranks.

On the bundled SmolLM2-135M and the built-in non-IID task data (Dirichlet over task families),
plan a two-server profile once (`PROFILE`, small.yaml's servers at 16 bits: the base precision
does not change what travels), then run the same plan
  * dense (upload and download density 1),
  * at upload + download density 1/4 and 1/16 (top-k, bitmask or indices, float32 values), and
    at upload density 1/4 alone (which side costs the quality),
  * dense at lower ranks near those bytes: each rank divided by 4 and by 16 (at least 1; top-k
    at 1/4 costs 0.28x the dense values, at 1/16 0.09x, mask included),
  * what `fedpipe plan` itself picks for this profile with its default density ladder,
and print bytes per round (counted on the payloads: upload and download, all servers, averaged
over the rounds) and the global model's final eval loss and exact-match accuracy, as Markdown,
plus the largest byte reduction whose eval loss stays within 1% of dense. The base model's loss
is printed too, with each run's share of dense's improvement over it: at a few rounds that is
the honest scale for "within 1%".

Round 1's broadcast is empty and round 2's is dense (nothing is held yet to be relative to), so
downloads only shrink from round 3: the byte figures count every round, those first two included.

    python benchmarks/bench_sparse.py                          # the figures in the README
    python benchmarks/bench_sparse.py --rounds 1 --local-steps 1 --eval-samples 10   # smoke run
"""

from __future__ import annotations

import argparse
import json
import re
import tempfile
import time
from pathlib import Path

import yaml
from transformers.utils import logging as hf_logging

from fedpipe.data import plan_data
from fedpipe.federation.inprocess import run_plan
from fedpipe.federation.spec import with_communication
from fedpipe.models import plan_model_dir
from fedpipe.plan import Plan, load_plan, save_plan

PROFILE = {
    "name": "sparse-bench", "model": "smollm2-135m", "aggregation": "flexlora",
    "task": {"seq_len": 64, "local_steps": 3, "rounds": 3, "eval_samples": 48,
             "learning_rate": 2e-3, "partition": "dirichlet", "dirichlet_alpha": 0.5},
    "candidates": {"targets": ["q_proj", "v_proj"], "ranks": [0, 4, 8], "bits": [16],
                   "batch_sizes": [4], "densities": [1.0]},  # dense: the variants derive from it
    # pinned: every figure was measured on weighted-objective plans (rate, now the default, gives
    # the edge fewer, mixed-rank matrices: another plan, not another encoding)
    "objective": {"kind": "weighted"},
    "servers": [
        {"name": "edge", "memory_gib": 2, "tflops": 1, "uplink_mbps": 10, "downlink_mbps": 50,
         "samples": 100, "device": "cpu"},
        {"name": "hub", "memory_gib": 4, "tflops": 20, "uplink_mbps": 500, "downlink_mbps": 500,
         "samples": 300, "device": "cpu"},
    ],
}


def lower_rank(plan: Plan, divisor: int) -> Plan:
    """Every adapted module's rank divided by `divisor` (at least 1), dense."""
    servers = [s.model_copy(update={"rank_pattern": {n: max(1, r // divisor) for n, r in
                                                     s.rank_pattern.items()}}) for s in plan.servers]
    return plan.model_copy(update={"servers": servers})


def planner_choice(plan: Plan) -> Plan:
    """What `fedpipe plan` picks for PROFILE with the default density ladder (1, 1/4, 1/16)."""
    from fedpipe.planning.strategies import make_plan
    from fedpipe.profile import Candidates

    with tempfile.TemporaryDirectory() as tmp:
        profile = Path(tmp) / "profile.yaml"
        raw = {**PROFILE, "candidates": {**PROFILE["candidates"],
                                         "densities": Candidates().densities}}
        profile.write_text(yaml.safe_dump(raw, sort_keys=False))
        chosen = make_plan(profile)
    return chosen.model_copy(update={"profile": plan.profile})


def variants(plan: Plan) -> dict[str, Plan]:
    chosen = planner_choice(plan)
    label = ", ".join(f"{s.name} {s.upload_density:g}" for s in chosen.servers)
    return {
        "dense": plan,
        f"planner's choice ({label})": chosen,
        "density 1/4": with_communication(plan, upload_density=1 / 4, download_density=1 / 4),
        "density 1/16": with_communication(plan, upload_density=1 / 16, download_density=1 / 16),
        "upload 1/4, download dense": with_communication(plan, upload_density=1 / 4),
        "rank / 4, dense": lower_rank(plan, 4),
        "rank / 16, dense": lower_rank(plan, 16),
    }


def summarise(rows: list[dict]) -> dict:
    up = [sum(s["upload_bytes"] for s in r["servers"]) for r in rows]
    down = [sum(s["download_bytes"] for s in r["servers"]) for r in rows]
    last = rows[-1]["eval"]
    return {"upload_bytes_per_round": sum(up) / len(up), "download_bytes_per_round": sum(down) / len(down),
            "upload_bytes_last_round": up[-1], "download_bytes_last_round": down[-1],
            "loss": last["loss"], "accuracy": last["accuracy"],
            "loss_per_round": [r["eval"]["loss"] for r in rows]}


def base_eval(plan: Plan, n_eval: int, device: str) -> dict:
    """The untrained base model on the same held-out split the runs evaluate on."""
    from fedpipe.data import evaluate
    from fedpipe.models import load_base, load_tokenizer

    model_dir = plan_model_dir(plan)
    held_out = plan_data(plan, n_eval)[1]
    result = evaluate(load_base(model_dir, 16, device=device), load_tokenizer(model_dir), held_out,
                      plan.task.seq_len)
    return {"loss": result["loss"], "accuracy": result["accuracy"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", help="a profile YAML (default: PROFILE above)")
    parser.add_argument("--rule", default="flexlora")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--local-steps", type=int, default=3)
    parser.add_argument("--eval-samples", type=int, default=48)
    parser.add_argument("--only", default="", help="variant names separated by ';' (default: all)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", default="runs/bench-sparse")
    args = parser.parse_args()
    hf_logging.disable_progress_bar()

    out = Path(args.out)
    frozen = out / "dense.plan.yaml"  # planned once; a re-run (or a resumed one) reuses it
    if not frozen.is_file():
        from fedpipe.planning.strategies import make_plan

        profile = Path(args.profile) if args.profile else out / "profile.yaml"
        if not args.profile:
            out.mkdir(parents=True, exist_ok=True)
            profile.write_text(yaml.safe_dump(PROFILE, sort_keys=False))
        save_plan(make_plan(profile), frozen)
    plan = load_plan(frozen)
    wanted = [v.strip() for v in args.only.split(";") if v.strip()]
    results_path = out / "results.json"
    results = json.loads(results_path.read_text()) if results_path.is_file() else {}
    base = results.pop("base model", None)
    if base is None and (not wanted or "base model" in wanted):
        base = base_eval(plan, args.eval_samples, args.device)
        print(f"base model: loss {base['loss']:.4f} accuracy {base['accuracy']:.3f}", flush=True)
    if base is not None:
        results = {"base model": base} | results
        results_path.write_text(json.dumps(results, indent=2))
    for label, variant in variants(plan).items():
        if (wanted and label not in wanted) or label in results:
            continue
        slug = re.sub(r"[^A-Za-z0-9.]+", "-", label.replace("/", "of")).strip("-")
        plan_path = save_plan(variant, out / f"{slug}.plan.yaml")
        start = time.perf_counter()
        result = run_plan(plan_path, rounds=args.rounds, out=out / slug, aggregation=args.rule,
                          local_steps=args.local_steps, eval_samples=args.eval_samples,
                          device=args.device, resume=True)
        results[label] = summarise(result.rows) | {"seconds": time.perf_counter() - start}
        print(f"{label}: loss {results[label]['loss']:.4f} accuracy {results[label]['accuracy']:.3f} "
              f"({results[label]['seconds']:.0f} s)", flush=True)
        results_path.write_text(json.dumps(results, indent=2))  # after every run

    if "dense" not in results:
        return
    dense = results["dense"]
    dense_bytes = dense["upload_bytes_per_round"] + dense["download_bytes_per_round"]
    dense_last = dense["upload_bytes_last_round"] + dense["download_bytes_last_round"]
    base = results.get("base model")
    print("\n| run | up / round | down / round | up, last round | down, last round | bytes vs dense "
          "(all rounds / last) | eval loss | vs dense | share of dense's gain | exact match |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    best = None
    for label, r in results.items():
        change = r["loss"] / dense["loss"] - 1
        gain = "" if base is None else f"{(base['loss'] - r['loss']) / (base['loss'] - dense['loss']):.0%}"
        if label == "base model":
            print(f"| base model | | | | | | {r['loss']:.4f} | {change:+.2%} | 0% | {r['accuracy']:.3f} |")
            continue
        total = r["upload_bytes_per_round"] + r["download_bytes_per_round"]
        last = r["upload_bytes_last_round"] + r["download_bytes_last_round"]
        reduction = dense_bytes / total
        if label != "dense" and change <= 0.01 and (best is None or reduction > best[1]):
            best = (label, reduction)
        print(f"| {label} | {r['upload_bytes_per_round'] / 1e6:.2f} MB | "
              f"{r['download_bytes_per_round'] / 1e6:.2f} MB | {r['upload_bytes_last_round'] / 1e6:.2f} MB | "
              f"{r['download_bytes_last_round'] / 1e6:.2f} MB | "
              f"{total / dense_bytes:.2f}× / {last / dense_last:.2f}× | "
              f"{r['loss']:.4f} | {change:+.2%} | {gain} | {r['accuracy']:.3f} |")
    print("\nlargest byte reduction with eval loss within 1% of dense: "
          + (f"{best[1]:.1f}× ({best[0]})" if best else "none (no reduced run stays within 1%)"))
    print(f"(profile {args.profile or 'PROFILE'}, rule {args.rule}, {args.rounds} rounds, "
          f"{args.local_steps} local steps, {args.eval_samples} held-out examples, device {args.device})")


if __name__ == "__main__":
    main()
