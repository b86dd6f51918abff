"""The Flower backend: a real SuperLink and SuperNodes on 127.0.0.1, against the in-process runner.

Every process is started in its own session and stopped by its PID (SIGTERM, then SIGKILL to its
process group: the SuperExec and ClientApp children it started) in the fixture's teardown.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from test_run import read_global, tiny_plan
from typer.testing import CliRunner

from fedpipe.cli import app
from fedpipe.cohort import count_or_fraction
from fedpipe.digest import file_sha256
from fedpipe.errors import FedpipeError
from fedpipe.federation.inprocess import run_plan
from fedpipe.metrics import read_metrics

flower_app = pytest.importorskip("fedpipe.flower_app", exc_type=FedpipeError)
from fedpipe import flower_tasks  # noqa: E402 - needs flwr, checked just above

EVAL_SAMPLES = 4  # both backends: the held-out evaluation is the same code, keep it short


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Federation:
    """One SuperLink and named SuperNodes (`fedpipe node`), all on 127.0.0.1, Flower state in tmp."""

    def __init__(self, root: Path, plan_path: Path) -> None:
        self.root, self.plan_path = root, plan_path
        self.env = flower_app.flower_env(root / "flwr-home") | {"RAY_TMPDIR": str(root / "ray"),
                                                                 "PYTHONUNBUFFERED": "1"}
        self.port = free_port()
        self.superlink = f"127.0.0.1:{self.port}"
        self.procs: list[subprocess.Popen] = []
        self.nodes: dict[str, subprocess.Popen] = {}

    def _start(self, command: list[str], log_name: str) -> subprocess.Popen:
        with open(self.root / f"{log_name}.log", "a") as log:
            proc = subprocess.Popen(command, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, start_new_session=True)
        self.procs.append(proc)
        return proc

    def start_superlink(self) -> None:
        self._start([flower_app.flower_command("flower-superlink"), "--insecure", "--host", "127.0.0.1",
                     "--port", str(self.port), "--disable-runtime-dependency-installation"], "superlink")
        deadline = time.time() + 120
        while True:  # listening: `flwr run` and the SuperNodes connect at once
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return
            except OSError:
                assert time.time() < deadline and self.procs[-1].poll() is None, self.logs()
                time.sleep(0.3)

    def start_node(self, server: str) -> subprocess.Popen:
        proc = self._start([sys.executable, "-m", "fedpipe.cli", "node", str(self.plan_path),
                            "--server", server, "--superlink", self.superlink, "--insecure",
                            "--port", str(free_port())], f"node-{server}")
        self.nodes[server] = proc
        return proc

    def run_cli(self, *args: str) -> subprocess.Popen:
        """`fedpipe run PLAN --backend flower ...` in the background, its output in run.log."""
        return self._start([sys.executable, "-m", "fedpipe.cli", "run", str(self.plan_path), "--backend",
                            "flower", "--superlink", self.superlink, "--insecure", *args], "run")

    @staticmethod
    def stop(proc: subprocess.Popen, sig: int = signal.SIGTERM) -> None:
        if proc.poll() is None:
            proc.send_signal(sig)
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # its own session: the children it left behind
        except (ProcessLookupError, PermissionError):
            pass
        proc.wait()

    def close(self) -> None:
        for proc in reversed(self.procs):
            self.stop(proc)

    def logs(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text()[-3000:]}" for p in sorted(self.root.glob("*.log")))


@pytest.fixture
def federation(tmp_path, tiny_model_dir):
    """A started SuperLink with edge and hub SuperNodes serving a flora tiny plan (2 rounds)."""
    plan_path = tiny_plan(tmp_path, tiny_model_dir, rule="flora", rounds=2)
    fed = Federation(tmp_path, plan_path)
    try:
        fed.start_superlink()
        fed.start_node("edge")
        fed.start_node("hub")
        yield fed
    finally:
        fed.close()


def max_abs_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[n].delta() - b[n].delta()).abs().max()) for n in a)


def test_flower_run_matches_in_process(federation):
    """Same plan, seed and data: the same global adapter, metrics and run folder on both backends
    (flora: heterogeneous shapes stacked, each node's merged base kept in its Flower node state)."""
    with ThreadPoolExecutor(1) as pool:  # the reference runs while the Flower processes wait on polls
        in_process = pool.submit(run_plan, federation.plan_path, out=federation.root / "inprocess",
                                 eval_samples=EVAL_SAMPLES)
        lines: list[str] = []
        result = flower_app.launch(federation.plan_path, superlink=federation.superlink, insecure=True,
                                   out=federation.root / "flower", eval_samples=EVAL_SAMPLES,
                                   round_timeout=300, echo=lines.append)
        reference = in_process.result()
    assert any("fedpipe-done" in line for line in lines), federation.logs()
    assert_resident(lines, rounds=[1, 2])
    if flower_tasks.AVAILABLE:  # the messages ran in `fedpipe node`, no flwr-clientapp process per message
        for server in ("edge", "hub"):
            assert "Start `flwr-clientapp` process" not in (federation.root / f"node-{server}.log").read_text()

    diff = max_abs_diff(read_global(federation.root / "flower"), read_global(federation.root / "inprocess"))
    print(f"\nmax abs difference of the global ΔW, Flower vs in-process: {diff:.3g}")
    assert diff < 1e-5
    assert [r["round"] for r in result.rows] == [1, 2]
    for got, want in zip(result.rows, reference.rows, strict=True):
        assert got["eval"]["loss"] == pytest.approx(want["eval"]["loss"], rel=1e-5)
        assert got["missed_servers"] == want["missed_servers"] == {} and set(got) == set(want)
        for s, t in zip(got["servers"], want["servers"], strict=True):
            assert set(s) == set(t) and s["server"] == t["server"]
            assert s["upload_bytes"] == t["upload_bytes"] and s["download_bytes"] == t["download_bytes"]
            assert s["train_loss"] == pytest.approx(t["train_loss"], rel=1e-5)
    for name in ("adapter/adapter_model.safetensors", "adapter/adapter_config.json", "curves.png"):
        assert (federation.root / "flower" / name).is_file(), name
    state = json.loads((federation.root / "flower" / "checkpoint" / "state.json").read_text())
    assert state["round"] == 2 and state["rule"] == "flora"


def assert_resident(lines: list[str], rounds: list[int]) -> None:
    """Every node's reply in these rounds came from its resident trainer, whose base was loaded
    once (when `fedpipe node` started), not for the message."""
    for server in ("edge", "hub"):
        for r in rounds:
            said = [line for line in lines if f"fedpipe: round {r}: {server} trained" in line]
            assert len(said) == 1 and said[0].endswith("(resident trainer, base loaded 1x)"), lines


@pytest.mark.slow
def test_nodes_keep_their_model_across_rounds_and_runs(federation):
    """Two runs on the same SuperNodes: round 2 of each, and the second run, reuse the base each
    node loaded at its start (one load line in its log); the second run starts from the original
    base, not the first run's merges, so both give the same global adapter."""
    lines: list[str] = []
    for out in ("first", "second"):
        flower_app.launch(federation.plan_path, superlink=federation.superlink, insecure=True,
                          out=federation.root / out, eval_samples=EVAL_SAMPLES, round_timeout=300,
                          echo=lines.append)
        assert_resident(lines, rounds=[1, 2])
        lines.clear()
    assert max_abs_diff(read_global(federation.root / "first"), read_global(federation.root / "second")) == 0
    for server in ("edge", "hub"):
        log = (federation.root / f"node-{server}.log").read_text()
        assert log.count("loaded in") == 1, log[-3000:]


@pytest.mark.slow
def test_killed_node_misses_a_round_and_rejoins(federation):
    """SIGKILL a SuperNode after round 1: round 2 aggregates the other server alone and names the
    one that missed it; the restarted node rejoins in round 3 with the cumulative merged update.
    Then, with that node stopped, --min-participation 2 fails the next run with a clear message."""
    run = federation.run_cli("--rounds", "3", "--eval-samples", str(EVAL_SAMPLES), "--round-timeout", "150",
                             "--out", str(federation.root / "run"))
    metrics = federation.root / "run" / "metrics.jsonl"
    deadline = time.time() + 600
    while not read_metrics(metrics):
        assert run.poll() is None and time.time() < deadline, federation.logs()
        time.sleep(0.5)
    federation.stop(federation.nodes["edge"], signal.SIGKILL)
    federation.start_node("edge")
    assert run.wait(timeout=max(1, deadline - time.time())) == 0, federation.logs()

    rows = read_metrics(metrics)
    assert [r["round"] for r in rows] == [1, 2, 3]
    assert [s["server"] for s in rows[0]["servers"]] == ["edge", "hub"]
    assert [s["server"] for s in rows[1]["servers"]] == ["hub"]
    assert list(rows[1]["missed_servers"]) == ["edge"]
    assert [s["server"] for s in rows[2]["servers"]] == ["edge", "hub"]
    edge, hub = rows[2]["servers"]
    assert edge["download_bytes"] > hub["download_bytes"]  # rounds 1 and 2 merged, not round 2 only
    assert all(torch.isfinite(torch.tensor(r["eval"]["loss"])) for r in rows)
    assert "round 2: edge missed it" in (federation.root / "run.log").read_text()

    federation.stop(federation.nodes.pop("edge"))  # gone for good: a round cannot reach 2 replies
    run = federation.run_cli("--rounds", "1", "--eval-samples", str(EVAL_SAMPLES), "--round-timeout", "60",
                             "--min-participation", "2", "--out", str(federation.root / "quorum"))
    assert run.wait(timeout=600) == 2, federation.logs()
    log = (federation.root / "run.log").read_text()
    assert "round 1: 1 of 2 servers are reachable; --min-participation needs 2" in log, log[-3000:]


# ------------------------------------------------------------------------------ no processes
class LoopbackGrid:
    """A Grid stand-in: each node's ClientApp functions run in this process with its own node state;
    a node in `silent` never replies (as a killed one), one in `failing` answers training with an
    error (as a crashed ClientApp)."""

    def __init__(self, plan_path: Path, servers: dict[int, str], run_id: int = 1,
                 node_config: dict | None = None) -> None:
        from flwr.supercore.task_identity import TaskIdentity

        TaskIdentity.run_id = TaskIdentity.node_id = TaskIdentity.task_id = 1  # Message() reads them
        self.plan_path, self.run_id, self.node_config = plan_path, run_id, node_config or {}
        self.contexts = {}
        self.silent: set[int] = set()
        self.failing: set[int] = set()
        self.poisoned: set[int] = set()
        self.replies: dict = {}
        for node, server in servers.items():
            self.add(node, server)

    def add(self, node: int, server: str) -> None:
        from flwr.app import Context, RecordDict

        self.contexts[node] = Context(run_id=self.run_id, node_id=node, state=RecordDict(), run_config={},
                                      node_config={"server": server, "plan": str(self.plan_path)}
                                      | self.node_config.get(server, {}))

    def get_node_ids(self) -> list[int]:
        return list(self.contexts)

    def push_messages(self, messages) -> list[str]:
        """Each node answers at once; its reply waits to be pulled."""
        from flwr.app import Message
        from flwr.app.error import Error

        ids = []
        for msg in messages:
            msg.metadata.__dict__["_message_id"] = msg.object_id  # as Grid.push_messages does
            ids.append(msg.object_id)
            node = msg.metadata.dst_node_id
            if node in self.silent:
                continue
            if node in self.failing and msg.metadata.message_type == "train":
                self.replies[msg.object_id] = Message(Error(code=0, reason="ClientApp crashed"), reply_to=msg)
                continue
            handler = {"query": flower_app.identify, "train": flower_app.train}[msg.metadata.message_type]
            try:
                reply = handler(msg, self.contexts[node])
                if node in self.poisoned and msg.metadata.message_type == "train":
                    poison(reply)
            except FedpipeError as e:
                reply = Message(Error(code=0, reason=str(e)), reply_to=msg)
            self.replies[msg.object_id] = reply
        return ids

    def pull_messages(self, message_ids) -> list:
        return [self.replies.pop(i) for i in list(message_ids) if i in self.replies]


def poison(reply) -> None:
    """A node's update with one NaN among its values, its metadata intact (a broken or malicious
    node): rewritten at the safetensors level, so sparse payloads are poisoned too (at fp32 a
    payload's data starts with a float32 value, dense or sparse)."""
    from safetensors.torch import load, save

    from fedpipe import wire

    payload = flower_app.record_bytes(reply.content["update"])
    data, meta = load(payload)["data"], wire.read_metadata(payload)
    assert meta["fedpipe.precision"] == "fp32"
    data[:4] = torch.tensor([float("nan")]).view(torch.uint8)
    reply.content["update"] = flower_app.bytes_record(save({"data": data}, metadata=meta))


def settings_for(plan_path: Path, out: Path, **kw) -> object:
    return flower_app.RunSettings(plan=str(plan_path), out=str(out), plan_sha256=file_sha256(plan_path),
                                  eval_samples=EVAL_SAMPLES, round_timeout=0.1, **kw)


def test_a_missed_round_is_renormalised_and_the_node_rejoins_in_sync(tmp_path, tiny_model_dir, monkeypatch):
    """flora, 3 rounds: edge goes silent after round 1 (killed), then a new SuperNode serves it.
    Round 2 aggregates hub alone; in round 3 the new node gets the cumulative merged update (its
    base is the global model) while hub adds round 2's delta to the base in its node state."""
    import fedpipe.metrics

    plan_path = tiny_plan(tmp_path, tiny_model_dir, rule="flora", rounds=3)
    grid = LoopbackGrid(plan_path, {11: "edge", 22: "hub"})
    write_metrics = fedpipe.metrics.write_metrics

    def write_then_kill(path, rows):  # the end of a round: kill edge after 1, revive it after 2
        write_metrics(path, rows)
        if len(rows) == 1:
            grid.silent.add(11)
        elif len(rows) == 2:
            grid.add(33, "edge")

    monkeypatch.setattr(fedpipe.metrics, "write_metrics", write_then_kill)
    rows = flower_app.coordinate(grid, settings_for(plan_path, tmp_path / "run"))
    assert [[s["server"] for s in r["servers"]] for r in rows] == [["edge", "hub"], ["hub"], ["edge", "hub"]]
    assert list(rows[1]["missed_servers"]) == ["edge"] and "no reply" in rows[1]["missed_servers"]["edge"]
    edge, hub = rows[2]["servers"]
    assert edge["download_bytes"] > hub["download_bytes"]  # rounds 1 + 2 merged, not round 2 only

    from fedpipe import wire
    from fedpipe.federation.rundir import RunFolder

    _, adapters = RunFolder(tmp_path / "run").load_checkpoint()
    before_round_3 = adapters["previous"].factors  # the global model that round 3 trained on
    for node in (33, 22):
        state = grid.contexts[node].state
        assert int(state[flower_app.STATE_SYNC]["round"]) == 3
        merged = wire.decode(flower_app.record_bytes(state[flower_app.STATE_BASE]))[0]
        assert merged.keys() == before_round_3.keys()
        for name, f in merged.items():
            torch.testing.assert_close(f.delta(), before_round_3[name].delta(), atol=1e-6, rtol=1e-5)


@pytest.mark.slow
def test_resume_resyncs_the_nodes(tmp_path, tiny_model_dir):
    """A resumed flora run is a new Flower run (empty node state): every node gets the cumulative
    merged update first, and the result is the uninterrupted run's."""
    plan_path = tiny_plan(tmp_path, tiny_model_dir, rule="flora", rounds=3)
    straight = flower_app.coordinate(LoopbackGrid(plan_path, {1: "edge", 2: "hub"}),
                                     settings_for(plan_path, tmp_path / "straight"))
    flower_app.coordinate(LoopbackGrid(plan_path, {1: "edge", 2: "hub"}),
                          settings_for(plan_path, tmp_path / "resumed", rounds=2))
    resumed = flower_app.coordinate(LoopbackGrid(plan_path, {3: "edge", 4: "hub"}),
                                    settings_for(plan_path, tmp_path / "resumed", resume=True))
    assert [r["round"] for r in resumed] == [1, 2, 3]
    assert max_abs_diff(read_global(tmp_path / "resumed"), read_global(tmp_path / "straight")) < 1e-5
    assert resumed[2]["eval"]["loss"] == pytest.approx(straight[2]["eval"]["loss"], rel=1e-5)


def test_too_few_servers_fail_the_round_with_who_is_missing(tmp_path, tiny_model_dir):
    plan_path = tiny_plan(tmp_path, tiny_model_dir, rule="fedit", rounds=1)
    grid = LoopbackGrid(plan_path, {22: "hub"})
    with pytest.raises(FedpipeError, match=r"round 1: 1 of 2 servers are reachable; "
                                           r"--min-participation needs 2") as failed:
        flower_app.coordinate(grid, settings_for(plan_path, tmp_path / "a", min_participation="2"))
    assert "edge: no SuperNode online" in str(failed.value)

    grid.add(11, "edge")
    grid.failing.add(11)
    with pytest.raises(FedpipeError, match=r"round 1: 1 of 2 servers sent an update that passed the checks; --min-participation "
                                           r"needs 2") as failed:
        flower_app.coordinate(grid, settings_for(plan_path, tmp_path / "b", min_participation="1.0"))
    assert "edge: failed: ClientApp crashed" in str(failed.value)

    rows = flower_app.coordinate(grid, settings_for(plan_path, tmp_path / "c", min_participation="0.5"))
    assert [s["server"] for s in rows[0]["servers"]] == ["hub"]
    assert rows[0]["missed_servers"] == {"edge": "failed: ClientApp crashed"}


def test_a_nan_update_is_refused_and_the_run_completes_without_it(tmp_path, tiny_model_dir):
    plan_path = tiny_plan(tmp_path, tiny_model_dir, rule="flexlora", rounds=2)
    grid = LoopbackGrid(plan_path, {11: "edge", 22: "hub"})
    grid.poisoned.add(11)
    rows = flower_app.coordinate(grid, settings_for(plan_path, tmp_path / "run"))
    for row in rows:
        assert [s["server"] for s in row["servers"]] == ["hub"]
        assert row["missed_servers"]["edge"].startswith("refused: module") and "non-finite" in row[
            "missed_servers"]["edge"]
        assert row["eval"]["loss"] == row["eval"]["loss"]  # finite global model, evaluated
    assert max_abs_diff(read_global(tmp_path / "run"), read_global(tmp_path / "run")) == 0


def test_a_node_with_another_plan_is_refused(tmp_path, tiny_model_dir):
    plan_path = tiny_plan(tmp_path, tiny_model_dir, rule="fedit", rounds=1)
    other = tmp_path / "other.plan.yaml"
    other.write_text(plan_path.read_text() + "# edited\n")
    grid = LoopbackGrid(plan_path, {11: "edge", 22: "hub"})
    grid.contexts[11].node_config["plan"] = str(other)
    with pytest.raises(FedpipeError, match="needs 2") as failed:
        flower_app.coordinate(grid, settings_for(plan_path, tmp_path / "a", min_participation="2"))
    assert "edge: its plan file differs from the coordinator's" in str(failed.value)


def test_min_participation_is_a_count_or_a_fraction():
    def parse(text, n):
        return count_or_fraction("min_participation", text, n)

    assert parse("1", 4) == 1 and parse("3", 4) == 3 and parse(2, 2) == 2
    assert parse("0.5", 4) == 2 and parse("0.5", 3) == 2 and parse("1.0", 3) == 3 and parse("0.01", 5) == 1
    for bad in ("0", "5", "1.5", "-1", "half", "0.0"):
        with pytest.raises(FedpipeError, match="min_participation"):
            parse(bad, 4)


def test_supernode_command_names_its_plan_entry(tmp_path, tiny_model_dir):
    plan_path = tiny_plan(tmp_path, tiny_model_dir)
    command = flower_app.supernode_command(plan_path, "edge", "10.0.0.5:8000", port=9099,
                                           root_certificates=None)
    assert command[0].endswith("flower-supernode") and "--insecure" not in command
    config = command[command.index("--node-config") + 1]
    assert config == f'server="edge" plan="{plan_path.resolve()}" device="cpu"'
    assert command[command.index("--superlink") + 1] == "10.0.0.5:8000"
    assert command[command.index("--port") + 1] == "9099"
    ca = tmp_path / "ca.crt"
    ca.write_text("x")
    key = tmp_path / "edge.key"
    key.write_text("x")
    secure = flower_app.supernode_command(plan_path, "edge", "h:1", root_certificates=ca, auth_key=key)
    assert secure[secure.index("--root-certificates") + 1] == str(ca.resolve())
    assert secure[secure.index("--auth-supernode-private-key") + 1] == str(key.resolve())
    with pytest.raises(FedpipeError, match="not in the plan"):
        flower_app.supernode_command(plan_path, "nobody", "h:1")
    with pytest.raises(FedpipeError, match="needs TLS"):
        flower_app.supernode_command(plan_path, "edge", "h:1", insecure=True, auth_key=key)
    with pytest.raises(FedpipeError, match="exclude each other"):
        flower_app.supernode_command(plan_path, "edge", "h:1", insecure=True, root_certificates=ca)


def test_app_config_round_trips(tmp_path):
    import tomllib

    settings = flower_app.RunSettings(plan="/p/a b.yaml", out="/r", plan_sha256="ab", rounds=3,
                                      round_timeout=12.5, min_participation="0.5", resume=True,
                                      accuracy_every=2)
    folder = flower_app.write_app(tmp_path / "app", settings)
    config = tomllib.loads((folder / "pyproject.toml").read_text())
    assert config["tool"]["flwr"]["app"]["components"]["serverapp"] == "fedpipe.flower_app:server_app"
    assert flower_app.RunSettings.from_config(config["tool"]["flwr"]["app"]["config"]) == settings


def test_cli_rejects_unknown_backend_and_server(tmp_path, tiny_model_dir):
    plan_path = tiny_plan(tmp_path, tiny_model_dir)
    runner = CliRunner()
    result = runner.invoke(app, ["run", str(plan_path), "--backend", "ray"])
    assert result.exit_code == 2 and "not a backend" in result.output
    result = runner.invoke(app, ["node", str(plan_path), "--server", "nobody", "--insecure"])
    assert result.exit_code == 2 and "not in the plan" in result.output


def test_missing_flwr_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "flwr.app", None)  # makes `import flwr.app` fail
    monkeypatch.delitem(sys.modules, "fedpipe.flower_app")
    with pytest.raises(FedpipeError, match=r"pip install 'fedpipe\[flower\]'"):
        import fedpipe.flower_app  # noqa: F401
