"""One edge server's trainer on a Flower node, kept between messages when the node keeps it.

A round on a node needs the plan (checked by sha256), the base model loaded and quantized with its
LoRA attached, the node's shard tokenised, and, for rules that merge into the base, the merges the
base holds. `NodeTrainer` holds all of it. `fedpipe node` keeps one for the node's lifetime in its
own process (the resident trainer, reached through `fedpipe.relay`), so a round costs what it costs
in process; a ClientApp without one builds a NodeTrainer per message (`flower_app.train_node`).

What the trainer holds is keyed like Flower's node state, by run: a new run (a fresh start or a
resume) restores the original base weights and starts a new `EdgeTrainer` (no broadcast held, no
error feedback), so it starts from what a fresh process would hold. Within a run, gaps are the
protocol's business (a sparse broadcast against a round the trainer does not hold, or merges on
top of a base that is behind them, are refused with the server named; the coordinator resends
the full state after a missed reply). A plan with another sha256 than the one loaded is reloaded
when the node's plan file is now that plan, refused otherwise.
"""

from __future__ import annotations

import time
import traceback
from pathlib import Path

import torch

from fedpipe.client import AdaptedModel, EdgeTrainer
from fedpipe.data import plan_data
from fedpipe.digest import file_sha256
from fedpipe.errors import FedpipeError
from fedpipe.lora import LoraFactors
from fedpipe.measure import resident_gib
from fedpipe.models import apply_base_delta, load_tokenizer, plan_model_dir
from fedpipe.plan import Plan, load_plan
from fedpipe.rules import rule_traits


class NodeTrainer:
    """One plan member's training on its node: plan, loaded base, shard and EdgeTrainer."""

    def __init__(self, server: str, plan_path: str | Path, device: str) -> None:
        self.server, self.plan_path, self.device = server, Path(plan_path), device
        self.loads = 0  # how many times the base was loaded: 1 for a node's lifetime, unless the plan changed
        self.load()

    def load(self) -> None:
        """Read the plan and load its tokenizer and this server's base (the slow part). What was
        held goes first (a node may have memory for one base only); a failed load leaves nothing
        held, and the next message tries again."""
        start = time.perf_counter()
        self.plan_sha256, self.adapted = None, None
        sha256, plan = file_sha256(self.plan_path), load_plan(self.plan_path)
        if self.server not in dict(plan.training_members()):
            raise FedpipeError(f"server {self.server}: it trains nothing in this plan")
        self.plan: Plan = plan
        self.entry = plan.server(self.server)
        self.model_dir = plan_model_dir(plan)
        self.tokenizer = load_tokenizer(self.model_dir)
        self.adapted = AdaptedModel.load(self.model_dir, self.entry, self.device, plan.task.seed)
        self.shards: dict[int, list] = {}  # eval_samples -> this server's shard
        self.trainer: EdgeTrainer | None = None
        self.run: tuple | None = None  # what the trainer was started for: (run id, eval_samples, rule)
        self.plan_sha256 = sha256  # last: only a complete load counts
        self.load_s = time.perf_counter() - start  # what the last load took
        self.loads += 1

    def check(self, config: dict) -> None:
        """The message is for this server and this plan; reload when the plan file changed to it."""
        check_server(self.server, config)
        if config["plan_sha256"] != self.plan_sha256:
            if file_sha256(self.plan_path) != config["plan_sha256"]:
                raise FedpipeError(f"server {self.server}: {self.plan_path} differs from the "
                                   "coordinator's plan")
            self.load()

    def start_run(self, run_id: int, config: dict) -> None:
        """Begin a Flower run: the original base weights, a new EdgeTrainer on the shard."""
        eval_samples, rule = int(config["eval_samples"]), str(config.get("rule", ""))
        feedback = bool(config.get("error_feedback", False))  # the coordinator's RunSpec.carries_residuals
        if self.adapted.merged:  # restore the original weights: W0 + 0
            apply_base_delta(self.adapted.model, self.model_dir, {
                name: LoraFactors(torch.zeros(1, f.A.shape[1]), torch.zeros(f.B.shape[0], 1))
                for name, f in self.adapted.merged.items()})
            self.adapted.merged = {}
        self.adapted.merged_round = 0
        if eval_samples not in self.shards:
            self.shards[eval_samples] = plan_data(self.plan, eval_samples)[0][self.server]
        task = self.plan.task
        shared_init = rule_traits(rule).keeps_factor_coordinates
        self.trainer = EdgeTrainer(self.server, self.entry, self.shards[eval_samples], self.tokenizer,
                                   self.model_dir, task.seq_len, task.learning_rate, task.seed, feedback,
                                   shared_init, task.lr_schedule)
        self.run = (run_id, eval_samples, rule, feedback)

    def train(self, run_id: int, config: dict, broadcast: bytes) -> tuple[bytes, dict]:
        """One round: the update payload and what was measured (`setup_s`: the seconds this
        call spent before training, on a reload or a new run's shard and trainer)."""
        start = time.perf_counter()
        self.check(config)
        if self.run != (run_id, int(config["eval_samples"]), str(config.get("rule", "")),
                        bool(config.get("error_feedback", False))):
            self.start_run(run_id, config)
        setup_s = time.perf_counter() - start
        rounds = config.get("rounds")
        if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 1:
            raise FedpipeError(f"server {self.server}: the round's config field 'rounds' (the run's "
                               f"rounds) must be a whole number >= 1, got {rounds!r}")
        up, stats = self.trainer.train_round(self.adapted, broadcast, int(config["local_steps"]), rounds)
        return up, {"train_loss": stats.mean_loss, "steps": stats.steps, "train_s": stats.seconds,
                    "tokens": stats.tokens, "setup_s": setup_s, "loads": self.loads,
                    "memory_gib": resident_gib(self.adapted.model) + stats.peak_extra_gib}


def check_server(server: str, config: dict) -> None:
    """A round meant for another server is refused before anything is loaded or trained."""
    if config.get("server") != server:
        raise FedpipeError(f"this SuperNode serves {server!r}, but was sent {config.get('server')!r}'s round")


def handler(node: NodeTrainer):
    """The resident trainer's answer to one relayed round (`fedpipe.relay.serve`): a failure is a
    reply naming it, and the trainer keeps serving."""

    def handle(header: dict, payload: bytes) -> tuple[dict, bytes]:
        try:
            up, stats = node.train(int(header["run_id"]), header["config"], payload)
        except FedpipeError as e:
            return {"error": str(e)}, b""
        except Exception as e:  # noqa: BLE001 - a bug or a crash in training must not end the node
            traceback.print_exc()
            return {"error": f"{type(e).__name__}: {e}"}, b""
        print(f"fedpipe node {node.server}: run {header['run_id']} round {header['config'].get('round')}: "
              f"trained {stats['steps']} steps in {stats['train_s']:.1f} s, setup {stats['setup_s']:.2f} s",
              flush=True)
        return {"stats": stats}, up

    return handle
