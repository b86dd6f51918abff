"""Flower's Simulation Engine (`--backend simulation`): real Ray, against the in-process runner.

The end-to-end run is a `fedpipe run` subprocess; every process Ray starts inherits a marker in
its environment, so the test can find any it left behind.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest
import yaml
from test_flower import LoopbackGrid, max_abs_diff
from test_run import read_global
from typer.testing import CliRunner

from fedpipe.cli import app
from fedpipe.digest import file_sha256
from fedpipe.errors import FedpipeError
from fedpipe.federation.inprocess import run_plan
from fedpipe.federation.records import RoundRow
from fedpipe.plan import load_plan, save_plan
from fedpipe.planning.strategies import make_plan

simulation = pytest.importorskip("fedpipe.simulation", exc_type=FedpipeError)

EVAL_SAMPLES = 4
RUN_ARGS = ["--cohort", "2", "--local-steps", "1", "--eval-samples", str(EVAL_SAMPLES)]


def fleet_plan(tmp_path: Path, model_dir: Path) -> Path:
    """Four servers of the tiny model in two hardware classes (4-bit rank 2 on attention, 16-bit
    rank 8 everywhere), flora, two rounds."""
    servers = [{"name": "edge", "count": 2, "memory_gib": 1, "tflops": 1, "uplink_mbps": 10,
                "downlink_mbps": 10, "samples": 16, "device": "cpu", "bits": [4]},
               {"name": "hub", "count": 2, "memory_gib": 4, "tflops": 10, "uplink_mbps": 100,
                "downlink_mbps": 100, "samples": 16, "device": "cpu", "bits": [16]}]
    profile = {"name": "fleet", "model": str(model_dir), "aggregation": "flora",
               "task": {"seq_len": 48, "local_steps": 1, "rounds": 2, "eval_samples": 12,
                        "learning_rate": 1e-3},
               "candidates": {"ranks": [0, 2, 8], "bits": [4, 16], "batch_sizes": [2]},
               "calibration": {"runtime_overhead_gib": 0.0}, "servers": servers}
    (tmp_path / "fleet.yaml").write_text(yaml.safe_dump(profile))
    plan = make_plan(tmp_path / "fleet.yaml")
    edge, hub = plan.servers
    names = [f"model.layers.{i}.{m}" for i in range(2) for m in ("self_attn.q_proj", "self_attn.v_proj",
                                                                  "mlp.up_proj")]
    edge = edge.model_copy(update={"rank_pattern": {n: 2 for n in names if "attn" in n}})
    hub = hub.model_copy(update={"rank_pattern": {n: 8 for n in names}})
    return save_plan(plan.model_copy(update={"servers": [edge, hub]}), tmp_path / "fleet.plan.yaml")


def processes_with(marker: str) -> list[str]:
    """Command lines of the live processes whose environment holds `marker`."""
    found = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and marker.encode() in (proc / "environ").read_bytes():
                found.append((proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace"))
        except OSError:  # gone meanwhile, or not ours to read
            continue
    return found


@pytest.mark.slow  # 3-5 minutes on the shared 2-core box (Ray start, one actor per core)
def test_simulation_matches_in_process_and_leaves_no_ray_process(tmp_path, tiny_model_dir):
    """Same plan, seed and data: the same cohorts, rows and global adapter as in-process (flora,
    a cohort of 2 of 4 servers: round 2 trains a server that sat out round 1, which first catches
    up on the merge it missed from its node state)."""
    pytest.importorskip("ray")
    plan_path = fleet_plan(tmp_path, tiny_model_dir)
    reference = run_plan(plan_path, out=tmp_path / "inprocess", cohort="2", local_steps=1,
                         eval_samples=EVAL_SAMPLES)
    marker = f"FEDPIPE_TEST_RAY={uuid.uuid4().hex}"
    env_name, env_value = marker.split("=")
    run = subprocess.run([sys.executable, "-m", "fedpipe.cli", "run", str(plan_path), "--backend", "simulation",
                          "--out", str(tmp_path / "simulation"), *RUN_ARGS], capture_output=True, text=True,
                         env={**os.environ, env_name: env_value}, timeout=900)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-5000:]

    deadline = time.monotonic() + 30  # Ray's processes exit on shutdown; give them a moment
    while (left := processes_with(marker)) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not left, left

    diff = max_abs_diff(read_global(tmp_path / "simulation"), read_global(tmp_path / "inprocess"))
    print(f"\nmax abs difference of the global ΔW, simulation vs in-process: {diff:.3g}")
    assert diff < 1e-5
    rows = [RoundRow.model_validate_json(line).model_dump(mode="json")
            for line in (tmp_path / "simulation" / "metrics.jsonl").read_text().splitlines()]
    assert [r["cohort"] for r in rows] == [r["cohort"] for r in reference.rows]
    assert len({m for r in rows for m in r["cohort"]}) > 2 and all(len(r["cohort"]) == 2 for r in rows)
    for got, want in zip(rows, reference.rows, strict=True):
        assert got["eval"]["loss"] == pytest.approx(want["eval"]["loss"], rel=1e-5)
        assert got["missed_servers"] == want["missed_servers"] == {} and set(got) == set(want)
        for s, t in zip(got["servers"], want["servers"], strict=True):
            assert s["server"] == t["server"] and set(s) == set(t)
            assert s["upload_bytes"] == t["upload_bytes"] and s["download_bytes"] == t["download_bytes"]
            assert s["train_loss"] == pytest.approx(t["train_loss"], rel=1e-5)


def test_each_virtual_node_serves_its_member(tmp_path, tiny_model_dir):
    """Partition id i serves the plan's i-th training member: what a real SuperNode's node config
    says, answered through Flower's own ClientApp dispatch (no Ray)."""
    from flwr.app import ConfigRecord, RecordDict
    from flwr.supercore.task_identity import TaskIdentity

    plan_path = fleet_plan(tmp_path, tiny_model_dir)
    servers = simulation.node_servers(load_plan(plan_path))
    assert servers == ["edge-1", "edge-2", "hub-1", "hub-2"]
    client = simulation.simulation_client_app(plan_path, servers)
    TaskIdentity.run_id = TaskIdentity.node_id = TaskIdentity.task_id = 1  # Message() reads them
    for partition, server in enumerate(servers):
        context = simulation.Context(run_id=1, node_id=100 + partition, state=RecordDict(), run_config={},
                                     node_config={"partition-id": partition, "num-partitions": len(servers)})
        query = simulation.Message(RecordDict(), dst_node_id=100 + partition, message_type="query")
        info = client(query, context).content["info"]
        assert (info["server"], info["plan_sha256"]) == (server, file_sha256(plan_path))
    wrong = simulation.Message(RecordDict({"config": ConfigRecord({"server": "hub-2"})}), dst_node_id=100,
                               message_type="train")
    with pytest.raises(Exception, match="serves 'edge-1', but was sent 'hub-2'"):
        client(wrong, simulation.Context(run_id=1, node_id=100, state=RecordDict(), run_config={},
                                         node_config={"partition-id": 0, "num-partitions": 4}))


def test_a_node_silent_at_first_is_asked_again(tmp_path, tiny_model_dir):
    """A virtual node whose actor is still starting misses the first query; the next refresh (every
    round) asks it again instead of leaving it unreachable for the whole run."""
    from fedpipe.flower_app import Roster

    plan_path = fleet_plan(tmp_path, tiny_model_dir)
    grid = LoopbackGrid(plan_path, dict(enumerate(simulation.node_servers(load_plan(plan_path)))))
    grid.silent.add(0)
    roster = Roster(grid, simulation.node_servers(load_plan(plan_path)), file_sha256(plan_path), 1.0)
    roster.refresh()
    assert sorted(roster.node_of) == ["edge-2", "hub-1", "hub-2"]
    grid.silent.clear()
    roster.refresh()
    assert roster.node_of["edge-1"] == 0


@pytest.mark.timeout(120)
def test_an_interrupted_run_stops_waiting_for_replies():
    """After Ctrl-C the engine is gone: the ServerApp thread must not wait out --round-timeout."""

    class SilentGrid:  # nodes that never reply
        def push_messages(self, messages):
            return ["sent"]

        def pull_messages(self, ids):
            return []

    from fedpipe.flower_app import send_and_receive

    stop = threading.Event()
    grid = simulation.InterruptibleGrid(SilentGrid(), stop)
    assert send_and_receive(grid, [], timeout=0.3) == []
    stop.set()
    with pytest.raises(FedpipeError, match="interrupted"):
        send_and_receive(grid, [], timeout=3600)


def test_actors_share_the_cores_and_no_gpu():
    assert simulation.backend_config(4, 2) == {"init_args": {"num_cpus": 2, "num_gpus": 0},
                                               "client_resources": {"num_cpus": 1, "num_gpus": 0.0}}
    assert simulation.backend_config(3, 16)["client_resources"]["num_cpus"] == 5  # 3 actors of 5 cores


def test_bad_arguments_exit_2_before_ray_starts(tmp_path, tiny_model_dir, monkeypatch):
    ray = pytest.importorskip("ray")

    def started(*args, **kwargs):
        raise AssertionError("Ray was started")

    monkeypatch.setattr(ray, "init", started)
    plan_path = fleet_plan(tmp_path, tiny_model_dir)
    runner = CliRunner()
    for args, message in ((["--cohort", "5"], "cohort: '5' is neither a count from 1 to 4"),
                          (["--round-timeout", "0"], "--round-timeout: must be positive"),
                          (["--upload-density", "0.5"], "the simulation backend's nodes read them"),
                          (["--superlink", "10.0.0.1:9092"], "only for --backend flower")):
        result = runner.invoke(app, ["run", str(plan_path), "--backend", "simulation",
                                     "--out", str(tmp_path / "run"), *args])
        assert result.exit_code == 2 and message in result.output, result.output


def test_missing_ray_names_the_extra(tmp_path, tiny_model_dir, monkeypatch):
    from fedpipe.federation.spec import RunSpec

    monkeypatch.setitem(sys.modules, "ray", None)  # makes `import ray` fail
    spec = RunSpec.resolve(fleet_plan(tmp_path, tiny_model_dir), out=tmp_path / "run")
    with pytest.raises(FedpipeError, match=r"pip install 'fedpipe\[simulation\]'"):
        simulation.simulate(spec)
