"""The Flower backend: the same plan on Flower's Deployment Engine, one SuperNode per edge server.

Process layout (flwr >= 1.41, one HTTP port on the SuperLink):

    coordinator machine   flower-superlink            (Fleet, Control and Runtime APIs, one port)
                          └─ ServerApp process        `coordinate`: the round loop
                                                      (`fedpipe.federation.loop`) over this
                                                      transport (started by the SuperLink)
                          `fedpipe run --backend flower` submits the run (`flwr run`), streams its log
    each edge machine     `fedpipe node PLAN --server NAME`: the resident trainer (`fedpipe.resident`:
                          base loaded once, shard, EdgeTrainer, merged base), the node's ClientApp
                          tasks (`fedpipe.flower_tasks`: `train` relays the round's bytes to the
                          trainer over `fedpipe.relay`, a Unix socket with a key), and as its child
                          └─ flower-supernode         node config plan=PATH server=NAME resident=DIR,
                                                      --isolation process (no process per message)
    (`fedpipe node --no-resident`, a plain flower-supernode: Flower's one ClientApp process per
    message, which loads the model for it, `train_node`)

Messages carry the wire payloads unchanged (a uint8 array in an ArrayRecord), so bytes counted are
the wire bytes: ``query`` (who are you: server name, plan digest), ``train`` (broadcast payload +
round settings -> update payload + measurements). The node builds its shard exactly as the
in-process transport does (`data.plan_data`) and trains with the same `EdgeTrainer`; the
round loop is the same one, so a run matches the in-process backend. A ClientApp whose node has
no resident trainer (`fedpipe node --no-resident`, a plain flower-supernode, a simulation) loads
the model for its one message (`train_node`), as slow as that is.

A node that fails or times out misses that round only: the round aggregates the replies that
arrived (weights renormalised), the metrics row names who missed it and why, and the node is
invited again next round. `min_participation` (a count, or a fraction with a decimal point, of the
round's cohort) fails the run when too few reply. Rules that merge into the base (flora) need each
node's base to hold every earlier round's merge: a resident trainer holds it, a node without one
keeps it in its Flower node state; one that sat out rounds undrawn gets the merges it missed, one
that was drawn and did not reply (it may have restarted) the cumulative merged update
(`protocol`: base ``full``). A node restarted while undrawn refuses the merges (its base is behind
them) and so misses one round.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from logging import INFO, WARNING
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from fedpipe.digest import file_sha256
from fedpipe.errors import FedpipeError
from fedpipe.federation.transport import Delivery, Reply, Transport, late_reason
from fedpipe.metrics import read_metrics
from fedpipe.relay import NodeFolder, ResidentUnavailable, ask, serve

if TYPE_CHECKING:  # torch: imported where a run needs it, so a relaying ClientApp never does
    from fedpipe.federation.spec import RunSpec
    from fedpipe.plan import ServerPlan

INSTALL_HINT = "pip install 'fedpipe[flower]'"
try:
    from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
    from flwr.clientapp import ClientApp
    from flwr.common.logger import log
    from flwr.serverapp import Grid, ServerApp
except ImportError as e:  # the CLI imports this module lazily: fedpipe works without flwr
    raise FedpipeError(f"the Flower backend needs flwr >= 1.41: {INSTALL_HINT}") from e

DEFAULT_SUPERLINK = "127.0.0.1:8000"
CONNECTION = "fedpipe"  # the SuperLink connection name in the FLWR_HOME that `launch` writes
ERROR_MARK = "fedpipe-error: "  # the ServerApp's last log line when it fails, read back by `launch`
DONE_MARK = "fedpipe-done: "
STATE_BASE, STATE_SYNC = "fedpipe.base", "fedpipe.sync"  # node state records (merged base, round)
REPLY_POLL_S = 0.2


# ------------------------------------------------------------------------------ shared helpers
def bytes_record(payload: bytes) -> ArrayRecord:
    """Wire bytes as one uint8 array: what Flower carries is exactly what was counted."""
    return ArrayRecord({"payload": Array(np.frombuffer(payload, dtype=np.uint8).copy())})


def record_bytes(record: ArrayRecord) -> bytes:
    return record["payload"].numpy().tobytes()


@dataclass(frozen=True)
class RunSettings:
    """What `fedpipe run --backend flower` hands the ServerApp (the app's run config)."""

    plan: str
    out: str
    plan_sha256: str
    rounds: int = 0  # 0: the plan's
    aggregation: str = ""  # "": the plan's
    resume: bool = False
    local_steps: int = 0  # 0: the plan's
    eval_samples: int = 0  # 0: the plan's
    eval_every: int = 0  # 0: the plan's
    accuracy_every: int = 0  # 0: the plan's
    round_timeout: float = 3600.0
    min_participation: str = "1"
    norm_bound: float = -1.0  # -1: the plan's; 0: off
    clip_norm: float = -1.0
    truncate_energy: float = 0.0  # 0: off
    truncate_rank: int = 0  # 0: off
    cohort: str = ""  # "": the plan's
    stratify: int = -1  # -1: the plan's; 0 / 1
    error_feedback: bool = True

    @classmethod
    def from_config(cls, config: dict) -> RunSettings:
        return cls(**{f.name: config[f.name] for f in fields(cls) if f.name in config})

    def to_spec(self) -> RunSpec:
        from fedpipe.federation.spec import RunSpec

        return RunSpec.resolve(self.plan, rounds=self.rounds or None, out=self.out,
                               aggregation=self.aggregation or None, resume=self.resume,
                               local_steps=self.local_steps or None, eval_samples=self.eval_samples or None,
                               eval_every=self.eval_every or None,
                               accuracy_every=self.accuracy_every or None,
                               min_participation=self.min_participation, round_timeout=self.round_timeout,
                               norm_bound=None if self.norm_bound < 0 else self.norm_bound,
                               clip_norm=None if self.clip_norm < 0 else self.clip_norm,
                               truncate_energy=self.truncate_energy or None,
                               truncate_rank=self.truncate_rank or None,
                               cohort=self.cohort or None,
                               stratify=None if self.stratify < 0 else bool(self.stratify),
                               error_feedback=self.error_feedback)


def send_and_receive(grid: Grid, messages: list[Message], timeout: float) -> list[Message]:
    """`Grid.send_and_receive`, asking the SuperLink for replies every REPLY_POLL_S instead of
    every 3 s: on a round of seconds, Flower's own wait would be a large share of it."""
    waiting = set(grid.push_messages(messages)) - {None}
    replies: list[Message] = []
    deadline = time.monotonic() + timeout
    while waiting:
        got = list(grid.pull_messages(waiting))
        replies += got
        waiting -= {r.metadata.reply_to_message_id for r in got}
        if not waiting or time.monotonic() >= deadline:
            break
        time.sleep(REPLY_POLL_S)
    return replies


def replies_by_sender(sent: dict, replies) -> dict:
    """Replies keyed like `sent` (a dict of pushed messages), matched by the message they answer:
    error replies that the SuperLink writes for an unavailable node name no node."""
    key_of = {msg.metadata.message_id: key for key, msg in sent.items()}
    return {key_of[r.metadata.reply_to_message_id]: r for r in replies
            if r.metadata.reply_to_message_id in key_of}


# ------------------------------------------------------------------------------ the ServerApp
class Roster:
    """Which SuperNode serves which plan member; each new node is asked once (a query message)."""

    def __init__(self, grid: Grid, members: list[str], digest: str, timeout: float) -> None:
        self.grid, self.members, self.digest, self.timeout = grid, members, digest, timeout
        self.node_of: dict[str, int] = {}
        self.asked: set[int] = set()
        self.refused: dict[str, str] = {}

    def refresh(self) -> None:
        """Forget nodes that went offline, identify the new ones (the newest wins a name)."""
        online = set(self.grid.get_node_ids())
        self.node_of = {m: n for m, n in self.node_of.items() if n in online}
        new = sorted(online - self.asked)
        if not new:
            return
        self.asked |= set(new)
        queries = {n: Message(RecordDict(), dst_node_id=n, message_type="query", ttl=self.timeout)
                   for n in new}
        replies = replies_by_sender(queries, send_and_receive(self.grid, list(queries.values()),
                                                              self.timeout))
        self.asked -= set(new) - set(replies)  # silent so far (still starting): asked again next refresh
        for node, reply in replies.items():
            if reply.has_error():
                log(WARNING, "fedpipe: SuperNode %s did not identify itself: %s", node, reply.error.reason)
                self.asked.discard(node)
                continue
            info = reply.content["info"]
            server, digest = str(info["server"]), str(info["plan_sha256"])
            if server not in self.members:
                log(WARNING, "fedpipe: SuperNode %s serves %r, which trains nothing in this plan "
                    "(servers: %s); ignored", node, server, ", ".join(self.members))
            elif digest != self.digest:
                self.refused[server] = "its plan file differs from the coordinator's"
                log(WARNING, "fedpipe: SuperNode %s (%s) holds another plan (sha256 %s, expected %s): "
                    "copy the coordinator's plan file to it", node, server, digest[:12], self.digest[:12])
            else:
                if server in self.node_of:
                    log(WARNING, "fedpipe: SuperNode %s serves %s too; it replaces %s", node, server,
                        self.node_of[server])
                self.refused.pop(server, None)
                self.node_of[server] = node
                log(INFO, "fedpipe: SuperNode %s serves %s", node, server)

    def wait_for_all(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while True:
            self.refresh()
            missing = [m for m in self.members if m not in self.node_of]
            if not missing or time.monotonic() > deadline:
                break
            time.sleep(1.0)
        if missing:
            log(WARNING, "fedpipe: no SuperNode for %s after %.0f s; starting without", ", ".join(missing),
                seconds)


class FlowerTransport(Transport):
    """The round loop's messages as Flower Messages to the SuperNodes that serve the plan's members."""

    def __init__(self, grid: Grid, spec: RunSpec) -> None:
        self.grid, self.spec = grid, spec
        self.roster = Roster(grid, [m for m, _ in spec.plan.training_members()], spec.plan_sha256,
                             spec.round_timeout)
        self.roster.wait_for_all(spec.round_timeout)

    def unreachable(self, members: list[str]) -> dict[str, str]:
        self.roster.refresh()
        return {m: self.roster.refused.get(m, "no SuperNode online") for m in members
                if m not in self.roster.node_of}

    def exchange(self, round_index: int, deliveries: list[Delivery], local_steps: int,
                 on_sent: Callable[[str], None]) -> tuple[dict[str, Reply], dict[str, str]]:
        timeout = self.spec.round_timeout
        messages = {}
        for d in deliveries:
            config = ConfigRecord({"server": d.member, "round": round_index, "rounds": self.spec.rounds,
                                   "local_steps": local_steps,
                                   "eval_samples": self.spec.eval_samples, "rule": self.spec.rule,
                                   "error_feedback": self.spec.carries_residuals,
                                   "plan_sha256": self.spec.plan_sha256})
            messages[d.member] = Message(RecordDict({"broadcast": bytes_record(d.payload), "config": config}),
                                         dst_node_id=self.roster.node_of[d.member], message_type="train",
                                         ttl=timeout)
            on_sent(d.member)
        replies, missed = {}, {}
        for member, reply in replies_by_sender(messages, send_and_receive(
                self.grid, list(messages.values()), timeout)).items():
            if reply.has_error():
                missed[member] = f"failed: {reply.error.reason}"
                continue
            stats = reply.content["stats"]
            replies[member] = Reply(member, record_bytes(reply.content["update"]), float(stats["train_loss"]),
                                    int(stats["steps"]), float(stats["train_s"]), int(stats["tokens"]),
                                    float(stats["memory_gib"]))
            held = (f"resident trainer, base loaded {int(stats['loads'])}x" if int(stats["resident"])
                    else "base loaded for this message")
            log(INFO, "fedpipe: round %d: %s trained %d steps in %.1f s after %.2f s of setup (%s)",
                round_index, member, int(stats["steps"]), float(stats["train_s"]), float(stats["setup_s"]),
                held)
        for d in deliveries:
            if d.member in messages and d.member not in replies and d.member not in missed:
                missed[d.member] = late_reason(d, f"no reply within {timeout:g} s")
        for member, why in missed.items():
            log(WARNING, "fedpipe: round %d: %s missed it (%s); it is invited again next round",
                round_index, member, why)
        return replies, missed


def coordinate(grid: Grid, settings: RunSettings) -> list[dict]:
    """The ServerApp's run: the shared round loop over the Flower transport."""
    from fedpipe.federation.loop import run_federation

    if file_sha256(settings.plan) != settings.plan_sha256:
        raise FedpipeError(f"{settings.plan} changed since the run was submitted")
    spec = settings.to_spec()

    def report(server: str, round_index: int, done: int, total: int) -> None:
        row = read_metrics(spec.folder.metrics)[-1] if server == "evaluated" else None
        if row is not None and row["eval"] is not None:
            accuracy = row["eval"]["accuracy"]
            log(INFO, "fedpipe: round %d/%d: %d servers, eval loss %.4f, accuracy %s", round_index,
                spec.rounds, len(row["servers"]), row["eval"]["loss"],
                "not measured" if accuracy is None else f"{accuracy:.3f}")

    return run_federation(spec, FlowerTransport(grid, spec), report).rows


server_app = ServerApp()


@server_app.main()
def server_main(grid: Grid, context: Context) -> None:
    settings = RunSettings.from_config(dict(context.run_config))
    try:
        coordinate(grid, settings)
    except FedpipeError as e:  # one line `launch` finds in the log stream, then the run fails
        log(WARNING, "%s%s", ERROR_MARK, json.dumps(str(e)))
        raise
    log(INFO, "%s%s", DONE_MARK, settings.out)


# ------------------------------------------------------------------------------ the ClientApp
client_app = ClientApp()


def node_settings(context: Context) -> tuple[str, str, str]:
    """(server, plan path, device) from the node config that `fedpipe node` wrote."""
    config = dict(context.node_config)
    missing = [k for k in ("server", "plan") if k not in config]
    if missing:
        raise FedpipeError(f"this SuperNode's --node-config lacks {', '.join(missing)}: start it with "
                           "`fedpipe node PLAN --server NAME --superlink HOST:PORT`")
    return str(config["server"]), str(config["plan"]), str(config.get("device", "cpu"))


@client_app.query()
def identify(msg: Message, context: Context) -> Message:
    server, plan, _ = node_settings(context)
    info = ConfigRecord({"server": server, "plan_sha256": file_sha256(plan)})
    return Message(RecordDict({"info": info}), reply_to=msg)


@client_app.train()
def train(msg: Message, context: Context) -> Message:
    """Relay the round to this node's resident trainer (`fedpipe node`), or, without one, train here."""
    server, plan, device = node_settings(context)
    folder = dict(context.node_config).get("resident")
    if folder:
        try:
            return Message(relay_round(str(folder), context.run_id, msg.content, context.state), reply_to=msg)
        except ResidentUnavailable as e:
            log(WARNING, "fedpipe: %s; loading the model for this message", e)
    return Message(train_node(server, plan, device, msg.content, context.state, context.run_id), reply_to=msg)


def relay_round(folder: str, run_id: int, content: RecordDict, state: RecordDict) -> RecordDict:
    """The round's bytes to the resident trainer and its reply back, without importing torch.

    The resident trainer holds the merged base itself, so the node state's copy is dropped: were
    this node to train without it later, its base would be behind the merges and it would refuse
    them (and get the cumulative update next) rather than train on a stale base."""
    header = {"run_id": run_id, "config": dict(content["config"].items())}
    try:
        reply, update = ask(folder, header, record_bytes(content["broadcast"]))
    except ConnectionError as e:
        raise FedpipeError(str(e)) from None
    if "error" in reply:
        raise FedpipeError(reply["error"])
    for key in (STATE_BASE, STATE_SYNC):
        state.pop(key, None)
    stats = MetricRecord(reply["stats"] | {"resident": 1})
    return RecordDict({"update": bytes_record(update), "stats": stats})


def train_node(server: str, plan_path: str, device: str, content: RecordDict,
               state: RecordDict, run_id: int = 0) -> RecordDict:
    """One round on a node that keeps no trainer: load the plan's base and shard for this message,
    train, reply. The merge into the base (rules that merge) lives in the node state between rounds."""
    from fedpipe import wire
    from fedpipe.models import apply_base_delta
    from fedpipe.protocol import peek_metadata
    from fedpipe.resident import NodeTrainer, check_server

    config = dict(content["config"].items())
    check_server(server, config)
    start = time.perf_counter()
    node = NodeTrainer(server, plan_path, device)
    node.start_run(run_id, config)
    broadcast = record_bytes(content["broadcast"])
    base = peek_metadata(broadcast).get("base", "none")
    adapted = node.adapted
    if base == "delta":  # this round's merge goes on top of the ones this node already holds
        adapted.merged_round = int(state[STATE_SYNC]["round"]) if STATE_SYNC in state else 0
        if STATE_BASE in state:
            adapted.merged = wire.decode(record_bytes(state[STATE_BASE]))[0]
            apply_base_delta(adapted.model, node.model_dir, adapted.merged)
    setup_s = time.perf_counter() - start
    up, stats = node.train(run_id, config, broadcast)
    if base != "none":
        if adapted.merged:
            state[STATE_BASE] = bytes_record(wire.encode(adapted.merged))
        state[STATE_SYNC] = ConfigRecord({"round": adapted.merged_round})
    return RecordDict({"update": bytes_record(up),
                       "stats": MetricRecord(stats | {"setup_s": setup_s + stats["setup_s"], "resident": 0})})


# ------------------------------------------------------------------------------ launching
def flower_command(name: str) -> str:
    """A Flower console script of this Python environment (beside the interpreter), else on PATH."""
    found = shutil.which(name, path=str(Path(sys.executable).parent)) or shutil.which(name)
    if found is None:
        raise FedpipeError(f"{name} not found: {INSTALL_HINT}")
    return found


def tls_args(insecure: bool, root_certificates: Path | None) -> list[str]:
    if insecure and root_certificates is not None:
        raise FedpipeError("--insecure and --root-certificates exclude each other")
    if root_certificates is not None and not root_certificates.is_file():
        raise FedpipeError(f"--root-certificates: no such file {root_certificates}")
    if insecure:
        return ["--insecure"]
    return ["--root-certificates", str(root_certificates.resolve())] if root_certificates else []


def supernode_command(plan_path: Path, server: str, superlink: str, *, insecure: bool = False,
                      root_certificates: Path | None = None, auth_key: Path | None = None,
                      port: int = 9094, device: str | None = None, resident: Path | None = None) -> list[str]:
    """The flower-supernode command line for one edge server of the plan (checked here first);
    `resident`: the folder where this node's resident trainer listens (`fedpipe.relay`)."""
    from fedpipe.data import plan_data
    from fedpipe.models import plan_model_dir
    from fedpipe.plan import load_plan

    plan = load_plan(plan_path)
    entry = plan.server(server)
    if server not in entry.members:
        raise FedpipeError(f"--server: {server!r} is a plan entry of {entry.count} servers; name one of "
                           f"them: {', '.join(entry.members)}")
    if not entry.rank_pattern:
        raise FedpipeError(f"server {server}: the plan adapts no matrix on it, so it has nothing to run")
    plan_data(plan, plan.task.eval_samples)  # the data and model must be here: fail now, not at round 1
    plan_model_dir(plan)
    if auth_key is not None and (insecure or not auth_key.is_file()):
        raise FedpipeError(f"--auth-key {auth_key}: " + ("SuperNode authentication needs TLS (drop "
                           "--insecure)" if insecure else "no such file"))
    config = [("server", server), ("plan", str(plan_path.resolve())), ("device", node_device(entry, device))]
    if resident is not None:
        config.append(("resident", str(resident)))
    node_config = " ".join(f"{k}={json.dumps(v)}" for k, v in config)
    command = [flower_command("flower-supernode"), "--superlink", superlink,
               *tls_args(insecure, root_certificates), "--node-config", node_config,
               "--host", "127.0.0.1", "--port", str(port)]
    if resident is not None:
        from fedpipe import flower_tasks

        if flower_tasks.AVAILABLE:  # `run_node` runs the ClientApp tasks itself, beside the trainer
            command += ["--isolation", "process"]
    if auth_key is not None:
        command += ["--auth-supernode-private-key", str(auth_key.resolve())]
    return command


def node_device(entry: ServerPlan, device: str | None) -> str:
    """The device a node trains on: as asked, else the plan's (cpu without CUDA)."""
    if device is not None:
        return device
    if entry.device == "cpu":
        return "cpu"
    import torch

    return entry.device if torch.cuda.is_available() else "cpu"


def run_node(plan_path: Path, server: str, supernode: Callable[[Path | None], list[str]], *,
             device: str | None = None, resident: bool = True,
             echo: Callable[[str], None] | None = None) -> int:
    """`fedpipe node`: the SuperNode (`supernode(resident folder)`'s command line) as a child of
    this process, which, with `resident`, loads the server's base once and trains every round
    relayed to it. Runs until the SuperNode exits (its status) or this process gets SIGTERM or
    Ctrl-C (it stops the SuperNode first; 0)."""
    import signal
    import threading

    echo = echo or (lambda line: print(line, file=sys.stderr, flush=True))
    previous = signal.signal(signal.SIGTERM, signal.default_int_handler)  # as Ctrl-C: stop the SuperNode
    folder = NodeFolder.create() if resident else None
    try:
        command = supernode(folder.path if folder else None)  # checks the plan, server, data and model
        if folder is not None:
            from transformers.utils import logging as hf_logging

            from fedpipe.plan import load_plan
            from fedpipe.resident import NodeTrainer, handler

            hf_logging.disable_progress_bar()  # one line says what was loaded and how long it took
            node = NodeTrainer(server, plan_path, node_device(load_plan(plan_path).server(server), device))
            echo(f"fedpipe node {server}: {node.entry.bits}-bit base with its LoRA loaded in "
                 f"{node.load_s:.1f} s; it stays loaded for every round")
            ready = threading.Event()
            threading.Thread(target=serve, args=(folder, handler(node), ready), daemon=True).start()
            ready.wait()
        proc = subprocess.Popen(command, env=flower_env())
        stop = threading.Event()
        if "--isolation" in command:  # ClientApp tasks here, beside the trainer (`fedpipe.flower_tasks`)
            from fedpipe.flower_tasks import serve_tasks

            runtime_api = f"{command[command.index('--host') + 1]}:{command[command.index('--port') + 1]}"
            threading.Thread(target=serve_tasks, args=(runtime_api, client_app, stop), daemon=True).start()
        try:
            return proc.wait()
        except KeyboardInterrupt:
            proc.terminate()
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            return 0
        finally:
            stop.set()
    finally:
        signal.signal(signal.SIGTERM, previous)
        if folder is not None:
            folder.remove()


def flower_env(flwr_home: Path | None = None) -> dict[str, str]:
    """The environment for Flower processes: no `uv sync` of app dependencies, no update check, and
    the SuperExec looks for new tasks (a ClientApp or ServerApp to start) every 0.1 s, not 1 s."""
    env = dict(os.environ, FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1", FLWR_DISABLE_UPDATE_CHECK="1",
               FLWR_SUPEREXEC_TASK_POLL_INTERVAL="0.1")
    if flwr_home is not None:
        env["FLWR_HOME"] = str(flwr_home)
    return env


APP_PYPROJECT = """\
[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "fedpipe-run"
version = "1.0.0"
description = "A fedpipe plan on Flower's Deployment Engine"
license = "Apache-2.0"
dependencies = []  # fedpipe[flower] is installed on every machine: nothing to install at run time

[tool.flwr.app]
publisher = "fedpipe"

[tool.flwr.app.components]
serverapp = "fedpipe.flower_app:server_app"
clientapp = "fedpipe.flower_app:client_app"

[tool.flwr.app.config]
"""


def write_app(folder: Path, settings: RunSettings) -> Path:
    """The Flower app folder `flwr run` bundles: only a pyproject naming this module's apps."""
    config = "".join(f"{k} = {json.dumps(v)}\n" for k, v in asdict(settings).items())
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "pyproject.toml").write_text(APP_PYPROJECT + config)
    return folder


def launch(plan_path: Path, *, superlink: str = DEFAULT_SUPERLINK, insecure: bool = False,
           root_certificates: Path | None = None, rounds: int | None = None, out: Path | None = None,
           aggregation: str | None = None, resume: bool = False, local_steps: int | None = None,
           eval_samples: int | None = None, eval_every: int | None = None,
           accuracy_every: int | None = None, round_timeout: float = 3600.0,
           min_participation: str = "1", norm_bound: float | None = None, clip_norm: float | None = None,
           truncate_energy: float | None = None, truncate_rank: int | None = None,
           cohort: str | None = None, stratify: bool | None = None, error_feedback: bool = True,
           echo: Callable[[str], None] | None = None):
    """Submit the plan to a running SuperLink, stream the ServerApp's log, return the RunResult.

    The ServerApp runs beside the SuperLink and writes the run folder there (an absolute path from
    here): run this on the SuperLink's machine to read the results back.
    """
    from fedpipe.federation.loop import RunResult
    from fedpipe.federation.spec import RunSpec

    spec = RunSpec.resolve(plan_path, rounds=rounds, out=out, aggregation=aggregation, resume=resume,
                           local_steps=local_steps, eval_samples=eval_samples, eval_every=eval_every,
                           accuracy_every=accuracy_every,
                           min_participation=min_participation, round_timeout=round_timeout,
                           norm_bound=norm_bound, clip_norm=clip_norm, truncate_energy=truncate_energy,
                           truncate_rank=truncate_rank, cohort=cohort, stratify=stratify,
                           error_feedback=error_feedback)
    run_dir = spec.folder.path.resolve()
    settings = RunSettings(plan=str(plan_path.resolve()), out=str(run_dir), plan_sha256=spec.plan_sha256,
                           rounds=rounds or 0, aggregation=aggregation or "", resume=resume,
                           local_steps=local_steps or 0, eval_samples=eval_samples or 0,
                           eval_every=eval_every or 0, accuracy_every=accuracy_every or 0,
                           round_timeout=float(round_timeout), min_participation=str(min_participation),
                           norm_bound=-1.0 if norm_bound is None else norm_bound,
                           clip_norm=-1.0 if clip_norm is None else clip_norm,
                           truncate_energy=truncate_energy or 0.0, truncate_rank=truncate_rank or 0,
                           cohort=cohort or "", stratify=-1 if stratify is None else int(stratify),
                           error_feedback=error_feedback)
    connection = {"address": superlink}
    if insecure:
        connection["insecure"] = True
    tls_args(insecure, root_certificates)
    if root_certificates is not None:
        connection["root-certificates"] = str(root_certificates.resolve())
    with tempfile.TemporaryDirectory(prefix="fedpipe-flwr-") as tmp:
        home = Path(tmp) / "flwr-home"
        home.mkdir()
        (home / "config.toml").write_text(
            f"[superlink]\ndefault = \"{CONNECTION}\"\n\n[superlink.{CONNECTION}]\n"
            + "".join(f"{k} = {json.dumps(v)}\n" for k, v in connection.items()))
        app = write_app(Path(tmp) / "app", settings)
        stream_run(app, flower_env(home), echo or (lambda line: print(line, file=sys.stderr, flush=True)))
    return RunResult(run_dir, spec.plan, read_metrics(run_dir / "metrics.jsonl"))


def stream_run(app: Path, env: dict[str, str], echo: Callable[[str], None]) -> None:
    """`flwr run APP --stream` to its end; the ServerApp's last line says how it ended.
    Ctrl-C stops the run on the SuperLink too (resume it with --resume)."""
    flwr = flower_command("flwr")
    proc = subprocess.Popen([flwr, "run", str(app), CONNECTION, "--stream"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
    run_id, error, done, tail = None, None, False, []
    try:
        for line in proc.stdout:
            line = line.rstrip("\n")
            echo(line)
            tail = (tail + [line])[-20:]
            started = re.search(r"started run (\d+)", line)
            run_id = started.group(1) if started and run_id is None else run_id
            if ERROR_MARK in line:
                error = json.loads(line.split(ERROR_MARK, 1)[1])
            done = done or DONE_MARK in line
        proc.wait()
    except KeyboardInterrupt:
        if run_id is not None:
            subprocess.run([flwr, "stop", run_id, CONNECTION], env=env, timeout=120,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        raise FedpipeError(f"interrupted: Flower run {run_id} stopped; continue it with --resume") from None
    finally:
        if proc.poll() is None:
            proc.terminate()
            proc.wait()
    if error is not None:
        raise FedpipeError(f"the Flower run failed: {error}")
    if not done:
        raise FedpipeError(f"the Flower run did not finish (flwr run exited {proc.returncode}); its last "
                           "lines:\n" + "\n".join(tail))
