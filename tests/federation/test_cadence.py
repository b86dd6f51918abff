"""Evaluation cadence and the accuracy interval reported with it."""

import pytest
from test_run import tiny_plan

from fedpipe.data import wilson_interval
from fedpipe.federation.inprocess import run_plan


def test_wilson_interval_brackets_the_proportion():
    lo, hi = wilson_interval(20, 50)
    assert lo < 0.4 < hi and (lo, hi) == pytest.approx((0.276, 0.538), abs=1e-3)
    assert wilson_interval(0, 10)[0] == 0.0 and wilson_interval(10, 10)[1] == pytest.approx(1.0)
    assert wilson_interval(0, 0) == (0.0, 1.0)


def test_eval_every_skips_rounds_but_never_the_last(tmp_path, tiny_model_dir):
    plan_path = tiny_plan(tmp_path, tiny_model_dir, rule="fedit", rounds=3)
    result = run_plan(plan_path, out=tmp_path / "run", eval_samples=4, eval_every=2, local_steps=1)
    assert [r["eval"] is not None for r in result.rows] == [False, True, True]
    lo, hi = result.rows[-1]["eval"]["accuracy_ci95"]
    assert lo <= result.rows[-1]["eval"]["accuracy"] <= hi
    assert (tmp_path / "run" / "curves.png").is_file()
