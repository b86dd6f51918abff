"""Resume and checkpoints through the CLI: another run's settings, a finished run, corrupt files,
and arguments refused before any model loads."""

import json

import pytest
from test_run import tiny_plan
from typer.testing import CliRunner

import fedpipe.federation.loop as loop
from fedpipe.cli import app

runner = CliRunner()


@pytest.fixture(scope="module")
def finished(tmp_path_factory, tiny_model_dir):
    """A 1-round fedit run of the tiny plan, made once."""
    root = tmp_path_factory.mktemp("resume")
    plan_path = tiny_plan(root, tiny_model_dir, rule="fedit", rounds=1)
    result = runner.invoke(app, ["run", str(plan_path), "--out", str(root / "run"), "--eval-samples", "4"])
    assert result.exit_code == 0, result.output
    return plan_path, root / "run"


def run(*args: str):
    return runner.invoke(app, ["run", *map(str, args)])


def test_resuming_with_other_settings_names_each_difference(finished):
    plan_path, out = finished
    result = run(plan_path, "--out", out, "--resume", "--eval-samples", "4", "--local-steps", "5",
                 "--aggregation", "hetlora", "--cohort", "1")
    assert result.exit_code == 2
    assert "was run with other settings" in result.output
    assert "cohort: the run has None, now 1" in result.output
    assert "local_steps: the run has 2, now 5" in result.output and "rule: the run has fedit" in result.output


def test_resuming_a_finished_run_says_it_is_complete(finished):
    plan_path, out = finished
    result = run(plan_path, "--out", out, "--resume", "--eval-samples", "4")
    assert result.exit_code == 0 and "is complete: it holds 1 of 1 rounds" in result.output


def test_a_corrupt_checkpoint_names_the_file_and_the_last_good_round(finished, tmp_path):
    plan_path, out = finished
    broken = tmp_path / "run"
    broken.mkdir()
    for item in out.rglob("*"):
        if item.is_file():
            target = broken / item.relative_to(out)
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(item.read_bytes())
    state = json.loads((broken / "checkpoint" / "state.json").read_text())
    tensor = broken / "checkpoint" / state["files"]["global"]
    tensor.write_bytes(tensor.read_bytes()[:100])  # truncated
    result = run(plan_path, "--out", broken, "--resume", "--eval-samples", "4", "--rounds", "2")
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert state["files"]["global"] in result.output and "rounds up to 1" in result.output

    (broken / "checkpoint" / "state.json").write_text("{not json")
    result = run(plan_path, "--out", broken, "--resume", "--eval-samples", "4", "--rounds", "2")
    assert result.exit_code == 2 and "state.json: not a readable fedpipe checkpoint" in result.output


def test_bad_arguments_are_refused_before_a_model_loads(finished, tmp_path, monkeypatch):
    plan_path, out = finished

    def no_loading(*args, **kwargs):
        raise AssertionError("a model was loaded before the arguments were checked")

    monkeypatch.setattr(loop, "load_base", no_loading)
    for args, message in (
        (["--aggregation", "fedavg"], "unknown aggregation rule 'fedavg'"),
        (["--upload-density", "1.5"], "density"),
        (["--min-participation", "5"], "min_participation"),
        (["--cohort", "3"], "cohort: '3' is neither a count from 1 to 2"),
        (["--cohort", "1", "--min-participation", "2"], "min_participation: '2' is neither a count from 1 to 1"),
        (["--norm-bound", "-1"], "--norm-bound"),
        (["--out", out], "already holds a run"),
    ):
        result = run(plan_path, *args)
        assert result.exit_code == 2 and message in result.output, (args, result.output)


def test_rows_written_before_the_evaluated_field_still_read():
    """A run folder of an earlier version resumes: its rows say what they scored by their eval."""
    from fedpipe.federation.records import RoundRow

    row = {"round": 1, "rule": "fedit", "servers": [], "idle_servers": [], "missed_servers": {},
           "eval": {"loss": 1.0, "accuracy": 0.5, "accuracy_ci95": [0.2, 0.8], "n": 4, "per_family": {}},
           "aggregate_s": 0.1, "eval_s": 0.2, "global_rank": 8, "truncation": {}, "adapter_bytes": 10,
           "round_s": 1.0, "train_s": 0.5}
    assert RoundRow.model_validate(row).evaluated == "loss+accuracy"
    assert RoundRow.model_validate(row | {"eval": None}).evaluated == "nothing"
