"""Does a heterogeneous plan learn? Four aggregation rules against two references, on real data.

On the bundled SmolLM2-135M and the built-in non-IID task data, run the shipped heterogeneous
plan under fedit / hetlora / flora / flexlora, and compare with
  * the homogeneous plan: every server forced to the configuration the weakest can run, and
  * centralised LoRA: one server holding all the data, trained for the same number of samples
    per round (sum over servers of local_steps x batch) at the strongest server's ranks.
Prints eval loss and exact-match accuracy of the global model per round, as a Markdown table.

    python benchmarks/bench_learning.py                      # the README's figures
    python benchmarks/bench_learning.py --rounds 1 --local-steps 2 --eval-samples 20   # a smoke run
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

from transformers.utils import logging as hf_logging

from fedpipe.federation.inprocess import run_plan
from fedpipe.plan import Plan, ServerPlan, load_plan, save_plan

ROOT = Path(__file__).resolve().parent.parent


def homogeneous_plan(plan: Plan) -> Plan:
    """The planner's own homogeneous plan for the same profile (`fedpipe plan --strategy
    homogeneous`): every server on what the weakest can run, dense, with its own predictions."""
    from fedpipe.planning.strategies import make_plan

    return make_plan(plan.profile.path, "homogeneous")


def centralised_plan(plan: Plan, local_steps: int) -> tuple[Plan, int]:
    """One server with all the samples, the strongest server's ranks, the same samples per round."""
    strongest = max(plan.servers, key=lambda s: (s.predicted.lora_params, s.bits))
    per_round = sum(s.count * local_steps * s.batch_size for s in plan.servers if s.rank_pattern)
    batch = max(s.batch_size for s in plan.servers)
    central = ServerPlan(
        name="central", count=1, members=["central"], samples=sum(s.count * s.samples for s in plan.servers),
        device=strongest.device, bits=16, batch_size=batch, rank_pattern=dict(strongest.rank_pattern),
        lora_alpha_ratio=strongest.lora_alpha_ratio, importance_covered=strongest.importance_covered,
        predicted=strongest.predicted, binding=[])
    return plan.model_copy(update={"servers": [central]}), math.ceil(per_round / batch)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--plan", default=str(ROOT / "plans" / "cluster.plan.yaml"))
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--local-steps", type=int, default=8)
    parser.add_argument("--eval-samples", type=int, default=150)
    parser.add_argument("--rules", default="fedit,hetlora,flora,flexlora")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", default="runs/bench-learning")
    args = parser.parse_args()
    hf_logging.disable_progress_bar()

    out = Path(args.out)
    plan = load_plan(args.plan)
    # frozen copies of the three plans, made once (a re-run, e.g. on another machine, reuses them)
    frozen = {name: out / f"{name}.plan.yaml" for name in ("heterogeneous", "homogeneous", "centralised")}
    if not all(p.is_file() for p in frozen.values()):
        save_plan(plan, frozen["heterogeneous"])
        save_plan(homogeneous_plan(plan), frozen["homogeneous"])
        save_plan(centralised_plan(plan, args.local_steps)[0], frozen["centralised"])
    central_steps = centralised_plan(plan, args.local_steps)[1]
    runs: dict[str, tuple[Path, str, int]] = {}
    for rule in args.rules.split(","):
        runs[f"heterogeneous · {rule}"] = (frozen["heterogeneous"], rule, args.local_steps)
    runs["homogeneous · flexlora"] = (frozen["homogeneous"], "flexlora", args.local_steps)
    runs["centralised"] = (frozen["centralised"], "fedit", central_steps)

    results = {}
    for label, (plan_path, rule, steps) in runs.items():
        start = time.perf_counter()
        result = run_plan(plan_path, rounds=args.rounds, out=out / label.replace(" · ", "-"),
                          aggregation=rule, local_steps=steps, eval_samples=args.eval_samples,
                          device=args.device, resume=True)
        results[label] = {"rounds": [{"round": r["round"], "loss": r["eval"]["loss"],
                                      "accuracy": r["eval"]["accuracy"]} for r in result.rows],
                          "seconds": time.perf_counter() - start,
                          "upload_bytes_per_round": sum(s["upload_bytes"]
                                                        for s in result.rows[-1]["servers"])}
        last = result.rows[-1]["eval"]
        print(f"{label}: loss {last['loss']:.3f} accuracy {last['accuracy']:.3f} "
              f"({results[label]['seconds']:.0f} s)", flush=True)
        (out / "results.json").write_text(json.dumps(results, indent=2))  # after every run

    rounds = range(1, args.rounds + 1)
    print("\n| run | " + " | ".join(f"round {r} loss / acc" for r in rounds) + " | bytes up per round |")
    print("|---|" + "---|" * (len(rounds) + 1))
    for label, res in results.items():
        cells = [f"{r['loss']:.3f} / {r['accuracy']:.2f}" for r in res["rounds"]]
        print(f"| {label} | " + " | ".join(cells) + f" | {res['upload_bytes_per_round'] / 1e6:.1f} MB |")
    print(f"\n(plan {args.plan}, {args.rounds} rounds, {args.local_steps} local steps, "
          f"{args.eval_samples} held-out examples, device {args.device}; centralised: {central_steps} "
          "steps per round = the federation's samples per round)")


if __name__ == "__main__":
    main()
