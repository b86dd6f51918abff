"""Flower's Simulation Engine: the plan's federation as virtual SuperNodes on this machine (Ray).

`fedpipe run PLAN --backend simulation` runs the Flower backend's own pieces without a network:
the round loop over `FlowerTransport` as the ServerApp, the ClientApp's `query` and `train`
handlers on every node. There is one virtual SuperNode per training member of the plan (all of
them, so any round's cohort can be drawn); the engine numbers its nodes by ``partition-id`` and
node i serves the i-th member in plan order (`node_servers`). A pool of Ray actors, sized from
this machine's cores and given no GPU (`backend_config`), runs the nodes' messages.

`flwr.simulation.run_simulation` is used, not `flwr run` against a local simulation federation:
it needs no app folder and leaves no SuperLink behind. Beside the Deployment Engine:

- The ServerApp runs in this process on the spec `fedpipe run` resolved (no settings cross a
  process boundary), with the in-process progress bar.
- Node state (a flora node's merged base) lives in the engine's per-node context between rounds,
  as in a SuperNode; each message rebuilds the node's shard and model, as a ClientApp does.
- `--round-timeout` is Flower's: wall clock from sending to the reply, which here includes
  waiting for a free actor when nodes outnumber actors, and in round 1 the actors' start-up.
- No upload error feedback (a node keeps no trainer between rounds, as on Flower); the
  communication overrides are refused, since nodes read densities and precisions from the plan.

Ray is shut down when the run ends or fails, and with it every process it started.
"""

from __future__ import annotations

import os
import tempfile
import threading
from collections.abc import Iterable
from logging import ERROR
from pathlib import Path

from fedpipe.errors import FedpipeError
from fedpipe.federation.loop import Progress, RunResult, run_federation
from fedpipe.federation.spec import RunSpec
from fedpipe.flower_app import (  # flwr's names through flower_app: it names the extra when flwr is missing
    ClientApp,
    Context,
    FlowerTransport,
    Grid,
    Message,
    ServerApp,
    identify,
    train,
)
from fedpipe.plan import Plan

INSTALL_HINT = "pip install 'fedpipe[simulation]'"
PARTITION_ID = "partition-id"  # the node config key the Simulation Engine gives each virtual node


def node_servers(plan: Plan) -> list[str]:
    """The server each virtual SuperNode serves, by partition id: every training member, plan order."""
    return [member for member, _ in plan.training_members()]


def backend_config(nodes: int, cores: int) -> dict:
    """Ray's resources: all of this machine's cores, no GPU, each actor an equal share of them
    (one core each when nodes outnumber cores), so at most one actor per node."""
    per_actor = max(1, cores // nodes)
    return {"init_args": {"num_cpus": cores, "num_gpus": 0},
            "client_resources": {"num_cpus": per_actor, "num_gpus": 0.0}}


def machine_cores() -> int:
    """The cores this process may run on (its CPU affinity, e.g. a container's share)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def simulation_client_app(plan_path: Path, servers: list[str]) -> ClientApp:
    """The Flower ClientApp's handlers, with each virtual node's partition id mapped to the node
    config a real SuperNode carries (server, plan, device)."""
    plan = str(plan_path.resolve())

    def as_node(context: Context) -> Context:
        server = servers[int(context.node_config[PARTITION_ID])]
        return Context(run_id=context.run_id, node_id=context.node_id, state=context.state,
                       run_config=context.run_config,
                       node_config={"server": server, "plan": plan, "device": "cpu"})

    app = ClientApp()

    @app.query()
    def query_as_node(msg: Message, context: Context) -> Message:
        return identify(msg, as_node(context))

    @app.train()
    def train_as_node(msg: Message, context: Context) -> Message:
        return train(msg, as_node(context))

    return app


class InterruptibleGrid:
    """The engine's Grid, except that asking for replies fails once `stop` is set: Ctrl-C stops the
    engine in the main thread, and the ServerApp thread, waiting up to --round-timeout for
    replies that will never come, would otherwise keep the process alive."""

    def __init__(self, grid: Grid, stop: threading.Event) -> None:
        self.grid, self.stop = grid, stop

    def get_node_ids(self) -> Iterable[int]:
        return self.grid.get_node_ids()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        return self.grid.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        if self.stop.is_set():
            raise FedpipeError("interrupted")
        return self.grid.pull_messages(message_ids)


def simulate(spec: RunSpec, on_progress: Progress | None = None) -> RunResult:
    """Run the spec's rounds on Flower's Simulation Engine; the run folder holds the results."""
    if spec.communication:
        raise FedpipeError("--upload/--download-density/-precision: the simulation backend's nodes "
                           "read them from the plan file; set them there")
    try:
        import ray
    except ImportError:
        raise FedpipeError(f"the simulation backend needs Ray: {INSTALL_HINT}") from None
    from flwr.simulation import run_simulation  # 3 s to import: only when simulating

    servers = node_servers(spec.plan)
    server_app, rows, stop = ServerApp(), [], threading.Event()

    @server_app.main()
    def coordinate(grid: Grid, context: Context) -> None:
        transport = FlowerTransport(InterruptibleGrid(grid, stop), spec)
        rows.extend(run_federation(spec, transport, on_progress).rows)

    config = backend_config(len(servers), machine_cores())
    with tempfile.TemporaryDirectory(prefix="fedpipe-ray-") as tmp:
        config["init_args"] |= {"_temp_dir": tmp, "logging_level": ERROR}
        try:
            run_simulation(server_app, simulation_client_app(spec.plan_path, servers), len(servers),
                           backend_config=config)
        except KeyboardInterrupt:
            raise FedpipeError(f"interrupted: {spec.folder.path} holds the completed rounds; continue "
                               "with --resume") from None
        finally:
            stop.set()
            if ray.is_initialized():  # the engine shuts Ray down itself once its actor pool exists
                ray.shutdown()
    return RunResult(spec.folder.path, spec.plan, rows)
