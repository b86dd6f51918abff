"""Does a quantized base poison the global model? Mixed 4/16-bit against all-16-bit (issue 12.6).

Clients with a 4-bit base train against a quantized W; their updates are merged into the
full-precision global model ("quantization bias", FedQLoRA). This runs the same plan twice per
seed on the bundled SmolLM2-135M: as planned (some servers at 4 bits) and with every server at
16 bits, equal ranks, batches, samples and data, and compares the global model's eval loss with
the seed spread. Each run's eval uses the same held-out split (a function of the seed).

    python benchmarks/bench_mixed_precision.py                       # the README's figures
    python benchmarks/bench_mixed_precision.py --rounds 1 --seeds 0  # a smoke run
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

from transformers.utils import logging as hf_logging

from fedpipe.federation.inprocess import run_plan
from fedpipe.plan import Plan, load_plan, save_plan

ROOT = Path(__file__).resolve().parent.parent


def variants(plan: Plan, seed: int) -> dict[str, Plan]:
    """The plan as planned and with every server at 16 bits, both on task seed `seed`."""
    task = plan.task.model_copy(update={"seed": seed})
    mixed = plan.model_copy(update={"task": task})
    full = mixed.model_copy(update={"servers": [s.model_copy(update={"bits": 16}) for s in plan.servers]})
    return {"mixed (as planned)": mixed, "all 16-bit": full}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--plan", default=str(ROOT / "plans" / "quickstart.plan.yaml"))
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--local-steps", type=int, default=6)
    parser.add_argument("--eval-samples", type=int, default=48)
    parser.add_argument("--json", type=Path,
                        default=ROOT / "benchmarks" / "results" / "mixed-precision-cpu.json")
    args = parser.parse_args()
    hf_logging.disable_progress_bar()
    plan = load_plan(args.plan)
    bits = {s.name: s.bits for s in plan.servers}
    print(f"$ python benchmarks/bench_mixed_precision.py --plan {args.plan} --seeds {args.seeds} "
          f"--rounds {args.rounds} --local-steps {args.local_steps} --eval-samples {args.eval_samples}")
    print(f"plan bits: {bits}; all-16-bit keeps every rank, batch and sample count")
    losses: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for seed in map(int, args.seeds.split(",")):
            for name, variant in variants(plan, seed).items():
                path = save_plan(variant, Path(tmp) / f"{seed}-{name.split()[0]}.plan.yaml")
                result = run_plan(path, out=Path(tmp) / f"run-{seed}-{name.split()[0]}", rounds=args.rounds,
                                  local_steps=args.local_steps, eval_samples=args.eval_samples)
                loss = result.rows[-1]["eval"]["loss"]
                losses.setdefault(name, []).append(loss)
                print(f"seed {seed} · {name}: eval loss per round "
                      + " ".join(f"{r['eval']['loss']:.4f}" for r in result.rows), flush=True)
    print("\n| variant | final eval loss per seed | mean | seed spread (stdev) |\n|---|---|---|---|")
    for name, values in losses.items():
        spread = statistics.stdev(values) if len(values) > 1 else 0.0
        print(f"| {name} | {', '.join(f'{v:.4f}' for v in values)} | {statistics.mean(values):.4f} | "
              f"{spread:.4f} |")
    gaps = [m - f for m, f in zip(losses["mixed (as planned)"], losses["all 16-bit"], strict=True)]
    spread = max(statistics.stdev(v) if len(v) > 1 else 0.0 for v in losses.values())
    print(f"\nmixed − all-16-bit, paired by seed: {', '.join(f'{g:+.4f}' for g in gaps)} · mean "
          f"{statistics.mean(gaps):+.4f} against a seed spread of {spread:.4f}")
    args.json.write_text(json.dumps({"losses": losses, "paired_gap": gaps, "seed_spread": spread}, indent=2))


if __name__ == "__main__":
    main()
