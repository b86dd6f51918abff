"""Round overhead: how much of a federated round is not local training?

Run: ``PYTHONPATH=. python benchmarks/bench_round_overhead.py [--plan plans/cluster.plan.yaml]
[--local-steps N] [--eval-samples N] [--rounds 1] [--threads N] [--json FILE]``

A real `fedpipe run` of the plan (default: the shipped cluster plan on the bundled SmolLM2-135M,
six servers at 4, 8 and 16 bits, flexlora) in this process, with every phase of
`fedpipe.federation.inprocess.run_plan` timed by wrapping the functions it calls (nothing in the loop is
changed). The baseline is the run's own local training (`train_steps`, the AdamW steps); every
other phase is reported as seconds and as a share of the round:

  setup   tokenizer, data, tokenising shards, loading + quantizing + LoRA per plan entry,
          the evaluation model (once per run)
  round   per server: apply the broadcast, reset/set factors, local training, serialise the update;
          coordinator: broadcast, aggregate; memory metric; evaluation (merge + loss + generation);
          saving the peft adapter and the checkpoint
  after   metrics.jsonl and the curves PNG

The target (issue "Performance", 3) is overhead <= 15% of the round. Shown: per round (the
runner's round_s), and with the one-time setup spread over the plan's rounds. With
--local-steps below the plan's, training time is also projected linearly to the plan's steps
(the overhead does not depend on the step count), and that projection is labelled as such.
"""

from __future__ import annotations

import argparse
import inspect
import json
import statistics
import tempfile
import time
from collections import defaultdict
from contextlib import contextmanager
from pathlib import Path

import torch

import fedpipe.client as client
import fedpipe.federation.inprocess as inprocess
import fedpipe.federation.loop as loop
import fedpipe.federation.spec as spec
import fedpipe.metrics as metrics
from fedpipe.federation.coordinator import Coordinator
from fedpipe.federation.rundir import RunFolder
from fedpipe.plan import load_plan

SECONDS: dict[str, float] = defaultdict(float)
CALLS: dict[str, int] = defaultdict(int)

# (owner, attribute, phase): the functions run_plan calls, as the loop and client look them up
PHASES = [
    (inprocess, "load_tokenizer", "setup: tokenizer"),
    (loop, "load_tokenizer", "setup: tokenizer"),
    (spec, "load_examples", "setup: data (examples, hold-out, partition)"),
    (spec, "split_holdout", "setup: data (examples, hold-out, partition)"),
    (spec, "partition", "setup: data (examples, hold-out, partition)"),
    (client.EdgeTrainer, "__init__", "setup: tokenise shards"),
    (client.AdaptedModel, "load", "setup: load + quantize + attach LoRA"),
    (loop, "load_base", "setup: load evaluation model"),
    (Coordinator, "broadcast", "round: coordinator broadcast"),
    (client.EdgeTrainer, "train_round", "client round (total)"),
    (client, "train_steps", "round: local training (baseline)"),
    (inprocess, "resident_gib", "round: memory metric"),
    (Coordinator, "aggregate", "round: aggregate (decode + rule)"),
    (loop, "apply_base_delta", "round: eval merge global update"),
    (loop, "evaluate", "round: eval loss + generation"),
    (loop, "save_adapter", "round: save peft adapter"),
    (RunFolder, "save_checkpoint", "round: save checkpoint"),
    (metrics, "write_metrics", "after: metrics.jsonl"),
    (metrics, "plot_rounds", "after: curves PNG"),
]


def _timed(fn, phase: str):
    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            SECONDS[phase] += time.perf_counter() - start
            CALLS[phase] += 1
    return wrapper


@contextmanager
def instrumented():
    """Wrap every function of PHASES with a timer; restore them afterwards."""
    saved = []
    for owner, attr, phase in PHASES:
        original = inspect.getattr_static(owner, attr)
        if isinstance(original, classmethod):
            wrapped = classmethod(_timed(original.__func__, phase))
        else:
            wrapped = _timed(getattr(owner, attr), phase)
        setattr(owner, attr, wrapped)
        saved.append((owner, attr, original))
    try:
        yield
    finally:
        for owner, attr, original in reversed(saved):
            setattr(owner, attr, original)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--plan", default="plans/cluster.plan.yaml")
    ap.add_argument("--local-steps", type=int, default=None, help="default: the plan's")
    ap.add_argument("--eval-samples", type=int, default=None, help="default: the plan's")
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    plan = load_plan(args.plan)
    steps = args.local_steps or plan.task.local_steps
    n_eval = args.eval_samples or plan.task.eval_samples

    with tempfile.TemporaryDirectory() as tmp, instrumented():
        start = time.perf_counter()
        result = inprocess.run_plan(args.plan, rounds=args.rounds, out=Path(tmp) / "run", local_steps=steps,
                                 eval_samples=n_eval)
        wall = time.perf_counter() - start

    rows = result.rows
    rounds = len(rows)
    round_s = sum(r["round_s"] for r in rows)
    train = SECONDS["round: local training (baseline)"]
    SECONDS["round: client apply broadcast + serialise update"] = (
        SECONDS.pop("client round (total)") - train)
    setup = sum(v for k, v in SECONDS.items() if k.startswith("setup"))
    after = sum(v for k, v in SECONDS.items() if k.startswith("after"))
    in_round = sum(v for k, v in SECONDS.items() if k.startswith("round"))
    SECONDS["round: other (untimed glue)"] = round_s - in_round
    SECONDS["setup: other (untimed glue)"] = wall - round_s - after - setup
    setup = wall - round_s - after

    print(f"plan {args.plan}: {len(rows[0]['servers'])} servers, {rounds} round(s), {steps} local steps, "
          f"{n_eval} eval examples, torch threads {torch.get_num_threads()}, wall {wall:.0f} s")
    print(f"{'phase':<52}{'seconds':>9}{'calls':>7}{'% round':>9}{'% run':>8}")
    for phase in sorted(SECONDS, key=lambda k: (k.split(":")[0] != "setup", k.split(":")[0] == "after", k)):
        share = f"{SECONDS[phase] / round_s:>8.1%}" if phase.startswith("round") else f"{'':>8}"
        print(f"{phase:<52}{SECONDS[phase]:>9.1f}{CALLS.get(phase, 0):>7}{share:>9}"
              f"{SECONDS[phase] / wall:>8.1%}")
    per_server = [(s["server"], s["bits"], s["batch_size"], s["train_s"], s["tokens"])
                  for s in rows[0]["servers"]]
    print("local training per server (round 1): " + ", ".join(
        f"{n} {b}-bit b{bs}: {t:.0f} s ({t / steps:.1f} s/step)" for n, b, bs, t, _ in per_server))
    overhead = round_s - train
    plan_rounds = plan.task.rounds
    amortised = (overhead + (setup + after) / plan_rounds * rounds) / (round_s + (setup + after)
                                                                         / plan_rounds * rounds)
    summary = {
        "wall_s": wall, "round_s": round_s, "train_s": train, "overhead_s": overhead,
        "overhead_share_of_round": overhead / round_s,
        "setup_s": setup, "after_s": after,
        "overhead_share_with_setup_over_plan_rounds": amortised,
        "overhead_share_with_setup_this_run": (wall - train) / wall,
        "phases": dict(SECONDS),
        "eval_s_per_example": SECONDS["round: eval loss + generation"] / rounds / n_eval,
        "median_step_s": statistics.median(t / steps for *_, t, _ in per_server),
    }
    print(f"\noverhead per round (runner's round_s - local training): {overhead:.1f} s of {round_s:.1f} s "
          f"= {overhead / round_s:.1%} (target <= 15%)")
    print(f"with setup ({setup:.1f} s) and metrics/plot ({after:.1f} s) spread over the plan's {plan_rounds} "
          f"rounds: {amortised:.1%}; all of this {rounds}-round run: {(wall - train) / wall:.1%}")
    if steps < plan.task.local_steps:
        scale = plan.task.local_steps / steps
        proj = overhead / (overhead + train * scale)
        summary["projected_share_at_plan_steps"] = proj
        print(f"projected to the plan's {plan.task.local_steps} local steps (training x {scale:.1f}, "
              f"overhead unchanged): {proj:.1%}")
    if args.json:
        args.json.write_text(json.dumps({"args": vars(args) | {"json": str(args.json)}, "summary": summary,
                                         "rows": rows}, indent=2, default=str))


if __name__ == "__main__":
    main()
