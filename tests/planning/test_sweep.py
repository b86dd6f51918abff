"""Budget sweeps: one plan per point, infeasible points reported, exact reuse, files and pictures."""

from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from fedpipe.cli import app
from fedpipe.errors import FedpipeError
from fedpipe.plan import load_plan
from fedpipe.planning.planner import plan_problem
from fedpipe.planning.problem import build_problem
from fedpipe.planning.strategies import make_plan
from fedpipe.planning.sweep import load_sweep, parse_axis, run_sweep, scale_profile
from fedpipe.profile import load_profile
from fedpipe.shapes import load_shapes

DATA = Path(__file__).parents[1] / "data"
SMALL = DATA / "small.yaml"
runner = CliRunner()


def test_parse_axis_normalises_and_rejects():
    assert parse_axis("memory", "0.5, 1,2.0") == ["0.5", "1", "2"]
    assert parse_axis("deadline", "none,30s,0.80x,12") == ["none", "30", "0.8x", "12"]
    for axis, text in [("memory", "0,1"), ("bandwidth", "fast"), ("deadline", "-3"), ("servers", ""),
                       ("memory", "1,1.0")]:
        with pytest.raises(FedpipeError, match=f"--{axis}"):
            parse_axis(axis, text)


def test_scale_profile_scales_every_server_and_revalidates():
    base = load_profile(SMALL)
    p = scale_profile(base, memory=0.5, bandwidth=0.25, servers=3, deadline_s=9.0)
    for a, b in zip(base.servers, p.servers, strict=True):
        assert b.memory_gib == pytest.approx(a.memory_gib * 0.5)
        assert (b.uplink_mbps, b.downlink_mbps) == pytest.approx((a.uplink_mbps / 4, a.downlink_mbps / 4))
        assert b.count == 3 and b.member_names()[-1] == f"{a.name}-3"
    assert p.objective.deadline_s == 9.0
    assert scale_profile(base, servers=0.4).servers[0].count == 1  # never below one server
    with pytest.raises(FedpipeError, match="memory_gib"):
        scale_profile(base, memory=1e9)


@pytest.fixture(scope="module")
def memory_sweep(tmp_path_factory):
    out = tmp_path_factory.mktemp("sweep")
    return run_sweep(SMALL, {"memory": ["0.5", "1", "2"], "bandwidth": ["0.25", "1"]}, out_dir=out)


def test_sweep_writes_one_plan_per_point_and_reports_infeasible(memory_sweep):
    r = memory_sweep
    assert [p.name for p in r.points] == ["m0.5-b0.25", "m0.5-b1", "m1-b0.25", "m1-b1", "m2-b0.25", "m2-b1"]
    for p in r.points[:2]:  # edge has 1 GiB: half of it cannot hold the base model
        assert p.status == "infeasible" and p.plan is None
        assert "server edge" in p.reason and "short by" in p.reason
    for p in r.points[2:]:
        plan = load_plan(p.plan)
        assert plan.profile.name == f"small-{p.name}"
        assert all(s.predicted.memory_gib <= s.predicted.memory_budget_gib for s in plan.servers)
        assert p.makespan_s == plan.summary.makespan_s and 0 < p.importance_covered <= 1
        assert sum(p.servers_per_bits.values()) == 2
        assert p.upload_bytes == plan.summary.upload_bytes
    by = {p.name: p for p in r.points}
    assert by["m2-b1"].quality >= by["m1-b1"].quality - 1e-9  # more memory never hurts
    assert by["m1-b0.25"].makespan_s > by["m1-b1"].makespan_s  # a slower link costs time
    assert load_sweep(r.out_dir).model_dump() == r.model_dump() and load_sweep(r.out_dir).plans == {}
    assert r.plan(r.points[3]) == load_plan(r.points[3].plan)
    assert [(a.name, b.name) for a, b in r.neighbours()] == [("m1-b0.25", "m1-b1"), ("m2-b0.25", "m2-b1")]


def test_point_plan_equals_make_plan_on_its_profile(memory_sweep):
    """The sweep lays plans out as `fedpipe plan` does, and each point's profile reproduces it."""
    point = next(p for p in memory_sweep.points if p.name == "m1-b1")
    swept = load_plan(point.plan)
    direct = make_plan(point.profile)
    assert swept.profile == direct.profile
    assert swept.servers == direct.servers and swept.summary == direct.summary
    assert swept.baseline == direct.baseline and swept.reference_time_s == direct.reference_time_s
    plain = make_plan(SMALL)  # multiplier 1 is the profile itself
    assert [s.rank_pattern for s in swept.servers] == [s.rank_pattern for s in plain.servers]


def test_deadlines_reuse_looser_plans_exactly(tmp_path):
    r = run_sweep(SMALL, {"deadline": ["none", "0.9x", "100"], "servers": ["1", "2"]}, out_dir=tmp_path)
    by = {p.name: p for p in r.points}
    free = by["n1-dnone"]
    assert by["n1-d100"].reused_from == "n1-dnone" and by["n1-d100"].quality == free.quality
    tight = by["n1-d0.9x"]
    assert tight.reused_from is None and tight.deadline_s == pytest.approx(0.9 * free.makespan_s)
    assert tight.makespan_s <= tight.deadline_s * (1 + 1e-9) and tight.quality < free.quality
    assert load_plan(tight.plan).deadline_s == pytest.approx(tight.deadline_s)
    # the reused point is what a direct solve at that deadline gives
    profile = scale_profile(load_profile(SMALL), deadline_s=100.0)
    _, ev, _, _ = plan_problem(build_problem(profile, load_shapes(profile.model)))
    assert ev.quality == pytest.approx(by["n1-d100"].quality, rel=1e-4)
    doubled = load_plan(by["n2-dnone"].plan)
    assert [s.count for s in doubled.servers] == [2, 2] and doubled.servers[0].members == ["edge-1", "edge-2"]


def test_cli_sweep_table_plots_and_diffs(tmp_path):
    out = tmp_path / "sw"
    result = runner.invoke(app, ["sweep", str(SMALL), "--memory", "0.5,1", "--bandwidth", "0.5,1",
                                 "--out", str(out), "--diff"])
    assert result.exit_code == 0, result.output
    for word in ("m0.5-b1", "infeasible", "server edge", "makespan", "servers per bits", "diff m1-b0.5 → m1-b1"):
        assert word in result.output
    assert (out / "sweep.png").stat().st_size > 10_000 and (out / "rankmap.png").stat().st_size > 5_000
    assert sorted(p.name for p in out.glob("*.plan.yaml")) == ["m1-b0.5.plan.yaml", "m1-b1.plan.yaml"]
    assert yaml.safe_load((out / "sweep.yaml").read_text())["axes"] == {"memory": ["0.5", "1"],
                                                                          "bandwidth": ["0.5", "1"]}


def test_cli_sweep_bad_input_exit_2(tmp_path):
    for args in (["--memory", "half"], [], ["--deadline", "0x"]):
        result = runner.invoke(app, ["sweep", str(SMALL), "--out", str(tmp_path), *args])
        assert result.exit_code == 2, result.output
        assert "error" in result.output and "Traceback" not in result.output
    assert not list(tmp_path.iterdir())


def test_more_memory_than_any_configuration_needs_reuses_the_plan(tmp_path):
    """At 2x memory no server of small.yaml can use all of it, so 4x and 8x are the same problem:
    solved once, and equal to planning the point's own profile; at 1x the edge server's memory
    binds, so 1x is solved on its own."""
    points = {p.name: p for p in run_sweep(DATA / "small.yaml", {"memory": ["1", "2", "4", "8"]},
                                           out_dir=tmp_path).points}
    assert points["m1"].reused_from is None and points["m2"].reused_from is None
    assert points["m4"].reused_from == points["m8"].reused_from == "m2"
    assert points["m1"].quality < points["m2"].quality == points["m8"].quality
    for name in ("m4", "m8"):
        reused, fresh = load_plan(points[name].plan), make_plan(points[name].profile)
        assert [(s.bits, s.batch_size, s.upload_density, s.rank_pattern) for s in reused.servers] == \
            [(s.bits, s.batch_size, s.upload_density, s.rank_pattern) for s in fresh.servers]
        assert [s.predicted.memory_budget_gib for s in reused.servers] == \
            [s.predicted.memory_budget_gib for s in fresh.servers]
