"""`fedpipe run`: a real plan executed end to end on a tiny model (and one round on SmolLM2)."""

import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from peft import PeftModel
from rich.console import Console

from fedpipe import client, wire
from fedpipe.errors import FedpipeError
from fedpipe.federation.inprocess import run_plan
from fedpipe.models import apply_base_delta, load_base
from fedpipe.plan import load_plan, save_plan
from fedpipe.planning.strategies import make_plan
from fedpipe.render import run_table

WIRE_HEADER_SLACK = 64 * 1024  # safetensors header and layout JSON on top of the values


def tiny_plan(tmp_path: Path, model_dir: Path, rule: str = "flexlora", rounds: int = 2,
              lr_schedule: str = "constant") -> Path:
    """Plan the tiny model for two servers, then pin them to different bits and ranks. Values
    travel at fp32 (the planner's choice of density only); test_planned_precision_runs covers a
    planned precision."""
    profile = {
        "name": "tiny", "model": str(model_dir), "aggregation": rule,
        "task": {"seq_len": 48, "local_steps": 2, "rounds": rounds, "eval_samples": 12,
                 "learning_rate": 1e-3, "lr_schedule": lr_schedule},
        "candidates": {"ranks": [0, 2, 8], "bits": [4, 16], "batch_sizes": [2], "precisions": ["fp32"]},
        "calibration": {"runtime_overhead_gib": 0.0},
        "servers": [
            {"name": "edge", "memory_gib": 1, "tflops": 1, "uplink_mbps": 10, "downlink_mbps": 10,
             "samples": 16, "device": "cpu", "bits": [4]},
            {"name": "hub", "memory_gib": 4, "tflops": 10, "uplink_mbps": 100, "downlink_mbps": 100,
             "samples": 32, "device": "cpu", "bits": [16]},
        ],
    }
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(profile))
    plan = make_plan(tmp_path / "tiny.yaml")
    edge, hub = plan.servers
    names = list(hub.rank_pattern) or [f"model.layers.{i}.self_attn.q_proj" for i in range(2)]
    edge = edge.model_copy(update={"rank_pattern": {n: 2 for n in names if "attn" in n}})
    hub = hub.model_copy(update={"rank_pattern": {n: 8 for n in names}})
    return save_plan(plan.model_copy(update={"servers": [edge, hub]}), tmp_path / "tiny.plan.yaml")


def test_a_cosine_schedule_sets_what_every_server_trains_at(tmp_path, tiny_model_dir, monkeypatch):
    # Prepare: a 3-round fedit plan under cosine (peak 1e-3), and a record of every rate trained at.
    plan_path = tiny_plan(tmp_path, tiny_model_dir, rule="fedit", rounds=3, lr_schedule="cosine")
    used, train_steps = [], client.train_steps

    def recording(model, batches, steps, lr, **kwargs):
        used.append(lr)
        return train_steps(model, batches, steps, lr, **kwargs)

    monkeypatch.setattr(client, "train_steps", recording)
    # Execute
    result = run_plan(plan_path, out=tmp_path / "run", eval_samples=4)
    # Assert: the peak, halfway to the floor, the floor (a tenth), for both servers; the rows say so.
    expected = [1e-3, 0.55e-3, 1e-4]
    assert used == pytest.approx([lr for lr in expected for _ in ("edge", "hub")])
    assert [row["learning_rate"] for row in result.rows] == pytest.approx(expected)
    screen = Console(record=True, width=200, file=io.StringIO())
    screen.print(run_table(result))  # and the run's table shows the rate each round trained at
    shown = screen.export_text()
    assert "learning rate" in shown and "0.00055" in shown and "0.0001" in shown
    # and a resume may not stretch the schedule over more rounds than it was run with
    with pytest.raises(FedpipeError) as refused:
        run_plan(plan_path, out=tmp_path / "run", eval_samples=4, rounds=4, resume=True)
    assert "lr_rounds: the run has 3, now 4" in str(refused.value.problems)


def read_global(run_dir: Path) -> dict:
    state = json.loads((run_dir / "checkpoint" / "state.json").read_text())
    return wire.decode((run_dir / "checkpoint" / state["files"]["global"]).read_bytes())[0]


def test_tiny_run_end_to_end(tmp_path, tiny_model_dir):
    plan_path = tiny_plan(tmp_path, tiny_model_dir)
    plan = load_plan(plan_path)
    assert {s.bits for s in plan.servers} == {4, 16}
    assert {max(s.rank_pattern.values()) for s in plan.servers} == {2, 8}

    result = run_plan(plan_path, out=tmp_path / "run")

    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [1, 2] and rows == result.rows
    for r in rows:
        assert r["eval"]["loss"] > 0 and 0 <= r["eval"]["accuracy"] <= 1 and r["eval"]["per_family"]
        for s in r["servers"]:  # bytes are counted on the payload: values plus a header
            assert s["predicted_upload_bytes"] <= s["upload_bytes"] <= s["predicted_upload_bytes"] + WIRE_HEADER_SLACK
            assert s["memory_gib"] > 0 and s["train_s"] > 0
    assert (tmp_path / "run" / "curves.png").stat().st_size > 1000

    # the saved peft adapter is the global model: base + ΔW
    global_factors = read_global(tmp_path / "run")
    reference = load_base(tiny_model_dir, 16)
    apply_base_delta(reference, tiny_model_dir, global_factors)
    peft_model = PeftModel.from_pretrained(load_base(tiny_model_dir, 16), tmp_path / "run" / "adapter")
    ids = torch.randint(0, 1000, (2, 12))
    with torch.no_grad():
        expected, got = reference(ids).logits, peft_model(ids).logits
        assert torch.allclose(got, expected, atol=1e-4, rtol=1e-4)
        merged = peft_model.merge_and_unload()(ids).logits
        assert torch.allclose(merged, expected, atol=1e-4, rtol=1e-4)


def test_planned_precision_runs(tmp_path, tiny_model_dir):
    """The planner's own (density, precision) choice, run as planned: the 10 Mbit/s edge sends
    lossy values, and every upload counted on its payload is the predicted bytes plus a header of
    under 1 KiB per matrix."""
    tiny_plan(tmp_path, tiny_model_dir, rule="fedit", rounds=2)
    profile = yaml.safe_load((tmp_path / "tiny.yaml").read_text())
    del profile["candidates"]["precisions"]  # the default ladder
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(profile))
    plan = make_plan(tmp_path / "tiny.yaml")
    assert plan.server("edge").upload_precision in ("int8", "nf4")  # lossy: 10 Mbit/s binds
    result = run_plan(save_plan(plan, tmp_path / "tiny.plan.yaml"), out=tmp_path / "run")
    for row in result.rows:
        assert torch.isfinite(torch.tensor(row["eval"]["loss"]))
        for s in row["servers"]:
            matrices = len(plan.server(s["server"]).rank_pattern)
            assert 0 <= s["upload_bytes"] - s["predicted_upload_bytes"] <= 1024 * matrices, s


@pytest.mark.parametrize("rule", ["fedit", "hetlora", "flora"])
def test_every_rule_runs(tmp_path, tiny_model_dir, rule):
    plan_path = tiny_plan(tmp_path, tiny_model_dir, rule=rule)
    result = run_plan(plan_path, out=tmp_path / "run", rounds=2)
    assert [r["rule"] for r in result.rows] == [rule, rule]
    assert all(torch.isfinite(torch.tensor(r["eval"]["loss"])) for r in result.rows)
    if rule == "flora":  # every server downloads the stack of all adapters
        downs = {s["download_bytes"] for s in result.rows[1]["servers"]}
        assert len(downs) == 1 and downs.pop() > max(s["upload_bytes"] for s in result.rows[1]["servers"])


def test_a_sampled_flora_run_trains_its_cohort_and_catches_up(tmp_path, tiny_model_dir):
    """`--cohort 1` of two servers: each round trains the one drawn (the same draw for a rerun), the
    other is neither missed nor idle, and one that sat out downloads what it missed."""
    from typer.testing import CliRunner

    from fedpipe.cli import app
    from fedpipe.cohort import draw_cohort

    plan_path = tiny_plan(tmp_path, tiny_model_dir, rule="flora", rounds=4)
    result = CliRunner().invoke(app, ["run", str(plan_path), "--out", str(tmp_path / "run"), "--cohort", "1",
                                      "--local-steps", "1", "--eval-samples", "4"])
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    members = [(m, e.name) for m, e in load_plan(plan_path).training_members()]
    for r in rows:
        assert r["cohort"] == draw_cohort(members, r["round"], seed=0, size=1)
        assert [s["server"] for s in r["servers"]] == r["cohort"] and not r["missed_servers"]
    trained = [r["cohort"][0] for r in rows]
    assert len(set(trained)) == 2, trained  # this seed's draw has both, so one returns after a gap
    downs = [r["servers"][0]["download_bytes"] for r in rows]
    assert all(d > 0 for d in downs[1:])


def test_a_server_past_the_round_deadline_misses_it(tmp_path, tiny_model_dir):
    """In-process the deadline is judged on each server's measured training time, and the plan's
    predicted round time is shown beside it."""
    from fedpipe.errors import FedpipeError

    plan_path = tiny_plan(tmp_path, tiny_model_dir, rounds=1)
    with pytest.raises(FedpipeError, match="0 of 2 servers sent an update") as failed:
        run_plan(plan_path, out=tmp_path / "run", round_timeout=1e-6, local_steps=1, eval_samples=4)
    assert all("past the 1e-06s round deadline" in d and "the plan predicted" in d for d in failed.value.problems)


def test_existing_run_is_not_overwritten(tmp_path, tiny_model_dir):
    from fedpipe.errors import FedpipeError

    plan_path = tiny_plan(tmp_path, tiny_model_dir, rounds=1)
    run_plan(plan_path, out=tmp_path / "run")
    with pytest.raises(FedpipeError, match="--resume"):
        run_plan(plan_path, out=tmp_path / "run")


def test_resume_after_kill_matches_uninterrupted(tmp_path, tiny_model_dir):
    plan_path = tiny_plan(tmp_path, tiny_model_dir, rule="flora", rounds=3)
    killed = tmp_path / "killed"
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([sys.executable, "-m", "fedpipe.cli", "run", str(plan_path), "--out", str(killed)],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    state = killed / "checkpoint" / "state.json"
    deadline = time.time() + 600
    while time.time() < deadline and not (state.is_file() and json.loads(state.read_text())["round"] >= 1):
        assert proc.poll() is None, "the run ended before it could be killed"
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert json.loads(state.read_text())["round"] < 3, "killed too late to test resuming"

    resumed = run_plan(plan_path, out=killed, resume=True)
    assert [r["round"] for r in resumed.rows] == [1, 2, 3]
    straight = run_plan(plan_path, out=tmp_path / "straight")
    a, b = read_global(killed), read_global(tmp_path / "straight")
    assert a.keys() == b.keys()
    for name in a:
        assert torch.allclose(a[name].delta(), b[name].delta(), atol=1e-6, rtol=1e-5)
    assert resumed.rows[-1]["eval"]["loss"] == pytest.approx(straight.rows[-1]["eval"]["loss"], rel=1e-5)


def test_one_round_on_the_bundled_model(tmp_path, bundled_model_dir):
    """SmolLM2-135M for real: a 4-bit and a 16-bit server, one short round."""
    profile = yaml.safe_load((Path(__file__).parent / "data" / "small.yaml").read_text())
    profile["task"].update(rounds=1, local_steps=2, eval_samples=8)
    profile["servers"][0].update(bits=[4], memory_gib=1.5)  # its ranks are pinned below
    profile["servers"][1]["bits"] = [16]
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(profile))
    plan = make_plan(tmp_path / "p.yaml")
    edge, hub = plan.servers
    edge = edge.model_copy(update={"rank_pattern": {n: 4 for n in hub.rank_pattern if "q_proj" in n}})
    plan_path = save_plan(plan.model_copy(update={"servers": [edge, hub]}), tmp_path / "p.plan.yaml")
    result = run_plan(plan_path, out=tmp_path / "run")
    row = result.rows[0]
    assert {s["bits"] for s in row["servers"]} == {4, 16}
    assert 0 < row["eval"]["loss"] < 20
    assert (tmp_path / "run" / "adapter" / "adapter_model.safetensors").is_file()
