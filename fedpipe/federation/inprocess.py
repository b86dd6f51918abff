"""The in-process transport: every edge server trains in this process, one after another.

Servers of one plan entry (same bits and adapter shape) share one loaded model, so memory grows with
the plan's hardware classes, not its servers; each keeps its own shard and trainer across rounds,
which is what lets sparse downloads refer to the last broadcast.

A server's measured memory is what it would hold alone: the process before any model was loaded
(interpreter, libraries, tokenizer, data), its model's bytes, and the peak working memory of its
training (`measure.PeakMemory`), the same parts the plan's prediction adds up.

The round deadline (`round_timeout`) is judged after the fact: servers train one after another
here, so a server whose own training took longer than the deadline misses the round.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from fedpipe.client import AdaptedModel, EdgeTrainer
from fedpipe.data import plan_data
from fedpipe.federation.loop import Progress, RunResult, run_federation
from fedpipe.federation.spec import RunSpec
from fedpipe.federation.transport import Delivery, Reply, Transport, late_reason
from fedpipe.measure import GIB, resident_gib, rss_bytes
from fedpipe.models import load_tokenizer, plan_model_dir
from fedpipe.rules import rule_traits


class InProcessTransport(Transport):
    def __init__(self, spec: RunSpec) -> None:
        self.runtime_gib = rss_bytes() / GIB  # before any model: what every server's process holds too
        plan, task = spec.plan, spec.plan.task
        model_dir = plan_model_dir(plan)
        tokenizer = load_tokenizer(model_dir)
        shards, _ = plan_data(plan, spec.eval_samples)
        members = plan.training_members()
        shared_init = rule_traits(spec.rule).keeps_factor_coordinates
        self.trainers = {m: EdgeTrainer(m, entry, shards[m], tokenizer, model_dir, task.seq_len,
                                        task.learning_rate, task.seed, spec.carries_residuals, shared_init,
                                        task.lr_schedule)
                         for m, entry in members}
        self.pool = {entry.name: AdaptedModel.load(model_dir, entry, spec.device, task.seed)
                     for _, entry in members}
        self.deadline_s, self.rounds = spec.round_timeout, spec.rounds

    def exchange(self, round_index: int, deliveries: list[Delivery], local_steps: int,
                 on_sent: Callable[[str], None]) -> tuple[dict[str, Reply], dict[str, str]]:
        replies, late = {}, {}
        for d in deliveries:
            on_sent(d.member)
            adapted = self.pool[d.entry.name]
            up, stats = self.trainers[d.member].train_round(adapted, d.payload, local_steps, self.rounds)
            if stats.seconds > self.deadline_s:
                late[d.member] = late_reason(d, f"trained {stats.seconds:.3g}s, past the "
                                                f"{self.deadline_s:g}s round deadline (judged after "
                                                "training, in-process)")
                continue
            replies[d.member] = Reply(d.member, up, stats.mean_loss, stats.steps, stats.seconds, stats.tokens,
                                      self.runtime_gib + resident_gib(adapted.model) + stats.peak_extra_gib)
        return replies, late

    def close(self) -> None:
        self.pool.clear()
        self.trainers.clear()


def run_plan(plan_path: str | Path, *, on_progress: Progress | None = None, **overrides) -> RunResult:
    """`fedpipe run PLAN`: resolve the settings (`RunSpec.resolve` takes the overrides), then run
    every server in this process."""
    spec = RunSpec.resolve(plan_path, **overrides)
    return run_federation(spec, InProcessTransport(spec), on_progress)
