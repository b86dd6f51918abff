"""Do importance scores mean something? LoRA on the top-k, random k and bottom-k matrices.

Run: ``PYTHONPATH=. python benchmarks/bench_importance.py [--quick] [--threads 1]`` (full: an
estimated 12-15 min on 2 idle cores, --quick about 4; on a shared, loaded box ``--threads 1``
avoids OpenMP spin-waiting and is faster). Prints README-ready markdown tables:

1. speed: `score_server` on the bundled SmolLM2-135M (fp32, CPU), 8 batches of 4 x 128 tokens
   (answer-only loss on packed built-in examples), per scorer;
2. the federated report of ``profiles/cluster.yaml`` (6 servers, each scoring its own Dirichlet
   shard of the built-in tasks, combined by sample count) for two calibration seeds: Spearman
   rank correlation between the seeds (and between sensitivity and fisher), overlap of the top-k;
3. the same number of steps and (within a few percent) the same LoRA parameter budget on
   (a) the top-k matrices by sensitivity (and by fisher, except --quick), (b) k random matrices
   (several draws), (c) the bottom-k by sensitivity: held-out answer loss and exact-match
   accuracy. Every adapted matrix gets about the same number of LoRA parameters
   (rank ~ budget / (d_in + d_out): 4 on MLP matrices, 7 on q/o, 11 on k/v), so any k-subset
   costs the same and only *which* matrices differs. One training run per arm: with 100
   held-out examples, accuracies carry about +-9 points of noise (95 %).

Another process on the same cores slows everything (the load average is printed): compare rows
within one run. The speed table also gives the CPU seconds of all this process's threads: with
one thread that is the compute itself, nearly independent of other load.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

from fedpipe.data import cycle_batches, encode, evaluate, load_examples, split_holdout
from fedpipe.gradients import score_server
from fedpipe.importance import ScoringRequest, compute_report
from fedpipe.models import BUNDLED, attach_lora, load_base, load_tokenizer, resolve_model_dir
from fedpipe.scorers import get_scorer
from fedpipe.shapes import load_shapes
from fedpipe.train import train_steps

PROFILE = Path(__file__).resolve().parent.parent / "profiles" / "cluster.yaml"


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')} load {os.getloadavg()[0]:.1f}] {msg}", file=sys.stderr,
          flush=True)


def packed_batches(tokenizer, n_batches: int, batch_size: int, length: int) -> list[dict]:
    """Rows of exactly `length` tokens: built-in examples (answer-only labels) packed end to end."""
    encoded = encode(load_examples("builtin", 400, seed=7), tokenizer, length)
    ids: list[int] = []
    labels: list[int] = []
    for item in encoded:
        ids += item["input_ids"]
        labels += item["labels"]
    rows = n_batches * batch_size
    if len(ids) < rows * length:
        raise SystemExit("not enough built-in examples to pack")
    ids_t = torch.tensor(ids[: rows * length]).view(n_batches, batch_size, length)
    lab_t = torch.tensor(labels[: rows * length]).view(n_batches, batch_size, length)
    return [{"input_ids": i, "attention_mask": torch.ones_like(i), "labels": lab}
            for i, lab in zip(ids_t, lab_t, strict=True)]


def speed(model_dir: Path, tokenizer, names: list[str], n_batches: int) -> list[str]:
    model = load_base(model_dir, 16)
    batches = packed_batches(tokenizer, n_batches, 4, 128)
    rows = ["| scorer | batches | tokens | wall s | median wall s / batch | CPU s (all threads) |",
            "|---|---|---|---|---|---|"]
    for scorer in ("sensitivity", "fisher"):
        stamps, cpu = [time.perf_counter()], time.process_time()
        score_server(model, batches, names, get_scorer(scorer).accumulator(),
                     on_batch=lambda st=stamps: st.append(time.perf_counter()))
        cpu = time.process_time() - cpu
        steps = np.diff(stamps)
        rows.append(f"| {scorer} | {n_batches} x 4 x 128 | {n_batches * 512:,} | "
                    f"{stamps[-1] - stamps[0]:.1f} | {statistics.median(steps):.2f} | {cpu:.1f} |")
        log(f"speed {scorer}: {stamps[-1] - stamps[0]:.1f} s wall, {cpu:.1f} s CPU")
    return rows


def spearman(a: dict[str, float], b: dict[str, float]) -> float:
    names = sorted(a)
    ra = np.argsort(np.argsort([a[n] for n in names]))
    rb = np.argsort(np.argsort([b[n] for n in names]))
    return float(np.corrcoef(ra, rb)[0, 1])


def top(scores: dict[str, float], k: int) -> list[str]:
    return sorted(scores, key=lambda n: -scores[n])[:k]


def federated(batches: int, k: int, with_fisher: bool,
              device: str) -> tuple[dict[str, dict[str, float]], list[str]]:
    """Sensitivity reports of the cluster profile for calibration seeds 0 and 1 (+ fisher, seed 0);
    returns the seed-0 scores per scorer and the table."""
    reports, seconds = {}, {}
    runs = [("sensitivity", 0), ("sensitivity", 1)] + ([("fisher", 0)] if with_fisher else [])
    for scorer, seed in runs:
        request = ScoringRequest.make(PROFILE, scorer, batches=batches, seed=seed)
        result = compute_report(request, use_cache=False, set_latest=False, device=device)
        reports[scorer, seed], seconds[scorer, seed] = result.report.scores, result.seconds
        log(f"federated {scorer} seed {seed}: {result.seconds:.1f} s")
    s0, s1 = reports["sensitivity", 0], reports["sensitivity", 1]
    n_servers = len(ScoringRequest.make(PROFILE).profile.servers)
    rows = [f"Federated scoring of `profiles/cluster.yaml`: {n_servers} servers x {batches} batches "
            f"x 4 examples, {len(s0)} matrices; sensitivity took {seconds['sensitivity', 0]:.0f} s "
            f"(seed 0) and {seconds['sensitivity', 1]:.0f} s (seed 1), model load included.", "",
            f"| comparison | Spearman rho | top-{k} overlap |", "|---|---|---|",
            f"| sensitivity, calibration seed 0 vs 1 | {spearman(s0, s1):.3f} | "
            f"{len(set(top(s0, k)) & set(top(s1, k)))}/{k} |"]
    if with_fisher:
        f0 = reports["fisher", 0]
        rows.append(f"| sensitivity vs fisher (seed 0) | {spearman(s0, f0):.3f} | "
                    f"{len(set(top(s0, k)) & set(top(f0, k)))}/{k} |")
    return {scorer: scores for (scorer, seed), scores in reports.items() if seed == 0}, rows


def by_type(names: list[str]) -> str:
    counts: dict[str, int] = {}
    for n in names:
        counts[n.rsplit(".", 1)[1]] = counts.get(n.rsplit(".", 1)[1], 0) + 1
    return " ".join(f"{t.removesuffix('_proj')}{c}" for t, c in sorted(counts.items()))


def arm_choices(scores: dict[str, dict[str, float]], k: int, draws: int) -> list[tuple[str, list[str]]]:
    """(label, matrices): top-k by each scorer, `draws` random k-sets, bottom-k by sensitivity."""
    ranked = {name: sorted(s, key=lambda n: -s[n]) for name, s in scores.items()}
    choices = [(f"top-k by {name}", order[:k]) for name, order in ranked.items()]
    pool = ranked["sensitivity"]
    choices += [(f"random k (draw {d + 1})", random.Random(d).sample(pool, k)) for d in range(draws)]
    choices.append(("bottom-k by sensitivity", pool[-k:]))
    return choices


def arms(model_dir: Path, tokenizer, choices: list[tuple[str, list[str]]], steps: int, n_eval: int,
         lr: float, device: str = "cpu") -> list[str]:
    """Train each choice from the same init on the same batches; held-out loss and accuracy."""
    shapes = {m.name: m for m in load_shapes(str(model_dir)).matrices}
    budget = 4 * max(m.d_in + m.d_out for m in shapes.values())
    ranks = {n: max(1, round(budget / (m.d_in + m.d_out))) for n, m in shapes.items()}
    draws = sum(label.startswith("random") for label, _ in choices)
    examples = load_examples("builtin", 2000 + n_eval, seed=0)
    train, held = split_holdout(examples, n_eval, seed=0)
    enc = encode(train, tokenizer, 64)
    pad = tokenizer.pad_token_id

    base = evaluate(load_base(model_dir, 16, device=device), tokenizer, held, 64)
    log(f"base: loss {base['loss']:.3f} acc {base['accuracy']:.3f}")
    rows = ["| arm | matrices (by type) | LoRA params | train s | eval loss | accuracy |",
            "|---|---|---|---|---|---|",
            f"| base model, no adapter | - | 0 | - | {base['loss']:.3f} | {base['accuracy']:.3f} |"]
    random_results = []
    for label, names in choices:
        model = attach_lora(load_base(model_dir, 16, device=device), {n: ranks[n] for n in names},
                            seed=0)
        params = sum(ranks[n] * (shapes[n].d_in + shapes[n].d_out) for n in names)
        stats = train_steps(model, cycle_batches(enc, 8, seed=0, pad_id=pad), steps, lr)
        result = evaluate(model, tokenizer, held, 64)
        log(f"{label}: loss {result['loss']:.3f} acc {result['accuracy']:.3f} "
            f"({stats.seconds:.0f} s train)")
        if label.startswith("random"):
            random_results.append(result)
        rows.append(f"| {label} | {by_type(names)} | {params:,} | {stats.seconds:.0f} | "
                    f"{result['loss']:.3f} | {result['accuracy']:.3f} |")
        if label.startswith("random") and len(random_results) == draws and draws > 1:
            rows.append(f"| random k, mean of {draws} | | | | "
                        f"{statistics.mean(r['loss'] for r in random_results):.3f} | "
                        f"{statistics.mean(r['accuracy'] for r in random_results):.3f} |")
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer batches, steps and draws (~4 min)")
    ap.add_argument("--k", type=int, default=21, help="matrices per arm (default 21 of 210)")
    ap.add_argument("--steps", type=int, help="training steps per arm (default 60, quick 15)")
    ap.add_argument("--draws", type=int, help="random draws (default 2, quick 1)")
    ap.add_argument("--eval", type=int, help="held-out examples (default 100, quick 40)")
    ap.add_argument("--calib-batches", type=int, help="calibration batches per server in 2. "
                    "(default 4, quick 2)")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--device", default="cpu", help="where scoring (2.) and training (3.) run; "
                    "cuda computes in bf16. The speed table (1.) is always CPU fp32.")
    ap.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    args = ap.parse_args()
    quick = args.quick
    steps = args.steps or (15 if quick else 60)
    draws = args.draws or (1 if quick else 2)
    n_eval = args.eval or (40 if quick else 100)
    calib_batches = args.calib_batches or (2 if quick else 4)

    if args.threads:
        torch.set_num_threads(args.threads)
    start = time.perf_counter()
    torch.manual_seed(0)
    model_dir = resolve_model_dir(BUNDLED)
    tokenizer = load_tokenizer(model_dir)
    names = [m.name for m in load_shapes(BUNDLED).matrices]
    print(f"SmolLM2-135M; speed on CPU fp32 with {torch.get_num_threads()} torch threads; scoring "
          f"and training on {args.device}; load average {os.getloadavg()[0]:.1f} at start\n")
    print("### Scoring speed (one server, all 210 matrices)\n")
    print("\n".join(speed(model_dir, tokenizer, names, 8)) + "\n")
    print("### Ranking stability\n")
    scores, rows = federated(calib_batches, args.k, not quick, args.device)
    choices = arm_choices(scores, args.k, draws)
    print("\n".join(rows) + "\n")
    print(f"### Top-k vs random vs bottom-k (k = {args.k}, {steps} steps, batch 8, lr {args.lr}, "
          f"{n_eval} held-out examples, seq_len 64)\n")
    print("\n".join(arms(model_dir, tokenizer, choices, steps, n_eval, args.lr, args.device)))
    print(f"\nwall time {time.perf_counter() - start:.0f} s, load average "
          f"{os.getloadavg()[0]:.1f} at the end")


if __name__ == "__main__":
    main()
