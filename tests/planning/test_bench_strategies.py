"""bench_strategies' bookkeeping: the rounds each plan gets from the time budget, and the target,
cost-to-target and budget figures computed from loss curves (no training here)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_strategies.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_strategies", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run(makespan: float, losses: list[float], bytes_per_round: int) -> dict:
    return {"makespan_s": makespan, "curve": [
        {"round": r, "time_s": r * makespan, "bytes": r * bytes_per_round, "loss": loss, "accuracy": 0.0}
        for r, loss in enumerate(losses, start=1)]}


def test_rounds_fill_the_fastest_plans_budget(bench) -> None:
    budget, rounds = bench.budget_rounds({"fast": 2.0, "mid": 5.0, "slow": 100.0}, cap=8)
    assert budget == 16.0
    assert rounds == {"fast": 8, "mid": 3, "slow": 1}  # at least one round each


def test_target_and_cost_to_target(bench) -> None:
    runs = {"a": {0: run(10.0, [1.5, 1.0], 100), 1: run(10.0, [1.7, 1.2], 100)},
            "b": {0: run(2.0, [1.9, 1.8, 1.7, 1.6], 10), 1: run(2.0, [1.9, 1.8, 1.7, 1.6], 10)}}
    base = {0: {"loss": 2.0}, 1: {"loss": 2.0}}
    a = bench.analyse(runs, base)
    # best seed-mean loss 1.1 (a, round 2): target 2.0 + 0.6 * (1.1 - 2.0) = 1.46
    assert a["target_loss"] == pytest.approx(1.46)
    assert a["strategies"]["a"]["time_to_target_s"] == 20.0  # mean 1.6 at round 1, 1.1 at round 2
    assert a["strategies"]["a"]["time_to_target_per_seed_s"] == {0: 20.0, 1: 20.0}
    assert a["strategies"]["b"]["time_to_target_s"] is None
    assert a["byte_budget"] == 40  # b's whole run: a's first round (100 bytes) is over it
    assert a["strategies"]["a"]["loss_at_byte_budget"] is None
    assert a["strategies"]["b"]["loss_at_byte_budget"] == pytest.approx(1.6)
    assert a["strategies"]["a"]["loss_at_budget_spread"] == pytest.approx(0.1414, abs=1e-4)


def test_the_rate_objective_runs_as_one_more_contender_and_is_compared(bench) -> None:
    made = bench.contenders(["rate"])
    assert made["fedpipe-rate"] == ("fedpipe", "rate") and made["legend"] == ("legend", None)
    runs = {"fedpipe": {0: run(10.0, [1.5, 1.0], 100)}, "fedpipe-rate": {0: run(1.0, [1.2, 1.0], 10)},
            "legend": {0: run(2.0, [1.9, 1.1], 10)}}
    lines = bench.report("x", bench.analyse(runs, {0: {"loss": 2.0}}), 20.0)
    # target 2.0 + 0.6 * (1.0 - 2.0) = 1.4: fedpipe at 20 s, fedpipe-rate at 1 s, legend at 4 s
    assert "fedpipe vs legend: time to target 0.20× faster · loss at budget 1.0000 vs 1.1000" in lines
    assert "fedpipe-rate vs legend: time to target 4.00× faster · loss at budget 1.0000 vs 1.1000" in lines
