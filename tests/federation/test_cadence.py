"""Evaluation cadence and the accuracy interval reported with it."""

import pytest
from test_run import tiny_plan

from fedpipe.data import wilson_interval
from fedpipe.federation.inprocess import run_plan
from fedpipe.federation.rundir import RunFolder
from fedpipe.federation.spec import RunSpec
from fedpipe.render import console, run_table


def test_wilson_interval_brackets_the_proportion():
    lo, hi = wilson_interval(20, 50)
    assert lo < 0.4 < hi and (lo, hi) == pytest.approx((0.276, 0.538), abs=1e-3)
    assert wilson_interval(0, 10)[0] == 0.0 and wilson_interval(10, 10)[1] == pytest.approx(1.0)
    assert wilson_interval(0, 0) == (0.0, 1.0)


def test_eval_every_skips_rounds_but_never_the_last(tmp_path, tiny_model_dir):
    plan_path = tiny_plan(tmp_path, tiny_model_dir, rule="fedit", rounds=3)
    result = run_plan(plan_path, out=tmp_path / "run", eval_samples=4, eval_every=2, local_steps=1)
    assert [r["eval"] is not None for r in result.rows] == [False, True, True]
    assert [r["evaluated"] for r in result.rows] == ["nothing", "loss+accuracy", "loss+accuracy"]
    lo, hi = result.rows[-1]["eval"]["accuracy_ci95"]
    assert lo <= result.rows[-1]["eval"]["accuracy"] <= hi
    assert (tmp_path / "run" / "curves.png").is_file()


def test_accuracy_cadence_rule(tmp_path, tiny_model_dir):
    spec = RunSpec.resolve(tiny_plan(tmp_path, tiny_model_dir, rounds=7), out=tmp_path / "run",
                           eval_every=2, accuracy_every=2)
    assert [spec.evaluates(r) for r in range(1, 8)] == [
        "nothing", "loss", "nothing", "loss+accuracy", "nothing", "loss", "loss+accuracy"]


def test_loss_only_rounds_are_written_shown_and_plotted(tmp_path, tiny_model_dir):
    plan_path = tiny_plan(tmp_path, tiny_model_dir, rule="fedit", rounds=3)
    result = run_plan(plan_path, out=tmp_path / "run", eval_samples=4, accuracy_every=2, local_steps=1)
    assert [r["evaluated"] for r in result.rows] == ["loss", "loss+accuracy", "loss+accuracy"]
    first, last = result.rows[0]["eval"], result.rows[-1]["eval"]
    assert first["loss"] > 0 and first["accuracy"] is None and first["accuracy_ci95"] is None
    assert all(f["accuracy"] is None for f in first["per_family"].values())
    assert last["accuracy"] is not None
    assert RunFolder(tmp_path / "run").read_rows(up_to=3) == result.rows  # the schema reads them back
    out = console()
    with out.capture() as captured:
        out.print(run_table(result))
    cells = [[c.strip() for c in line.split("│")[1:-1]] for line in captured.get().splitlines()]
    round_one = next(c for c in cells if c[:1] == ["1"])
    assert round_one[1:3] == [f"{first['loss']:.3f}", "-"]  # loss, no exact match
    assert (tmp_path / "run" / "curves.png").is_file()
