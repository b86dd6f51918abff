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

Selection arms (``--arms``, issue 12.5): does importance beat random once the top-k is not allowed to
pile onto a few matrix types? ``--arms NAME[,NAME...]`` skips 1. and 2., takes the calibration
seed-0 scores from (or stores them in) ``--json``, trains only the named arms at the same budget,
seeds and steps, appends each arm's result to that JSON as soon as it is done (one arm per command
loses nothing to a timeout) and prints the table of every arm stored there (``--arms table``
only prints). Arms: ``base`` (no adapter), ``top-sensitivity``, ``top-fisher``,
``bottom-sensitivity``, ``random`` (draws 1..--draws; ``random-N`` for one), ``type-quota``
(an equal count per matrix type, the top by sensitivity within each), ``type-share`` (counts per
type proportional to the type's summed sensitivity), ``type-random`` (equal counts per type,
random within each: the control for type-quota), ``per-param`` (top-k of sensitivity per LoRA
parameter at rank 1, score / (d_in + d_out)), ``layer-spread`` (top-k by sensitivity with at most
ceil(k / layers) per layer), ``type-layer-spread`` (both limits at once), ``type-layer-random``
(both limits, random within: its control), ``balanced`` (top-k of scores rescaled by a factor
per layer and one per type so that each layer and each type sums the same) and ``probe`` (counts
per type proportional to the loss drop that adapting all of a type's matrices alone gives after
--probe-steps steps, the top by sensitivity within each type; the probe's cost is reported).
The README's figures (one arm per command on a loaded box):

    PYTHONPATH=. python benchmarks/bench_importance.py --threads 1 --steps 20 --batch 4 \
        --arms random-1 --json benchmarks/results/importance-arms-cpu.json

Another process on the same cores slows everything (the load average is printed): compare rows
within one run. The speed table also gives the CPU seconds of all this process's threads: with
one thread that is the compute itself, nearly independent of other load.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import random
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

from fedpipe.atomic import write_atomic
from fedpipe.data import cycle_batches, encode, evaluate, load_examples, split_holdout
from fedpipe.gradients import score_server
from fedpipe.importance import ScoringRequest, compute_report
from fedpipe.models import BUNDLED, attach_lora, load_base, load_tokenizer, resolve_model_dir
from fedpipe.scorers import get_scorer
from fedpipe.shapes import load_shapes
from fedpipe.train import train_steps

PROFILE = Path(__file__).resolve().parent.parent / "profiles" / "cluster.yaml"
ARMS_JSON = Path(__file__).resolve().parent / "results" / "importance-arms-cpu.json"


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


def ranked(scores: dict[str, float]) -> list[str]:
    """Names from the highest score down (ties in name order, so every run agrees)."""
    return sorted(scores, key=lambda n: (-scores[n], n))


def random_draw(scores: dict[str, float], k: int, draw: int) -> list[str]:
    """Draw `draw` (1-based) of k random matrices; the pool is the sensitivity order, as in the
    first version of this benchmark, so its draws are reproduced."""
    return random.Random(draw - 1).sample(ranked(scores), k)


def apportion(weights: dict[str, float], k: int, caps: dict[str, int]) -> dict[str, int]:
    """k matrices shared out between types in proportion to `weights` (largest remainder), no type
    above its cap (its matrix count); all-zero weights share equally."""
    total = sum(max(0.0, w) for w in weights.values())
    share = {t: k * (max(0.0, w) / total if total > 0 else 1 / len(weights))
             for t, w in weights.items()}
    counts = {t: min(caps[t], int(q)) for t, q in share.items()}
    while sum(counts.values()) < k:
        open_types = [t for t in counts if counts[t] < caps[t]]
        if not open_types:
            raise SystemExit(f"cannot place {k} matrices in {sum(caps.values())}")
        best = max(open_types, key=lambda t: (share[t] - counts[t], t))
        counts[best] += 1
    return counts


def within_types(order: list[str], counts: dict[str, int], kind: dict[str, str]) -> list[str]:
    """The first counts[t] names of each type t in `order`."""
    taken = {t: 0 for t in counts}
    chosen = []
    for n in order:
        if taken[kind[n]] < counts[kind[n]]:
            taken[kind[n]] += 1
            chosen.append(n)
    return chosen


def layer_spread(order: list[str], k: int, per_layer: int, layer: dict[str, int],
                 quota: dict[str, int] | None = None, kind: dict[str, str] | None = None) -> list[str]:
    """The first k names of `order` with at most `per_layer` from any one layer (and, given a
    `quota` per type, at most that many of each type)."""
    used: dict[int, int] = {}
    taken: dict[str, int] = {}
    chosen = []
    for n in order:
        fits_type = quota is None or taken.get(kind[n], 0) < quota[kind[n]]
        if used.get(layer[n], 0) < per_layer and fits_type and len(chosen) < k:
            used[layer[n]] = used.get(layer[n], 0) + 1
            if kind is not None:
                taken[kind[n]] = taken.get(kind[n], 0) + 1
            chosen.append(n)
    return chosen


def balanced(scores: dict[str, float], shapes: dict) -> dict[str, float]:
    """Scores rescaled (Sinkhorn: a factor per layer and one per type) so that every layer and
    every type carries the same total: a weighting that spreads the way type-layer-spread does."""
    layer_f = {m.layer: 1.0 for m in shapes.values()}
    kind_f = {m.kind: 1.0 for m in shapes.values()}
    for _ in range(200):
        for factors, key in ((layer_f, "layer"), (kind_f, "kind")):
            totals = dict.fromkeys(factors, 0.0)
            for n, s in scores.items():
                m = shapes[n]
                totals[getattr(m, key)] += s * layer_f[m.layer] * kind_f[m.kind]
            for g in factors:
                factors[g] /= totals[g] * len(factors)
    return {n: s * layer_f[shapes[n].layer] * kind_f[shapes[n].kind] for n, s in scores.items()}


ARM_LABELS = {
    "base": "base model, no adapter",
    "top-sensitivity": "top-k by sensitivity",
    "top-fisher": "top-k by fisher",
    "bottom-sensitivity": "bottom-k by sensitivity",
    "type-quota": "per-type quota: equal count per type, top by sensitivity within",
    "type-share": "per-type share: counts by type's summed sensitivity, top within",
    "type-random": "control: equal count per type, random within",
    "per-param": "top-k by sensitivity per LoRA parameter (score / (d_in + d_out))",
    "layer-spread": "top-k by sensitivity, at most ceil(k / layers) per layer",
    "type-layer-spread": "top-k by sensitivity, equal count per type and at most ceil(k / layers) "
                         "per layer",
    "type-layer-random": "control: equal count per type, at most ceil(k / layers) per layer, "
                         "random within",
    "balanced": "top-k of sensitivity rescaled so each layer and each type sums the same",
    "probe": "probe: counts by type's measured loss drop, top by sensitivity within",
}


def select(arm: str, scores: dict[str, dict[str, float]], shapes: dict, k: int,
           probe_drop: dict[str, float] | None = None) -> list[str]:
    """The k matrices an arm adapts (none for `base`)."""
    sens = scores["sensitivity"]
    kind = {n: m.kind for n, m in shapes.items()}
    caps: dict[str, int] = {}
    for m in shapes.values():
        caps[m.kind] = caps.get(m.kind, 0) + 1
    equal = apportion(dict.fromkeys(caps, 1.0), k, caps)
    if arm == "base":
        return []
    if arm.startswith("random-"):
        return random_draw(sens, k, int(arm.removeprefix("random-")))
    if arm in ("top-sensitivity", "top-fisher"):
        return ranked(scores[arm.removeprefix("top-")])[:k]
    if arm == "bottom-sensitivity":
        return ranked(sens)[-k:]
    if arm == "type-quota":
        return within_types(ranked(sens), equal, kind)
    if arm == "type-share":
        totals = {t: sum(sens[n] for n in sens if kind[n] == t) for t in caps}
        return within_types(ranked(sens), apportion(totals, k, caps), kind)
    if arm == "type-random":
        return within_types(random.Random(0).sample(sorted(sens), len(sens)), equal, kind)
    if arm == "balanced":
        return ranked(balanced(sens, shapes))[:k]
    if arm == "per-param":
        return ranked({n: s / (shapes[n].d_in + shapes[n].d_out) for n, s in sens.items()})[:k]
    if arm in ("layer-spread", "type-layer-spread", "type-layer-random"):
        layers = len({m.layer for m in shapes.values()})
        quota = None if arm == "layer-spread" else equal
        order = (random.Random(0).sample(sorted(sens), len(sens)) if arm == "type-layer-random"
                 else ranked(sens))
        return layer_spread(order, k, -(-k // layers), {n: m.layer for n, m in shapes.items()},
                            quota, kind)
    if arm == "probe":
        assert probe_drop is not None
        return within_types(ranked(sens), apportion(probe_drop, k, caps), kind)
    raise SystemExit(f"--arms: unknown arm {arm!r} (known: {', '.join(ARM_LABELS)}, random-N, "
                     "random, table)")


def arm_label(arm: str) -> str:
    return f"random k (draw {arm.removeprefix('random-')})" if arm.startswith("random-") else ARM_LABELS[arm]


class ArmBench:
    """Same init, batches, steps, lr and held-out set for every arm; ranks scaled per shape so
    each adapted matrix gets about the same number of LoRA parameters."""

    def __init__(self, model_dir: Path, tokenizer, steps: int, batch: int, n_eval: int, lr: float,
                 device: str = "cpu", seed: int = 0) -> None:
        self.model_dir, self.tokenizer, self.device, self.seed = model_dir, tokenizer, device, seed
        self.steps, self.batch, self.lr = steps, batch, lr
        self.shapes = {m.name: m for m in load_shapes(str(model_dir)).matrices}
        budget = 4 * max(m.d_in + m.d_out for m in self.shapes.values())
        self.ranks = {n: max(1, round(budget / (m.d_in + m.d_out))) for n, m in self.shapes.items()}
        examples = load_examples("builtin", 2000 + n_eval, seed=0)
        train, self.held = split_holdout(examples, n_eval, seed=0)
        self.enc = encode(train, tokenizer, 64)
        self.pad = tokenizer.pad_token_id

    def params(self, names: list[str]) -> int:
        return sum(self.ranks[n] * (self.shapes[n].d_in + self.shapes[n].d_out) for n in names)

    def adapted(self, names: list[str]) -> torch.nn.Module:
        """A fresh base with LoRA on `names`, trained the arms' way."""
        model = attach_lora(load_base(self.model_dir, 16, device=self.device),
                            {n: self.ranks[n] for n in names}, seed=self.seed)
        cpu = time.process_time()

        def progress(step: int, loss: float) -> None:
            if (step + 1) % 10 == 0:
                log(f"  step {step + 1}/{self.steps}: loss {loss:.3f}, "
                    f"{time.process_time() - cpu:.0f} s CPU")

        train_steps(model, cycle_batches(self.enc, self.batch, seed=self.seed, pad_id=self.pad),
                    self.steps, self.lr, on_step=progress)
        return model

    def run(self, names: list[str]) -> dict:
        """Train LoRA on `names` (none: the base model) and evaluate on the held-out set."""
        start = time.perf_counter()
        if names:
            model = self.adapted(names)
        else:
            model = load_base(self.model_dir, 16, device=self.device)
        train_s = time.perf_counter() - start
        result = evaluate(model, self.tokenizer, self.held, 64)
        return {"matrices": names, "by_type": by_type(names) if names else "-",
                "params": self.params(names), "train_s": round(train_s, 1),
                "loss": round(result["loss"], 4), "accuracy": result["accuracy"]}

    def probe(self, steps: int) -> dict:
        """Per matrix type: the drop in training loss (4 fixed batches of the training split) after
        `steps` steps of LoRA on all of that type's matrices alone."""
        fixed = list(itertools.islice(cycle_batches(self.enc, self.batch, seed=1, pad_id=self.pad), 4))

        @torch.no_grad()
        def loss(model: torch.nn.Module) -> float:
            model.eval()
            return statistics.mean(model(**b).loss.item() for b in fixed)

        start = time.perf_counter()
        before = loss(load_base(self.model_dir, 16, device=self.device))
        drop = {}
        for t in sorted({m.kind for m in self.shapes.values()}):
            names = [n for n, m in self.shapes.items() if m.kind == t]
            model = attach_lora(load_base(self.model_dir, 16, device=self.device),
                                {n: self.ranks[n] for n in names}, seed=0)
            train_steps(model, cycle_batches(self.enc, self.batch, seed=0, pad_id=self.pad), steps,
                        self.lr)
            drop[t] = round(before - loss(model), 4)
            log(f"probe {t}: loss {before:.3f} -> {before - drop[t]:.3f}")
        return {"steps": steps, "loss_before": round(before, 4), "drop": drop,
                "seconds": round(time.perf_counter() - start, 1)}


def arm_choices(scores: dict[str, dict[str, float]], k: int, draws: int) -> list[tuple[str, list[str]]]:
    """(label, matrices): top-k by each scorer, `draws` random k-sets, bottom-k by sensitivity."""
    arms = [f"top-{name}" for name in scores] + [f"random-{d + 1}" for d in range(draws)]
    arms.append("bottom-sensitivity")
    shapes = {m.name: m for m in load_shapes(BUNDLED).matrices}
    return [(arm_label(arm), select(arm, scores, shapes, k)) for arm in arms]


def arms(bench: ArmBench, choices: list[tuple[str, list[str]]]) -> list[str]:
    """Train each choice from the same init on the same batches; held-out loss and accuracy."""
    draws = sum(label.startswith("random") for label, _ in choices)
    base = bench.run([])
    log(f"base: loss {base['loss']:.3f} acc {base['accuracy']:.3f}")
    rows = ["| arm | matrices (by type) | LoRA params | train s | eval loss | accuracy |",
            "|---|---|---|---|---|---|",
            f"| base model, no adapter | - | 0 | - | {base['loss']:.3f} | {base['accuracy']:.3f} |"]
    random_results = []
    for label, names in choices:
        result = bench.run(names)
        log(f"{label}: loss {result['loss']:.3f} acc {result['accuracy']:.3f} "
            f"({result['train_s']:.0f} s train)")
        if label.startswith("random"):
            random_results.append(result)
        rows.append(f"| {label} | {result['by_type']} | {result['params']:,} | "
                    f"{result['train_s']:.0f} | {result['loss']:.3f} | {result['accuracy']:.3f} |")
        if label.startswith("random") and len(random_results) == draws and draws > 1:
            rows.append(f"| random k, mean of {draws} | | | | "
                        f"{statistics.mean(r['loss'] for r in random_results):.3f} | "
                        f"{statistics.mean(r['accuracy'] for r in random_results):.3f} |")
    return rows


def arms_table(store: dict) -> list[str]:
    """Every stored arm, random draws summarised (mean, range) as the noise floor."""
    cfg = store["settings"]
    rows = [f"k = {cfg['k']} of 210, {cfg['steps']} steps, batch {cfg['batch']}, lr {cfg['lr']}, "
            f"{cfg['eval']} held-out examples, seq_len 64, {cfg['threads']} torch thread(s)", "",
            "| arm | matrices (by type) | LoRA params | train s | load | eval loss | accuracy |",
            "|---|---|---|---|---|---|---|"]
    results = store["arms"]
    for arm, r in sorted(results.items(), key=lambda kv: (kv[0] != "base", kv[1]["loss"])):
        rows.append(f"| {arm_label(arm)} | {r['by_type']} | {r['params']:,} | {r['train_s']:.0f} | "
                    f"{r['load']:.1f} | {r['loss']:.3f} | {r['accuracy']:.2f} |")
    rand = [r["loss"] for arm, r in results.items() if arm.startswith("random-")]
    if len(rand) > 1:
        rows += ["", f"random draws ({len(rand)}): loss mean {statistics.mean(rand):.3f}, "
                 f"range {min(rand):.3f}-{max(rand):.3f} (spread {max(rand) - min(rand):.3f}), "
                 f"stdev {statistics.stdev(rand):.3f}"]
    if "probe" in store:
        p = store["probe"]
        rows += ["", f"probe ({p['steps']} steps per type, {p['seconds']:.0f} s in all): training "
                 f"loss {p['loss_before']:.3f} drops by " +
                 ", ".join(f"{t.removesuffix('_proj')} {d:.3f}" for t, d in p["drop"].items())]
    return rows


def load_store(path: Path, settings: dict | None) -> dict:
    """The arms JSON at `path` (a new one if absent); refuses one measured with other settings
    (None: any settings, to print the table)."""
    if not path.exists():
        return {"settings": settings, "arms": {}}
    store = json.loads(path.read_text())
    if settings is not None and store["settings"] != settings:
        raise SystemExit(f"{path} holds arms measured with {store['settings']}, not {settings}: "
                         "use another --json")
    return store


def run_arms(args: argparse.Namespace, settings: dict) -> None:
    """The --arms mode: the named arms, each stored in --json as soon as it is done."""
    wanted = [a for a in args.arms.split(",") if a != "table"]
    names = []
    for arm in wanted:
        names += ([f"random-{d + 1}" for d in range(settings["draws"])] if arm == "random" else [arm])
    store = load_store(args.json, settings if names else None)
    if names:
        model_dir = resolve_model_dir(BUNDLED)
        tokenizer = load_tokenizer(model_dir)
        if "scores" not in store:
            scorers = ("sensitivity", "fisher") if "top-fisher" in names else ("sensitivity",)
            store["scores"] = {}
            for scorer in scorers:
                request = ScoringRequest.make(PROFILE, scorer, batches=settings["calib_batches"],
                                              seed=0)
                store["scores"][scorer] = compute_report(request, set_latest=False,
                                                         device=args.device).report.scores
            write_atomic(args.json, json.dumps(store, indent=1) + "\n")
        bench = ArmBench(model_dir, tokenizer, settings["steps"], settings["batch"],
                         settings["eval"], settings["lr"], args.device, settings.get("seed", 0))
        for arm in names:
            if arm == "probe" and "probe" not in store:
                store["probe"] = bench.probe(args.probe_steps)
                write_atomic(args.json, json.dumps(store, indent=1) + "\n")
            chosen = select(arm, store["scores"], bench.shapes, settings["k"],
                            store.get("probe", {}).get("drop"))
            load = os.getloadavg()[0]
            result = bench.run(chosen)
            store["arms"][arm] = {**result, "load": round((load + os.getloadavg()[0]) / 2, 2),
                                  "finished": time.strftime("%Y-%m-%d %H:%M")}
            write_atomic(args.json, json.dumps(store, indent=1) + "\n")
            log(f"{arm}: loss {result['loss']:.3f} acc {result['accuracy']:.3f} "
                f"({result['train_s']:.0f} s train, {result['by_type']})")
    print("\n".join(arms_table(store)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer batches, steps and draws (~4 min)")
    ap.add_argument("--k", type=int, default=21, help="matrices per arm (default 21 of 210)")
    ap.add_argument("--steps", type=int, help="training steps per arm (default 60, quick 15)")
    ap.add_argument("--batch", type=int, default=8, help="training batch size (default 8)")
    ap.add_argument("--draws", type=int, help="random draws (default 2, quick 1; --arms: 3)")
    ap.add_argument("--eval", type=int, help="held-out examples (default 100, quick 40)")
    ap.add_argument("--calib-batches", type=int, help="calibration batches per server in 2. "
                    "(default 4, quick 2)")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--device", default="cpu", help="where scoring (2.) and training (3.) run; "
                    "cuda computes in bf16. The speed table (1.) is always CPU fp32.")
    ap.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    ap.add_argument("--arms", help="only these selection arms, comma-separated (see the module "
                    "docstring); 'table' prints the stored ones")
    ap.add_argument("--json", type=Path, default=ARMS_JSON, help="where --arms results are kept")
    ap.add_argument("--probe-steps", type=int, default=10, help="steps per type of the probe arm")
    ap.add_argument("--seed", type=int, default=0, help="--arms: training seed (LoRA init, batch "
                    "order); the held-out set and the scores stay fixed")
    args = ap.parse_args()
    quick = args.quick
    steps = args.steps or (15 if quick else 60)
    draws = args.draws or (1 if quick else 3 if args.arms else 2)
    n_eval = args.eval or (40 if quick else 100)
    calib_batches = args.calib_batches or (2 if quick else 4)

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    if args.arms:
        run_arms(args, {"k": args.k, "steps": steps, "batch": args.batch, "lr": args.lr,
                        "eval": n_eval, "calib_batches": calib_batches, "draws": draws,
                        "threads": torch.get_num_threads(), "device": args.device,
                        **({"seed": args.seed} if args.seed else {})})
        return
    start = time.perf_counter()
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
    print(f"### Top-k vs random vs bottom-k (k = {args.k}, {steps} steps, batch {args.batch}, "
          f"lr {args.lr}, {n_eval} held-out examples, seq_len 64)\n")
    bench = ArmBench(model_dir, tokenizer, steps, args.batch, n_eval, args.lr, args.device)
    print("\n".join(arms(bench, choices)))
    print(f"\nwall time {time.perf_counter() - start:.0f} s, load average "
          f"{os.getloadavg()[0]:.1f} at the end")


if __name__ == "__main__":
    main()
