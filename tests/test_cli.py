"""The command line as a user meets it: files written, tables printed, bad input -> exit 2, no traceback."""

import json
import subprocess
import sys
from pathlib import Path

import yaml
from typer.testing import CliRunner

from fedpipe.cli import app
from fedpipe.plan import load_plan

DATA = Path(__file__).parent / "data"
runner = CliRunner()


def test_plan_writes_file_and_prints_table(tmp_path):
    out = tmp_path / "small.plan.yaml"
    result = runner.invoke(app, ["plan", str(DATA / "small.yaml"), "-o", str(out)])
    assert result.exit_code == 0, result.output
    for word in ("edge", "hub", "makespan", "status", "gap", "solve time", "homogeneous baseline"):
        assert word in result.output
    plan = load_plan(out)
    assert {s.name for s in plan.servers} == {"edge", "hub"}


def test_plan_default_output_is_plans_dir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(app, ["plan", str(DATA / "small.yaml")])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "plans" / "small.plan.yaml").is_file()


def _write(tmp_path, raw) -> Path:
    path = tmp_path / "bad.yaml"
    path.write_text(raw if isinstance(raw, str) else yaml.safe_dump(raw))
    return path


def test_bad_profile_exit_2_names_field_writes_nothing(tmp_path):
    raw = yaml.safe_load((DATA / "small.yaml").read_text())
    raw["servers"][1]["memory_gib"] = -4
    out = tmp_path / "out.plan.yaml"
    result = subprocess.run([sys.executable, "-m", "fedpipe.cli", "plan", str(_write(tmp_path, raw)),
                             "-o", str(out)], capture_output=True, text=True)
    assert result.returncode == 2
    assert "servers[1] (server 'hub').memory_gib" in result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    assert not out.exists() and not list(tmp_path.glob(".out*"))


def test_infeasible_profile_names_servers_and_gib(tmp_path):
    raw = yaml.safe_load((DATA / "small.yaml").read_text())
    raw["servers"][0]["memory_gib"] = 0.05
    result = runner.invoke(app, ["plan", str(_write(tmp_path, raw)), "-o", str(tmp_path / "x.yaml")])
    assert result.exit_code == 2
    assert "server edge" in result.output and "short by" in result.output
    assert not (tmp_path / "x.yaml").exists()


def test_missing_profile_and_unknown_solver(tmp_path):
    assert runner.invoke(app, ["plan", str(tmp_path / "nope.yaml")]).exit_code == 2
    result = runner.invoke(app, ["plan", str(DATA / "small.yaml"), "--solver", "gurobi",
                                 "-o", str(tmp_path / "x.yaml")])
    assert result.exit_code == 2 and "valid: highs, cbc" in result.output


def test_diff_between_budgets_table_and_json(tmp_path):
    raw = yaml.safe_load((DATA / "small.yaml").read_text())
    a, b = tmp_path / "a.plan.yaml", tmp_path / "b.plan.yaml"
    assert runner.invoke(app, ["plan", str(DATA / "small.yaml"), "-o", str(a)]).exit_code == 0
    raw["servers"][1]["memory_gib"] = 0.9  # the hub loses most of its memory
    half = _write(tmp_path, raw)
    result = runner.invoke(app, ["plan", str(half), "-o", str(b)])
    assert result.exit_code == 0, result.output
    table = runner.invoke(app, ["diff", str(a), str(b)])
    assert table.exit_code == 0 and "edge" in table.output and "makespan" in table.output
    data = json.loads(runner.invoke(app, ["diff", str(a), str(b), "--json"]).output)
    hub = next(s for s in data["servers"] if s["name"] == "hub")
    assert hub["status"] == "changed" and hub["memory_gib"][1] <= 0.9 + 1e-9
    assert set(data) >= {"makespan_s", "quality", "upload_bytes", "download_bytes"}


def test_diff_rejects_non_plan(tmp_path):
    result = runner.invoke(app, ["diff", str(DATA / "small.yaml"), str(DATA / "small.yaml")])
    assert result.exit_code == 2 and "not a valid fedpipe plan" in result.output
