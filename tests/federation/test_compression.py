"""Quantized payloads with error feedback, and a thresholded global rank, in a real run."""

import pytest
import torch
from test_run import read_global, tiny_plan

from fedpipe.errors import FedpipeError
from fedpipe.federation.inprocess import run_plan
from fedpipe.federation.spec import RunSpec


def test_quantized_payloads_cut_bytes_and_still_train(tmp_path, tiny_model_dir):
    plan_path = tiny_plan(tmp_path, tiny_model_dir, rule="fedit", rounds=2)
    common = dict(eval_samples=4, local_steps=1, upload_density=1.0, download_density=1.0)
    dense = run_plan(plan_path, out=tmp_path / "fp32", **common)
    small = run_plan(plan_path, out=tmp_path / "nf4", upload_precision="nf4", download_precision="int8",
                     **common)
    for d, s in zip(dense.rows[-1]["servers"], small.rows[-1]["servers"], strict=True):
        # the tiny model's factors are small, so the payload header weighs more here than on
        # SmolLM2's, where nf4 is 0.14 of fp32 (README, bench_wire)
        assert s["upload_bytes"] < 0.65 * d["upload_bytes"], (s["server"], s["upload_bytes"], d["upload_bytes"])
        assert s["download_bytes"] < 0.8 * d["download_bytes"]
    assert small.rows[-1]["eval"]["loss"] < 1.5 * dense.rows[-1]["eval"]["loss"]


def test_thresholded_global_rank_is_reported_and_shrinks_the_adapter(tmp_path, tiny_model_dir):
    plan_path = tiny_plan(tmp_path, tiny_model_dir, rule="flexlora", rounds=1)
    full = run_plan(plan_path, out=tmp_path / "full", eval_samples=4, local_steps=1)
    cut = run_plan(plan_path, out=tmp_path / "cut", eval_samples=4, local_steps=1, truncate_rank=2)
    row, full_row = cut.rows[-1], full.rows[-1]
    assert full_row["truncation"] == {} and row["global_rank"] == 2 < full_row["global_rank"]
    assert 0 < row["truncation"]["truncation_error_rel"] < 1
    assert row["adapter_bytes"] < full_row["adapter_bytes"]


def test_error_feedback_can_be_turned_off_and_a_resume_keeps_it(tmp_path, tiny_model_dir):
    plan_path = tiny_plan(tmp_path, tiny_model_dir, rule="fedit", rounds=2)
    common = dict(eval_samples=4, local_steps=1, upload_precision="nf4")
    run_plan(plan_path, out=tmp_path / "on", **common)
    run_plan(plan_path, out=tmp_path / "off", error_feedback=False, **common)
    on, off = read_global(tmp_path / "on"), read_global(tmp_path / "off")
    # round 1 is the same either way; round 2's uploads differ by what round 1's nf4 dropped
    assert any(not torch.equal(on[n].A, off[n].A) or not torch.equal(on[n].B, off[n].B) for n in on)
    with pytest.raises(FedpipeError, match="error_feedback"):
        RunSpec.resolve(plan_path, out=tmp_path / "off", resume=True, rounds=3, **common)
