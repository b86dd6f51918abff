"""Evaluation's share of a round, and how far a smaller held-out set can be trusted.

Run: ``PYTHONPATH=. python benchmarks/bench_eval.py [--plan plans/cluster.plan.yaml]
[--local-steps 2] [--train-steps 40] [--pool 400] [--threads 1] [--json FILE]``
(``--report FILE`` prints the cost table of saved measurements again.)

1. Training per round: a real one-round in-process run of the plan with --local-steps steps per
   server (its rows' train_s), projected linearly to the plan's local steps (labelled as such).
2. A model worth evaluating: LoRA on the plan's richest adapter shape, trained centrally for
   --train-steps on the plan's training data, then merged into a fresh 16-bit base exactly as the
   round loop's evaluator does (`apply_base_delta`, timed: it is part of every evaluation).
3. Cost per held-out example on a pool of --pool examples of the plan's data: the answer loss
   alone; loss + greedy generation with 16 new tokens (the former fixed budget); loss +
   generation with the budget fitted to the longest reference answer (`data.answer_budget`), and
   on how many examples the two budgets disagree.
4. Evaluation seconds per round, averaged over the plan's rounds, against the round's training
   (in process: every server's, one after another; distributed: the slowest server's):
   the former defaults (every round, loss + 16-token generation, the plan's eval_samples), and
   with the fitted budget at each held-out size and accuracy cadence (`RunSpec.evaluates`: loss
   every round, exact match every Nth and the last).
5. The spread of loss and exact match between held-out sets of 50 / 100 / 200 / ... examples:
   stratified bootstrap draws (with replacement, by family as `split_holdout` draws) from the
   pool's per-example scores, beside the mean Wilson 95% half-width a run reports.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch
from transformers.utils import logging as hf_logging

from fedpipe.data import (
    answer_budget,
    cycle_batches,
    encode,
    plan_data,
    score_examples,
    summarize,
)
from fedpipe.federation.inprocess import run_plan
from fedpipe.models import (
    apply_base_delta,
    attach_lora,
    get_factors,
    load_base,
    load_tokenizer,
    plan_model_dir,
)
from fedpipe.plan import load_plan
from fedpipe.train import train_steps

FORMER_BUDGET = 16  # evaluate's fixed max_new_tokens before the budget was fitted


def training_per_round(plan_path: str, local_steps: int, out: Path) -> dict:
    """A real one-round run at `local_steps`; per-server training seconds per step."""
    result = run_plan(plan_path, rounds=1, local_steps=local_steps, eval_samples=16, out=out)
    servers = result.rows[0]["servers"]
    return {"per_step_s": {s["server"]: s["train_s"] / s["steps"] for s in servers},
            "loop_eval_s_16_examples": result.rows[0]["eval_s"]}


def trained_global_model(plan, train_steps_n: int, pool_n: int, lr: float):
    """A 16-bit base with a centrally trained update merged in; the pool and the merge time."""
    model_dir = plan_model_dir(plan)
    tokenizer = load_tokenizer(model_dir)
    shards, pool = plan_data(plan, pool_n)
    train = [ex for shard in shards.values() for ex in shard]
    richest = max((entry for _, entry in plan.training_members()), key=lambda e: sum(e.rank_pattern.values()))
    model = attach_lora(load_base(model_dir, 16), richest.rank_pattern, alpha_ratio=richest.lora_alpha_ratio,
                        seed=plan.task.seed)
    encoded = encode(train, tokenizer, plan.task.seq_len)
    stats = train_steps(model, cycle_batches(encoded, 8, plan.task.seed, pad_id=tokenizer.pad_token_id),
                        train_steps_n, lr)
    factors = get_factors(model)
    del model
    evaluator = load_base(model_dir, 16)
    start = time.perf_counter()
    apply_base_delta(evaluator, model_dir, factors)
    merge_s = time.perf_counter() - start
    return evaluator, tokenizer, pool, merge_s, stats


def timed_scores(model, tokenizer, pool, seq_len: int, **kwargs):
    start = time.perf_counter()
    scores = score_examples(model, tokenizer, pool, seq_len, **kwargs)
    return scores, (time.perf_counter() - start) / len(pool)


def spread(pool, scores, sizes: list[int], draws: int, seed: int) -> list[dict]:
    """Standard deviation of loss and accuracy between stratified bootstrap held-out sets of each size."""
    by_family: dict[str, list[int]] = defaultdict(list)
    for i, ex in enumerate(pool):
        by_family[ex.family].append(i)
    rng, out = random.Random(seed), []
    for n in sizes:
        # each family's share of the pool, as split_holdout draws a held-out set of n
        quotas = {f: max(1, round(n * len(ids) / len(pool))) for f, ids in by_family.items()}
        losses, accs, halves = [], [], []
        for _ in range(draws):
            members = [i for f, q in quotas.items() for i in rng.choices(by_family[f], k=q)]
            s = summarize(pool, scores, members)
            losses.append(s["loss"])
            accs.append(s["accuracy"])
            lo, hi = s["accuracy_ci95"]
            halves.append((hi - lo) / 2)
        out.append({"n": n, "loss_sd": statistics.stdev(losses), "accuracy_sd": statistics.stdev(accs),
                    "wilson_half_width": statistics.fmean(halves)})
    return out


def eval_seconds(per_example: dict[str, float], merge_s: float, n: int, rounds: int, eval_every: int,
                 accuracy_every: int, fitted: bool) -> float:
    """Mean evaluation seconds per round over `rounds` under a cadence (RunSpec.evaluates' rule)."""
    generating = "fitted" if fitted else "former"
    total = 0.0
    for r in range(1, rounds + 1):
        if r == rounds or r % (eval_every * accuracy_every) == 0:
            total += merge_s + n * per_example[generating]
        elif r % eval_every == 0:
            total += merge_s + n * per_example["loss"]
    return total / rounds


def cost_table(task, measured: dict, sizes: list[int]) -> dict:
    """Print and return evaluation's share of a round under each setting, from the measurements."""
    per_step, per_example = measured["round"]["per_step_s"], measured["per_example_s"]
    merge_s = measured["merge_s"]
    in_process = task.local_steps * sum(per_step.values())  # servers one after another
    slowest = task.local_steps * max(per_step.values())  # distributed: the slowest server's training
    settings = {f"former: every round loss + {FORMER_BUDGET}-token generation, {task.eval_samples} "
                "examples": eval_seconds(per_example, merge_s, task.eval_samples, task.rounds,
                                         task.eval_every, 1, False)}
    for n in sorted({task.eval_samples, *sizes}, reverse=True):
        for every in sorted({1, 2, task.rounds}):
            label = f"{n} examples, fitted budget, accuracy every {every} (and the last)"
            settings[label] = eval_seconds(per_example, merge_s, n, task.rounds, task.eval_every, every, True)
    print(f"\ntraining per round, projected from {measured['args']['local_steps']} to the plan's "
          f"{task.local_steps} local steps: in process (servers one after another) {in_process:.0f} s; "
          f"distributed (the slowest server) {slowest:.0f} s")
    print(f"| evaluation settings | eval s per round (mean over the plan's {task.rounds} rounds) | "
          "share of an in-process round | share of a distributed round |")
    print("|---|---|---|---|")
    table = {}
    for label, eval_s in settings.items():
        table[label] = {"eval_s": eval_s, "in_process_share": eval_s / (eval_s + in_process),
                        "distributed_share": eval_s / (eval_s + slowest)}
        print(f"| {label} | {eval_s:.1f} | {table[label]['in_process_share']:.1%} | "
              f"{table[label]['distributed_share']:.1%} |")
    return table


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--plan", default="plans/cluster.plan.yaml")
    ap.add_argument("--local-steps", type=int, default=2, help="steps per server in the timed round")
    ap.add_argument("--train-steps", type=int, default=40, help="central steps of the evaluated model")
    ap.add_argument("--pool", type=int, default=400, help="held-out examples scored per variant")
    ap.add_argument("--sizes", default="50,100,200", help="held-out set sizes for the spread")
    ap.add_argument("--draws", type=int, default=2000)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--skip-round", action="store_true", help="only the evaluation measurements (the "
                    "timed round is taken from --json when that file holds one)")
    ap.add_argument("--skip-timing", action="store_true", help="only the spread (the per-example "
                    "seconds are taken from --json)")
    ap.add_argument("--lr", type=float, default=None, help="of the central training (default: the plan's)")
    ap.add_argument("--json", type=Path, help="write the measurements here, after each phase")
    ap.add_argument("--report", type=Path, help="print the cost table of a saved --json, measure nothing")
    args = ap.parse_args()
    plan = load_plan(args.plan)
    task = plan.task
    if args.report:
        saved = json.loads(args.report.read_text())
        cost_table(task, saved, [s["n"] for s in saved["spread"]])
        return
    torch.set_num_threads(args.threads)
    hf_logging.disable_progress_bar()
    summary: dict = {"args": {k: str(v) for k, v in vars(args).items()}}
    saved = json.loads(args.json.read_text()) if args.json and args.json.is_file() else {}
    if args.skip_round:
        summary["round"] = saved["round"]
    if args.skip_timing:
        summary |= {k: saved[k] for k in ("merge_s", "per_example_s", "budget_disagreements", "fitted_budget",
                                          "pool")}

    def save() -> None:
        if args.json:
            args.json.write_text(json.dumps(summary, indent=2))

    if not args.skip_round:
        with tempfile.TemporaryDirectory() as tmp:
            summary["round"] = training_per_round(args.plan, args.local_steps, Path(tmp) / "run")
        print(f"training per step (s), one round of {args.local_steps} steps: " + ", ".join(
            f"{k} {v:.1f}" for k, v in summary["round"]["per_step_s"].items()), flush=True)
        save()

    model, tokenizer, pool, merge_s, stats = trained_global_model(plan, args.train_steps, args.pool,
                                                                  args.lr or task.learning_rate)
    enc = encode(pool, tokenizer, task.seq_len)
    print(f"evaluated model: {args.train_steps} central steps (train loss {stats.mean_loss:.3f} mean, "
          f"{stats.last_loss:.3f} last); merge into the evaluator {merge_s:.1f} s; pool {len(pool)} "
          f"examples, fitted budget {answer_budget(enc)} new tokens (former {FORMER_BUDGET})", flush=True)
    fitted, t_fitted = timed_scores(model, tokenizer, pool, task.seq_len)
    if not args.skip_timing:
        loss_only, t_loss = timed_scores(model, tokenizer, pool, task.seq_len, accuracy=False)
        former, t_former = timed_scores(model, tokenizer, pool, task.seq_len, max_new_tokens=FORMER_BUDGET)
        disagree = sum(a != b for a, b in zip(former.correct, fitted.correct, strict=True))
        whole = summarize(pool, fitted)
        print(f"seconds per example: loss only {t_loss:.3f}, loss + generation ({FORMER_BUDGET} tokens) "
              f"{t_former:.3f}, loss + generation (fitted) {t_fitted:.3f}; examples where the budgets "
              f"disagree on exact match: {disagree}; pool loss {whole['loss']:.3f}, exact match "
              f"{whole['accuracy']:.3f}", flush=True)
        assert max(abs(a - b) for a, b in zip(loss_only.nll, fitted.nll, strict=True)) < 1e-3
        per_example = {"loss": t_loss, "former": t_former, "fitted": t_fitted}
        summary |= {"merge_s": merge_s, "per_example_s": per_example,
                    "budget_disagreements": disagree, "fitted_budget": answer_budget(enc),
                    "pool": {"loss": whole["loss"], "accuracy": whole["accuracy"]}}
        save()

    sizes = [int(n) for n in args.sizes.split(",")]
    summary["spread"] = spread(pool, fitted, sizes, args.draws, task.seed)
    save()
    print("\n| held-out examples | loss sd between sets | exact match sd | mean Wilson 95% half-width |")
    print("|---|---|---|---|")
    for s in summary["spread"]:
        print(f"| {s['n']} | {s['loss_sd']:.3f} | {s['accuracy_sd']:.3f} | ±{s['wilson_half_width']:.3f} |")

    if "round" in summary:
        summary["settings"] = cost_table(task, summary, sizes)
        save()


if __name__ == "__main__":
    main()
