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


def test_a_plan_records_and_shows_how_its_matrices_were_selected(tmp_path):
    raw = yaml.safe_load((DATA / "small.yaml").read_text())
    raw["candidates"]["selection"] = "spread"
    out = tmp_path / "spread.plan.yaml"
    assert runner.invoke(app, ["plan", str(_write(tmp_path, raw)), "-o", str(out)]).exit_code == 0
    assert load_plan(out).selection == "spread"
    shown = runner.invoke(app, ["show", str(out)])
    assert shown.exit_code == 0 and "selection spread" in shown.output


def test_show_diff_and_explain_print_the_wire_precision(tmp_path):
    """The edge's 10 Mbit/s uplink sets the round: with the default precision ladder it sends
    int8 instead of fp32, and show, diff and explain say so beside the density."""
    raw = yaml.safe_load((DATA / "small.yaml").read_text())
    raw["candidates"]["precisions"] = ["fp32"]
    a, b = tmp_path / "a.plan.yaml", tmp_path / "b.plan.yaml"
    assert runner.invoke(app, ["plan", str(_write(tmp_path, raw)), "-o", str(a)]).exit_code == 0
    assert runner.invoke(app, ["plan", str(DATA / "small.yaml"), "-o", str(b)]).exit_code == 0
    edge = load_plan(b).server("edge")
    assert edge.upload_precision == edge.download_precision != "fp32"
    shown = runner.invoke(app, ["show", str(b)])
    assert shown.exit_code == 0 and "precision" in shown.output and edge.upload_precision in shown.output
    table = runner.invoke(app, ["diff", str(a), str(b)])
    assert table.exit_code == 0 and f"fp32 → {edge.upload_precision}" in table.output
    data = json.loads(runner.invoke(app, ["diff", str(a), str(b), "--json"]).output)
    diff = next(s for s in data["servers"] if s["name"] == "edge")
    assert diff["upload_precision"] == diff["download_precision"] == ["fp32", edge.upload_precision]
    why = runner.invoke(app, ["explain", str(b), "--server", "edge"])
    assert why.exit_code == 0 and f"wire {edge.upload_precision}" in why.output
    assert f"(now {edge.upload_precision})" in why.output  # the next wider precision, priced


def test_diff_rejects_non_plan(tmp_path):
    bad = _write(tmp_path, {"schema_version": 1, "profile": {}, "servers": [{"name": "phone"}]})
    result = runner.invoke(app, ["diff", str(bad), str(bad)])
    assert result.exit_code == 2 and "not a valid fedpipe plan" in result.output
    assert "servers[0] (server 'phone').members: Field required" in result.output  # one path style


def test_wrong_kind_of_file_is_one_line_with_the_command(tmp_path):
    plan_file = tmp_path / "small.plan.yaml"
    assert runner.invoke(app, ["plan", str(DATA / "small.yaml"), "-o", str(plan_file)]).exit_code == 0
    for command in (["plan", str(plan_file)], ["run", str(DATA / "small.yaml")],
                    ["show", str(DATA / "small.yaml")], ["plan", str(DATA)]):
        result = subprocess.run([sys.executable, "-m", "fedpipe.cli", *command], capture_output=True,
                                text=True)
        assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
        assert len(result.stderr.strip().splitlines()) <= 2, result.stderr
        assert not result.stderr.startswith("\n")
    assert f"is a plan, not a profile: run it with `fedpipe run {plan_file}`" in \
        runner.invoke(app, ["plan", str(plan_file)]).output
    assert f"is a profile, not a plan: make its plan with `fedpipe plan {DATA / 'small.yaml'}`" in \
        runner.invoke(app, ["run", str(DATA / "small.yaml")]).output
    assert f"{DATA.absolute()} is a folder, not a profile file" in runner.invoke(app, ["plan", str(DATA)]).output
    assert f"no such file {(tmp_path / 'nope.yaml').absolute()}" in \
        runner.invoke(app, ["plan", str(tmp_path / "nope.yaml")]).output


def test_version():
    from fedpipe import __version__

    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0 and result.output.strip() == f"fedpipe {__version__}"


def _lab(folder: Path, records: int, **task) -> Path:
    """A profile in its own folder whose data file sits beside it, named relatively."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = [{"prompt": f"add {i} and 1", "answer": str(i + 1)} for i in range(records)]
    (folder / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    raw = yaml.safe_load((DATA / "small.yaml").read_text())
    raw["name"] = "lab"
    raw["task"] |= {"dataset": "data.jsonl", **task}
    raw["servers"][0]["samples"], raw["servers"][1]["samples"] = 200, 400
    (folder / "lab.yaml").write_text(yaml.safe_dump(raw))
    return folder / "lab.yaml"


def test_paths_resolve_against_the_profile_and_the_plan(tmp_path, monkeypatch):
    _lab(tmp_path / "lab", 700, eval_samples=50)
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    result = runner.invoke(app, ["importance", "../lab/lab.yaml", "--scorer", "prior", "-o", "rep.yaml"])
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["plan", "../lab/lab.yaml", "-o", "plans/lab.plan.yaml",
                                 "--importance", "rep.yaml"])
    assert result.exit_code == 0, result.output
    raw = yaml.safe_load(Path("plans/lab.plan.yaml").read_text())
    assert raw["profile"]["path"] == "../../lab/lab.yaml"  # relative to the plan file
    assert raw["importance"]["source"] == "../rep.yaml"
    assert raw["task"]["dataset"] == "../../lab/data.jsonl" and raw["model"] == "smollm2-135m"
    plan = load_plan("plans/lab.plan.yaml")
    assert plan.task.dataset == str(tmp_path / "lab" / "data.jsonl")
    monkeypatch.chdir(tmp_path)  # another working folder: the plan still finds its profile
    result = runner.invoke(app, ["explain", "elsewhere/plans/lab.plan.yaml", "--server", "hub"])
    assert result.exit_code == 0, result.output
    # a data file that is not there is named by the full path tried (the profile's folder)
    raw = yaml.safe_load((tmp_path / "lab" / "lab.yaml").read_text())
    raw["task"]["dataset"] = "gone.jsonl"
    (tmp_path / "lab" / "gone.yaml").write_text(yaml.safe_dump(raw))
    result = runner.invoke(app, ["plan", "lab/gone.yaml", "-o", "x.plan.yaml"])
    assert result.exit_code == 2 and f"data file {tmp_path / 'lab' / 'gone.jsonl'} not found" in result.output


def test_plan_checks_the_data_size_with_numbers(tmp_path):
    out = str(tmp_path / "lab.plan.yaml")
    result = runner.invoke(app, ["plan", str(_lab(tmp_path / "a", 30, eval_samples=250)), "-o", out])
    assert result.exit_code == 2 and "30 records, but task.eval_samples holds out 250" in result.output
    result = runner.invoke(app, ["plan", str(_lab(tmp_path / "b", 30, eval_samples=10)), "-o", out])
    assert result.exit_code == 2 and not Path(out).exists()
    assert "30 records, 10 held out (task.eval_samples) leave 20 for training, but the servers ask " \
           "for 600 samples (hub 400, edge 200)" in result.output
    assert "task.reuse_samples: true" in result.output
    lab = _lab(tmp_path / "c", 30, eval_samples=10, reuse_samples=True)
    result = subprocess.run([sys.executable, "-m", "fedpipe.cli", "plan", str(lab), "-o", out],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "warning:" in result.stderr and "used about 30.0 times" in result.stderr
    assert Path(out).is_file()


def test_diff_of_plans_with_different_servers_shows_both_sides(tmp_path):
    raw = yaml.safe_load((DATA / "small.yaml").read_text())
    raw["servers"][1]["name"] = "gateway"
    a, b = tmp_path / "a.plan.yaml", tmp_path / "b.plan.yaml"
    assert runner.invoke(app, ["plan", str(DATA / "small.yaml"), "-o", str(a)]).exit_code == 0
    assert runner.invoke(app, ["plan", str(_write(tmp_path, raw)), "-o", str(b)]).exit_code == 0
    data = json.loads(runner.invoke(app, ["diff", str(a), str(b), "--json"]).output)
    by = {s["name"]: s for s in data["servers"]}
    assert by["hub"]["status"] == "removed" and by["hub"]["bits"][0] in (4, 16) and by["hub"]["bits"][1] is None
    assert by["gateway"]["status"] == "added" and by["gateway"]["matrices_added"]
    table = runner.invoke(app, ["diff", str(a), str(b)]).output
    row = next(line for line in table.splitlines() if "gateway" in line)
    assert "- → " in row and "GiB" not in row  # a filled row: nothing → its configuration


def test_explain_prints_no_negative_zeros():
    result = runner.invoke(app, ["explain", str(Path(__file__).parent.parent / "plans" / "fleet-128.plan.yaml")])
    assert result.exit_code == 0, result.output
    assert "-0.000" not in result.output and "by -" not in result.output


ROOT = Path(__file__).parent.parent


def _ignored(path: str) -> bool:
    return subprocess.run(["git", "check-ignore", "-q", path], cwd=ROOT).returncode == 0


def test_readme_commands_leave_a_clone_clean():
    """Every README command that writes a file writes it where git ignores it."""
    readme = (ROOT / "README.md").read_text()
    commands = [line for block in readme.split("```")[1::2] for line in block.splitlines()
                if "fedpipe " in line and not line.lstrip().startswith("#")]
    writes = 0
    for line in commands:
        for part in line.split("&&"):
            words = part.split("#")[0].split()
            words = words[1:] if words[:1] == ["$"] else words
            if words[:1] != ["fedpipe"]:  # not a command (the pipeline diagram, pip, python)
                continue
            command = words[1]
            for flag in ("-o", "--png", "--out"):
                if flag in words:
                    writes += 1
                    assert _ignored(words[words.index(flag) + 1]), part
            if command == "plan" and "-o" not in words and (ROOT / words[2]).is_file():
                raise AssertionError(f"writes the committed plan: {part}")
    assert writes >= 4


def test_quickstart_plan_is_heterogeneous(tmp_path):
    """README command 1's plan: unlike servers get unlike configurations."""
    out = tmp_path / "quickstart.plan.yaml"
    result = runner.invoke(app, ["plan", str(ROOT / "profiles" / "quickstart.yaml"), "-o", str(out)])
    assert result.exit_code == 0, result.output
    plan = load_plan(out)
    assert sorted(s.bits for s in plan.servers) == [4, 16, 16] and plan.task.rounds >= 2
    assert len({(s.bits, s.batch_size, s.upload_density) for s in plan.servers}) >= 2


def test_run_can_check_the_plan_data_before_loading_models(tmp_path):
    """`check_plan_data` is what `fedpipe run` calls before loading a model (with --eval-samples)."""
    from fedpipe.datasize import check_plan_data
    from fedpipe.errors import FedpipeError

    out = tmp_path / "lab.plan.yaml"
    lab = _lab(tmp_path / "c", 30, eval_samples=10, reuse_samples=True)
    assert runner.invoke(app, ["plan", str(lab), "-o", str(out)]).exit_code == 0
    assert "leave 20 for training" in check_plan_data(load_plan(out))
    try:
        check_plan_data(load_plan(out), eval_samples=40)
    except FedpipeError as e:
        assert "30 records, but --eval-samples holds out 40: valid is at most 29" in str(e)
    else:
        raise AssertionError("40 held out of 30 records passed")
