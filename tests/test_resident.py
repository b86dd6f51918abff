"""Resident trainers behind the real node channel, driven by the Flower round loop in this process
(no Flower processes: `test_flower` runs those)."""

from __future__ import annotations

import threading
from contextlib import contextmanager
from pathlib import Path

import pytest
from test_flower import EVAL_SAMPLES, LoopbackGrid, flower_app, max_abs_diff, settings_for
from test_run import read_global, tiny_plan

from fedpipe.digest import file_sha256
from fedpipe.federation.inprocess import run_plan
from fedpipe.relay import NodeFolder, serve
from fedpipe.resident import NodeTrainer, handler


@contextmanager
def resident_trainers(plan_path: Path):
    """A resident trainer per server of the tiny plan, each serving its own node folder: the
    trainers and the node config that points a LoopbackGrid's nodes at them."""
    trainers, folders = {}, {}
    try:
        for server in ("edge", "hub"):
            trainers[server] = NodeTrainer(server, plan_path, "cpu")
            folders[server] = NodeFolder.create()
            ready = threading.Event()
            threading.Thread(target=serve, args=(folders[server], handler(trainers[server]), ready),
                             daemon=True).start()
            assert ready.wait(10)
        yield trainers, {s: {"resident": str(f.path)} for s, f in folders.items()}
    finally:
        for folder in folders.values():
            folder.remove()


@pytest.fixture
def residents(tmp_path, tiny_model_dir):
    """A flora tiny plan and its resident trainers."""
    plan_path = tiny_plan(tmp_path, tiny_model_dir, rule="flora", rounds=2)
    with resident_trainers(plan_path) as (trainers, node_config):
        yield plan_path, trainers, node_config


def test_rounds_and_runs_reuse_the_loaded_base_and_match_in_process(tmp_path, residents):
    """Two Flower runs on the same resident trainers: each equals the in-process run (the second
    starts from the original base, not the first run's merges), and the base was loaded once."""
    plan_path, trainers, node_config = residents
    reference = run_plan(plan_path, out=tmp_path / "inprocess", eval_samples=EVAL_SAMPLES)
    for run_id in (1, 2):
        grid = LoopbackGrid(plan_path, {11: "edge", 22: "hub"}, run_id=run_id, node_config=node_config)
        rows = flower_app.coordinate(grid, settings_for(plan_path, tmp_path / f"run{run_id}"))
        assert max_abs_diff(read_global(tmp_path / f"run{run_id}"), read_global(tmp_path / "inprocess")) < 1e-5
        assert [r["eval"]["loss"] for r in rows] == pytest.approx([r["eval"]["loss"] for r in reference.rows],
                                                                  rel=1e-5)
        for context in grid.contexts.values():  # the trainer holds the merged base, the node state not
            assert flower_app.STATE_BASE not in context.state
    assert {s: t.loads for s, t in trainers.items()} == {"edge": 1, "hub": 1}


def test_a_failed_message_leaves_the_trainer_usable(tmp_path, residents):
    plan_path, trainers, node_config = residents
    handle = handler(trainers["edge"])
    reply, update = handle({"run_id": 1, "config": {"server": "edge", "plan_sha256": "0" * 64, "round": 1,
                                                    "local_steps": 1, "eval_samples": EVAL_SAMPLES}}, b"")
    assert "differs from the coordinator's plan" in reply["error"] and update == b""
    reply, _ = handle({"run_id": 1, "config": {"server": "hub", "plan_sha256": "0" * 64}}, b"")
    assert "serves 'edge', but was sent 'hub'" in reply["error"]
    config = {"server": "edge", "plan_sha256": file_sha256(plan_path), "round": 1, "local_steps": 1,
              "eval_samples": EVAL_SAMPLES, "rule": "fedit"}  # no "rounds": the round's rate is unknown
    reply, _ = handle({"run_id": 1, "config": config}, b"")
    assert "config field 'rounds'" in reply["error"] and "whole number >= 1, got None" in reply["error"]
    grid = LoopbackGrid(plan_path, {11: "edge", 22: "hub"}, node_config=node_config)
    rows = flower_app.coordinate(grid, settings_for(plan_path, tmp_path / "run"))
    assert [[s["server"] for s in r["servers"]] for r in rows] == [["edge", "hub"], ["edge", "hub"]]
    assert trainers["edge"].loads == 1

    plan_path.write_text(plan_path.read_text() + "# re-planned\n")  # the coordinator's new plan, copied
    grid = LoopbackGrid(plan_path, {11: "edge", 22: "hub"}, run_id=2, node_config=node_config)
    rows = flower_app.coordinate(grid, settings_for(plan_path, tmp_path / "replanned"))
    assert [[s["server"] for s in r["servers"]] for r in rows] == [["edge", "hub"], ["edge", "hub"]]
    assert trainers["edge"].loads == 2


def test_a_node_whose_trainer_is_gone_loads_the_model_itself(tmp_path, tiny_model_dir):
    plan_path = tiny_plan(tmp_path, tiny_model_dir, rule="fedit", rounds=1)
    gone = {s: {"resident": str(tmp_path / f"stopped-{s}")} for s in ("edge", "hub")}
    grid = LoopbackGrid(plan_path, {11: "edge", 22: "hub"}, node_config=gone)
    rows = flower_app.coordinate(grid, settings_for(plan_path, tmp_path / "run"))
    assert [s["server"] for s in rows[0]["servers"]] == ["edge", "hub"]


def test_upload_error_feedback_works_on_a_resident_trainer(tmp_path, tiny_model_dir):
    """fedit with nf4 uploads, 3 rounds: what rounding drops is carried into the next upload on
    the resident trainer as in process (the same global adapter), and a node that loads per
    message, which cannot carry it, ends elsewhere."""
    from fedpipe.plan import load_plan, save_plan

    plan = load_plan(tiny_plan(tmp_path, tiny_model_dir, rule="fedit", rounds=3))
    # dense downloads: a node that loads per message holds no broadcast to take a lossy one against
    plan_path = save_plan(plan.model_copy(update={"servers": [
        s.model_copy(update={"upload_precision": "nf4", "download_density": 1.0}) for s in plan.servers]}),
        tmp_path / "nf4.plan.yaml")
    run_plan(plan_path, out=tmp_path / "inprocess", eval_samples=EVAL_SAMPLES)
    with resident_trainers(plan_path) as (_, node_config):
        flower_app.coordinate(LoopbackGrid(plan_path, {11: "edge", 22: "hub"}, node_config=node_config),
                              settings_for(plan_path, tmp_path / "resident"))
    flower_app.coordinate(LoopbackGrid(plan_path, {11: "edge", 22: "hub"}),
                          settings_for(plan_path, tmp_path / "per-message"))
    want = read_global(tmp_path / "inprocess")
    assert max_abs_diff(read_global(tmp_path / "resident"), want) < 1e-6
    assert max_abs_diff(read_global(tmp_path / "per-message"), want) > 1e-4
