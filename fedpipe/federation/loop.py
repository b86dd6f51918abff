"""The round loop of every run, whatever carries the messages — setup, rounds, cleanup.

    for each round:
        draw the cohort ──► broadcast per member of it ──► transport.exchange ──► screen the
        updates (`screen`) ──► participation check ──► aggregate (plan order) ──► evaluate the
        global model ──► save adapter, checkpoint, row

The cohort (`cohort.draw_cohort`) is a function of the seed and the round, so every transport and a
resumed run train the same servers. The global model (base + global update, exact, in full
precision) is evaluated on the held-out split every `eval_every` rounds and after the last: the
answer loss each time, exact match (greedy generation) on every
`accuracy_every`-th of those and the last (`RunSpec.evaluates`). Under
a rule that merges into the base, a member behind the global model is sent what it missed
(`Coordinator.broadcast`): the merges since its last round when it sat out rounds undrawn, the
cumulative update when its state is unknown (it was drawn and did not reply, or the run was
resumed). The round deadline is the transport's to enforce; a member that misses it is reported
with the plan's predicted round time beside its own.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from fedpipe.aggregators.truncate import Truncation, cut_metrics
from fedpipe.cohort import draw_cohort
from fedpipe.data import evaluate, plan_data
from fedpipe.errors import FedpipeError
from fedpipe.federation.coordinator import Coordinator
from fedpipe.federation.records import RoundRow, ServerRow
from fedpipe.federation.screen import Expected, Refused, clipped, norm_outliers, product_norm
from fedpipe.federation.spec import RunSpec
from fedpipe.federation.transport import Delivery, Reply, Transport
from fedpipe.lora import ClientUpdate, GlobalAdapter
from fedpipe.models import apply_base_delta, load_base, load_tokenizer, plan_model_dir, save_adapter
from fedpipe.plan import Plan
from fedpipe.tasks import Example

log = logging.getLogger("fedpipe")
Progress = Callable[[str, int, int, int], None]  # (server or "evaluated", round, done, total)


@dataclass
class RunResult:
    run_dir: Path
    plan: Plan
    rows: list[dict]


@dataclass
class GlobalEvaluator:
    """The global model (base + global update, full precision) scored on the held-out split."""

    model: torch.nn.Module
    tokenizer: object
    held_out: list[Example]
    seq_len: int
    model_dir: Path

    def __call__(self, global_adapter: GlobalAdapter, accuracy: bool) -> dict:
        apply_base_delta(self.model, self.model_dir, global_adapter)
        return evaluate(self.model, self.tokenizer, self.held_out, self.seq_len, accuracy=accuracy)


def run_federation(spec: RunSpec, transport: Transport, on_progress: Progress | None = None) -> RunResult:
    """Run (or resume) the spec's rounds over `transport`; the run folder holds the results."""
    # ---- setup
    plan, folder = spec.plan, spec.folder
    members = plan.training_members()
    model_dir = plan_model_dir(plan)
    shards, held_out = plan_data(plan, spec.eval_samples)
    evaluator = GlobalEvaluator(load_base(model_dir, 16, device=spec.device), load_tokenizer(model_dir),
                                held_out, plan.task.seq_len, model_dir)
    shapes = matrix_shapes(evaluator.model, {name for _, entry in members for name in entry.rank_pattern})
    truncation = None
    if spec.truncate_energy or spec.truncate_rank:
        truncation = Truncation(energy=spec.truncate_energy or 1.0, max_rank=spec.truncate_rank)
    seed = spec.plan.task.seed
    coordinator, rows = Coordinator(spec.rule, truncation=truncation, seed=seed), []
    if spec.completed_rounds:
        _, adapters = folder.load_checkpoint()
        coordinator = Coordinator(spec.rule, adapters.get("global"), adapters.get("previous"), truncation,
                                  seed)
        rows = folder.read_rows(up_to=coordinator.round)
    # member -> the last round whose broadcast its base holds (it replied); unknown after a resume
    last_round: dict[str, int] = {} if spec.completed_rounds else {m: 0 for m, _ in members}
    classes = [(m, entry.name) for m, entry in members]
    total = spec.rounds * spec.cohort

    # ---- rounds
    try:
        for round_index in range(coordinator.round + 1, spec.rounds + 1):
            start = time.perf_counter()
            sampled = set(draw_cohort(classes, round_index, plan.task.seed, spec.cohort, spec.stratify))
            cohort = [(m, entry) for m, entry in members if m in sampled]
            missed = transport.unreachable([m for m, _ in cohort])
            _check_participation(round_index, len(cohort) - len(missed), len(cohort), spec, missed,
                                 "are reachable")
            deliveries = [Delivery(m, entry, coordinator.broadcast(entry, since=last_round.get(m)))
                          for m, entry in cohort if m not in missed]
            position = {m: (round_index - 1) * len(cohort) + i for i, (m, _) in enumerate(cohort)}

            def on_sent(member: str, round_index: int = round_index, position: dict = position) -> None:
                if on_progress:
                    on_progress(member, round_index, position[member], total)

            replies, late = transport.exchange(round_index, deliveries, spec.local_steps, on_sent)
            missed |= late
            for m, _ in cohort:  # one drawn that did not reply may have restarted: its base is unknown
                if m in replies:
                    last_round[m] = round_index
                else:
                    last_round.pop(m, None)
            expected = {m: Expected(m, entry.name, round_index, len(shards[m]), entry.rank_pattern,
                                    {n: shapes[n] for n in entry.rank_pattern}) for m, entry in cohort}
            arrived = [(replies[d.member], d) for d in deliveries if d.member in replies]  # plan order
            accepted, refused = screen_replies(coordinator, spec, arrived, expected)
            missed |= refused
            _check_participation(round_index, len(accepted), len(cohort), spec, missed,
                                 "sent an update that passed the checks")
            row = close_round(spec, coordinator, evaluator, accepted, missed, start)
            rows.append(row.model_copy(update={"cohort": [m for m, _ in cohort]}).model_dump(mode="json"))
            folder.write_rows(rows)
            if on_progress:
                on_progress("evaluated", round_index, round_index * len(cohort), total)
    finally:
        # ---- cleanup
        transport.close()
    return RunResult(folder.path, plan, rows)


def matrix_shapes(model: torch.nn.Module, names: set[str]) -> dict[str, tuple[int, int]]:
    """(d_out, d_in) of each named linear layer of the (unquantized) base model."""
    shapes = {name: tuple(module.weight.shape) for name, module in model.named_modules() if name in names}
    missing = sorted(names - set(shapes))
    if missing:
        raise FedpipeError(f"the plan adapts {len(missing)} module(s) the model does not have, "
                           f"e.g. {missing[0]}")
    return shapes


Accepted = tuple[ClientUpdate, Reply, Delivery]


def screen_replies(coordinator: Coordinator, spec: RunSpec, arrived: list[tuple[Reply, Delivery]],
                   expected: dict[str, Expected]) -> tuple[list[Accepted], dict[str, str]]:
    """The trust boundary (`screen`): decode and check each reply against the plan, refuse norm
    outliers, clip when asked. Returns the accepted updates in plan order and who was refused why."""
    checked, refused = [], {}
    for reply, delivery in arrived:
        try:
            checked.append((coordinator.receive(reply.payload, expected[reply.member]), reply, delivery))
        except Refused as e:
            refused[reply.member] = f"refused: {e.reason}"
    outliers = norm_outliers({reply.member: product_norm(update.factors) for update, reply, _ in checked},
                             spec.norm_bound)
    refused |= {m: f"refused: {why}" for m, why in outliers.items()}
    for member, why in refused.items():
        log.warning("round %d: %s %s; the round goes on without it", expected[member].round, member, why)
    accepted = [(clipped(u, spec.clip_norm) if spec.clip_norm else u, r, d) for u, r, d in checked
                if r.member not in outliers]
    return accepted, refused


def close_round(spec: RunSpec, coordinator: Coordinator, evaluator: GlobalEvaluator,
                accepted: list[Accepted], missed: dict[str, str], start: float) -> RoundRow:
    """Once the updates are in and checked: aggregate them, evaluate the global model, save it in
    peft format and checkpoint; returns the round's row."""
    t0 = time.perf_counter()
    global_adapter = coordinator.aggregate([update for update, _, _ in accepted])
    aggregate_s = time.perf_counter() - t0
    evaluated = spec.evaluates(global_adapter.round)
    result = None if evaluated == "nothing" else evaluator(global_adapter, evaluated == "loss+accuracy")
    eval_s = time.perf_counter() - t0 - aggregate_s
    adapter_file = save_adapter(global_adapter, evaluator.model_dir, spec.folder.adapter)
    spec.folder.save_checkpoint(spec.fingerprint(), global_adapter, coordinator.previous)
    servers = [server_row(reply, delivery) for _, reply, delivery in accepted]
    return RoundRow(round=global_adapter.round, rule=spec.rule, servers=servers,
                    idle_servers=spec.plan.idle_members(), missed_servers=missed,
                    evaluated=evaluated, eval=result, learning_rate=spec.learning_rate(global_adapter.round),
                    aggregate_s=aggregate_s, eval_s=eval_s,
                    global_rank=max((f.rank for f in global_adapter.factors.values()), default=0),
                    truncation=cut_metrics(coordinator.aggregator.cuts),
                    adapter_bytes=(adapter_file / "adapter_model.safetensors").stat().st_size,
                    round_s=time.perf_counter() - start, train_s=sum(s.train_s for s in servers))


def server_row(reply: Reply, delivery: Delivery) -> ServerRow:
    entry = delivery.entry
    return ServerRow(server=reply.member, entry=entry.name, bits=entry.bits, batch_size=entry.batch_size,
                     train_loss=reply.train_loss, steps=reply.steps, train_s=reply.train_s,
                     tokens=reply.tokens, memory_gib=reply.memory_gib,
                     predicted_memory_gib=entry.predicted.memory_gib, upload_bytes=len(reply.payload),
                     download_bytes=len(delivery.payload),
                     predicted_upload_bytes=entry.predicted.upload_bytes,
                     predicted_download_bytes=entry.predicted.download_bytes,
                     upload_density=entry.upload_density, download_density=entry.download_density)


def _check_participation(round_index: int, got: int, total: int, spec: RunSpec, missed: dict[str, str],
                         what: str) -> None:
    if got < spec.min_participation:
        raise FedpipeError(f"round {round_index}: {got} of {total} servers {what}; --min-participation "
                           f"needs {spec.min_participation}", [f"{m}: {why}" for m, why in missed.items()])
