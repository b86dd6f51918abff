"""`fedpipe run PLAN`: execute a plan in one process — setup, rounds, cleanup, top to bottom.

Each edge server trains its planned adapter on its planned base precision; the coordinator
aggregates; the global model (base + global update, exact, in full precision) is evaluated on a
held-out split after every round. After each round the run folder holds the global adapter in
peft format, a checkpoint to resume from, metrics.jsonl and curves:

    runs/NAME/adapter/            peft LoRA folder (PeftModel.from_pretrained(base, this))
    runs/NAME/checkpoint/         state.json + safetensors of the coordinator (and flora's merged base)
    runs/NAME/metrics.jsonl       one line per round: eval, per-server measurements vs predictions
    runs/NAME/curves.png          eval loss and accuracy per round
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from pydantic import ValidationError

from fedpipe import wire
from fedpipe.atomic import write_atomic
from fedpipe.client import AdaptedModel, EdgeTrainer
from fedpipe.data import evaluate, load_examples, partition, split_holdout
from fedpipe.errors import FedpipeError
from fedpipe.lora import GlobalAdapter
from fedpipe.measure import resident_gib
from fedpipe.metrics import plot_rounds, read_metrics, write_metrics
from fedpipe.models import apply_base_delta, load_base, load_tokenizer, resolve_model_dir, save_adapter
from fedpipe.plan import Plan, ServerPlan, check_densities, load_plan
from fedpipe.server import Coordinator
from fedpipe.tasks import FAMILIES, Example


@dataclass
class RunResult:
    run_dir: Path
    plan: Plan
    rows: list[dict]


def model_folder(plan: Plan) -> Path:
    """The plan's model with weights: the bundled one, or a folder (relative to its profile)."""
    beside_profile = Path(plan.profile.path).parent / plan.model
    return resolve_model_dir(str(beside_profile) if beside_profile.is_dir() else plan.model)


# ------------------------------------------------------------------------------ checkpoints
def save_checkpoint(folder: Path, coordinator: Coordinator, pool: dict[str, AdaptedModel]) -> None:
    """Round-numbered tensor files first, then state.json names them: a kill leaves the old one."""
    r = coordinator.round
    files = {"global": coordinator.global_adapter, "previous": coordinator.previous}
    state: dict = {"round": r, "rule": coordinator.aggregator.name, "files": {}, "merged": {}}
    for key, adapter in files.items():
        if adapter is not None:
            name = f"{key}-{r}.safetensors"
            write_atomic(folder / name, wire.encode(adapter.factors, metadata={"round": str(adapter.round)}))
            state["files"][key] = name
    for entry, adapted in pool.items():
        if adapted.merged:
            name = f"merged-{entry}-{r}.safetensors"
            write_atomic(folder / name, wire.encode(adapted.merged))
            state["merged"][entry] = name
    write_atomic(folder / "state.json", json.dumps(state, indent=2))
    keep = set(state["files"].values()) | set(state["merged"].values())
    for old in folder.glob("*.safetensors"):
        if old.name not in keep:
            old.unlink()


def load_checkpoint(folder: Path) -> tuple[dict, dict[str, GlobalAdapter], dict[str, dict]]:
    state = json.loads((folder / "state.json").read_text())
    adapters = {}
    for key, name in state["files"].items():
        factors, meta = wire.decode((folder / name).read_bytes())
        adapters[key] = GlobalAdapter(factors, round=int(meta["round"]))
    merged = {entry: wire.decode((folder / name).read_bytes())[0] for entry, name in state["merged"].items()}
    return state, adapters, merged


# ------------------------------------------------------------------------------ closing a round
@dataclass
class GlobalEvaluator:
    """The global model (base + global update, full precision) scored on the held-out split."""

    model: torch.nn.Module
    tokenizer: object
    held_out: list[Example]
    seq_len: int
    model_dir: Path

    def __call__(self, global_adapter: GlobalAdapter) -> dict:
        apply_base_delta(self.model, self.model_dir, global_adapter)
        return evaluate(self.model, self.tokenizer, self.held_out, self.seq_len)


def close_round(coordinator: Coordinator, payloads: list[bytes], evaluator: GlobalEvaluator,
                run_dir: Path, pool: dict[str, AdaptedModel]) -> dict:
    """What every backend does once the updates are in: aggregate them, evaluate the global
    model, save it in peft format and checkpoint; returns the round's eval and timings."""
    start = time.perf_counter()
    global_adapter = coordinator.aggregate(payloads)
    aggregate_s = time.perf_counter() - start
    result = evaluator(global_adapter)
    eval_s = time.perf_counter() - start - aggregate_s
    save_adapter(global_adapter, evaluator.model_dir, run_dir / "adapter")
    save_checkpoint(run_dir / "checkpoint", coordinator, pool)
    return {"eval": result, "aggregate_s": aggregate_s, "eval_s": eval_s,
            "global_rank": max(f.rank for f in global_adapter.factors.values())}


# ------------------------------------------------------------------------------ the run
def with_densities(plan: Plan, upload: float | None = None, download: float | None = None) -> Plan:
    """The plan with every server's upload / download density overridden (None: the plan's)."""
    update = {k: v for k, v in (("upload_density", upload), ("download_density", download))
              if v is not None}
    if not update:
        return plan
    try:
        servers = [ServerPlan.model_validate(s.model_dump() | update) for s in plan.servers]
    except ValidationError as e:
        raise FedpipeError("density override: " + "; ".join(err["msg"] for err in e.errors())) from None
    return plan.model_copy(update={"servers": servers})


def plan_data(plan: Plan, n_eval: int) -> tuple[list[tuple[str, ServerPlan]], list[str],
                                                 dict[str, list[Example]], list[Example]]:
    """(training members with their entries, idle members, each member's shard, held-out split):
    a function of the plan, its seed and data only, so every backend and machine rebuilds the same."""
    task = plan.task
    members = [(m, entry) for entry in plan.servers for m in entry.members if entry.rank_pattern]
    idle = [m for entry in plan.servers for m in entry.members if not entry.rank_pattern]
    if not members:
        raise FedpipeError("the plan adapts no matrix on any server: nothing to train")
    # generated data: enough of every family that a skewed (non-IID) shard never repeats examples
    needed = (sum(entry.samples for _, entry in members) + n_eval) * len(FAMILIES)
    examples = load_examples(task.dataset, n=needed if task.dataset.startswith("builtin") else None,
                             seed=task.seed)
    train_pool, held_out = split_holdout(examples, n_eval, task.seed)
    shards = partition(train_pool, {m: entry.samples for m, entry in members}, task.partition,
                       task.dirichlet_alpha, task.seed)
    return members, idle, shards, held_out


def run_plan(plan_path: str | Path, *, rounds: int | None = None, out: str | Path | None = None,
             aggregation: str | None = None, resume: bool = False, local_steps: int | None = None,
             eval_samples: int | None = None, device: str = "cpu",
             on_progress: Callable[[str, int, int, int], None] | None = None,
             upload_density: float | None = None, download_density: float | None = None) -> RunResult:
    """Run (or resume) the plan's federated rounds; see the module docstring for the outputs.
    The densities, when given, override every server's (sparse communication, `fedpipe.client`)."""
    # ---- setup
    plan = with_densities(load_plan(plan_path), upload_density, download_density)
    task = plan.task
    rule = aggregation or plan.aggregation
    check_densities(plan.servers, rule)
    total_rounds = rounds or task.rounds
    steps = local_steps or task.local_steps
    n_eval = eval_samples or task.eval_samples
    run_dir = Path(out) if out else Path("runs") / plan.profile.name
    checkpoint = run_dir / "checkpoint"
    if (checkpoint / "state.json").is_file() and not resume:
        raise FedpipeError(f"{run_dir} already holds a run: pass --resume to continue it, "
                           "or --out for a new folder")
    model_dir = model_folder(plan)
    tokenizer = load_tokenizer(model_dir)

    members, idle, shards, held_out = plan_data(plan, n_eval)
    trainers = [EdgeTrainer(m, entry, shards[m], tokenizer, model_dir, task.seq_len, task.learning_rate,
                            task.seed) for m, entry in members]
    pool = {entry.name: AdaptedModel.load(model_dir, entry, device, task.seed)
            for entry in plan.servers if entry.rank_pattern}
    evaluator = GlobalEvaluator(load_base(model_dir, 16, device=device), tokenizer, held_out,
                                task.seq_len, model_dir)
    coordinator = Coordinator(rule)
    rows: list[dict] = []
    if resume and (checkpoint / "state.json").is_file():
        state, adapters, merged = load_checkpoint(checkpoint)
        if state["rule"] != rule:
            raise FedpipeError(f"--resume: the run used aggregation {state['rule']!r}, not {rule!r}")
        coordinator = Coordinator(rule, adapters.get("global"), adapters.get("previous"))
        for entry, factors in merged.items():
            pool[entry].merged, pool[entry].merged_round = factors, state["round"]
            apply_base_delta(pool[entry].model, model_dir, factors)
        rows = [r for r in read_metrics(run_dir / "metrics.jsonl") if r["round"] <= state["round"]]

    # ---- rounds
    for round_index in range(coordinator.round + 1, total_rounds + 1):
        round_start = time.perf_counter()
        payloads, servers, cache = [], [], {}
        for i, trainer in enumerate(trainers):
            if on_progress:  # (server, round, steps done, steps in the whole run)
                done = (round_index - 1) * len(trainers) + i
                on_progress(trainer.name, round_index, done, total_rounds * len(trainers))
            entry = trainer.entry
            if entry.name not in cache:
                cache[entry.name] = coordinator.broadcast(entry)
            down = cache[entry.name]
            up, stats = trainer.train_round(pool[entry.name], down, steps)
            payloads.append(up)
            adapted = pool[entry.name].model
            servers.append({
                "server": trainer.name, "entry": entry.name, "bits": entry.bits,
                "batch_size": entry.batch_size, "train_loss": stats.mean_loss, "steps": stats.steps,
                "train_s": stats.seconds, "tokens": stats.tokens,
                "memory_gib": resident_gib(adapted) + stats.peak_extra_gib,
                "predicted_memory_gib": entry.predicted.memory_gib,
                "upload_bytes": len(up), "download_bytes": len(down),
                "predicted_upload_bytes": entry.predicted.upload_bytes,
                "predicted_download_bytes": entry.predicted.download_bytes,
                "upload_density": entry.upload_density, "download_density": entry.download_density,
            })
        closed = close_round(coordinator, payloads, evaluator, run_dir, pool)
        rows.append({"round": round_index, "rule": rule, "servers": servers, "idle_servers": idle,
                     **closed, "round_s": time.perf_counter() - round_start,
                     "train_s": sum(s["train_s"] for s in servers)})
        write_metrics(run_dir / "metrics.jsonl", rows)
        plot_rounds(rows, run_dir / "curves.png")
        if on_progress:
            on_progress("evaluated", round_index, round_index * len(trainers), total_rounds * len(trainers))

    # ---- cleanup
    del pool, evaluator
    return RunResult(run_dir, plan, rows)
