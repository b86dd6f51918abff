"""Planner: plans respect every budget, infeasibility is named, shipped plans are current."""

from pathlib import Path

import pytest
import yaml
from instances import PRICED_PRECISIONS, SHAPES, random_instance
from peft import LoraConfig
from typer.testing import CliRunner

from fedpipe.cli import app
from fedpipe.errors import FedpipeError
from fedpipe.plan import load_plan, save_plan
from fedpipe.planning.planner import plan_problem
from fedpipe.planning.problem import build_problem
from fedpipe.planning.strategies import make_plan
from fedpipe.precision import bytes_per_value
from fedpipe.profile import parse_profile
from fedpipe.shapes import load_shapes

ROOT = Path(__file__).parents[2]


def test_deadline_is_respected_and_marked_binding(tmp_path):
    problem = random_instance(5, 2, [0, 8, 16])
    _, ev, _, _ = plan_problem(problem, solver="highs", time_limit=60)
    raw = problem.profile.model_dump()
    raw["objective"]["deadline_s"] = ev.makespan * 0.9
    problem2 = build_problem(parse_profile(raw), SHAPES, problem.importance)
    try:
        _, ev2, _, _ = plan_problem(problem2, solver="highs", time_limit=60)
    except FedpipeError as e:  # a deadline below the fastest round is reported, not ignored
        assert "deadline" in str(e)
        return
    assert ev2.makespan <= ev.makespan * 0.9 * (1 + 1e-9)


@pytest.mark.parametrize("method", ["milp", "decomposed"])
def test_infeasible_names_each_server_and_shortfall(method):
    problem = random_instance(1, 3, [0, 8])
    raw = problem.profile.model_dump()
    raw["servers"][0]["memory_gib"] = 0.1
    raw["servers"][2]["memory_gib"] = 0.2
    problem = build_problem(parse_profile(raw), SHAPES, problem.importance)
    with pytest.raises(FedpipeError) as e:
        plan_problem(problem, solver="highs", time_limit=30, method=method)
    text = str(e.value)
    assert "server s0" in text and "server s2" in text and "server s1" not in text
    assert "short by" in text and "GiB" in text


@pytest.fixture(scope="module")
def cluster_plan(tmp_path_factory):
    return make_plan(ROOT / "profiles" / "cluster.yaml", time_limit=60)


def test_cluster_plan_is_heterogeneous_and_within_budgets(cluster_plan):
    plan = cluster_plan
    assert len({s.bits for s in plan.servers}) >= 2
    assert len({tuple(sorted(s.rank_pattern.items())) for s in plan.servers}) >= 3
    for s in plan.servers:
        assert s.predicted.memory_gib <= s.predicted.memory_budget_gib
        assert s.predicted.round_s <= plan.summary.makespan_s + 1e-9
    assert plan.baseline is not None and plan.baseline.summary.makespan_s > 0
    assert plan.solver.status in ("optimal", "feasible") and plan.solver.solve_time_s > 0


def test_plan_round_trips_and_feeds_peft(cluster_plan, tmp_path):
    path = save_plan(cluster_plan, tmp_path / "p.plan.yaml")
    assert load_plan(path) == cluster_plan
    s = max(cluster_plan.servers, key=lambda s: len(set(s.rank_pattern.values())))
    cfg = LoraConfig(r=8, target_modules=list(s.rank_pattern), rank_pattern=s.rank_pattern,
                     alpha_pattern=s.alpha_pattern())
    assert cfg.rank_pattern == s.rank_pattern


def test_committed_plans_are_current():
    """Every shipped profile has its plan committed, generated from the profile as it is now."""
    from fedpipe.digest import file_sha256

    for profile in sorted((ROOT / "profiles").glob("*.yaml")):
        plan = load_plan(ROOT / "plans" / f"{profile.stem}.plan.yaml")
        assert plan.profile.sha256 == file_sha256(profile), f"re-run: fedpipe plan {profile}"
        assert all(s.predicted.memory_gib <= s.predicted.memory_budget_gib for s in plan.servers)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["fleet-128", "llama2-7b-hospitals"])
def test_shipped_profiles_plan(name):
    plan = make_plan(ROOT / "profiles" / f"{name}.yaml", time_limit=30)
    assert plan.solver.status in ("optimal", "feasible")
    assert all(s.predicted.memory_gib <= s.predicted.memory_budget_gib for s in plan.servers)


def _link_profile(mbps: float, densities: list[float] | None = None,
                  precisions: list[str] | None = None, **objective):
    """One server whose links we vary next to a fast hub: which density and wire precision does
    the planner pick?"""
    candidates = {"targets": ["q_proj", "v_proj"], "ranks": [0, 4, 8], "bits": [16],
                  "batch_sizes": [4]}
    if densities is not None:
        candidates["densities"] = densities
    if precisions is not None:
        candidates["precisions"] = precisions
    return {"model": "smollm2-135m", "task": {"seq_len": 64, "local_steps": 5},
            "candidates": candidates, "objective": {"kind": "weighted", **objective},
            "servers": [{"name": "edge", "memory_gib": 4, "tflops": 5, "uplink_mbps": mbps,
                         "downlink_mbps": mbps, "samples": 100},
                        {"name": "hub", "memory_gib": 4, "tflops": 20, "uplink_mbps": 500,
                         "downlink_mbps": 500, "samples": 300}]}


def _plan_for(tmp_path, raw: dict, method: str = "auto"):
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump(raw))
    return {s.name: s for s in make_plan(path, method=method).servers}


@pytest.mark.parametrize("method", ["milp", "decomposed"])
def test_density_chosen_only_where_bandwidth_binds(tmp_path, method):
    # a fast uplink: dense, the full quality; a slow one: sparse, and bytes shrink with it
    fast = _plan_for(tmp_path, _link_profile(1000, precisions=["fp32"]), method)
    slow = _plan_for(tmp_path, _link_profile(2, precisions=["fp32"]), method)
    assert fast["edge"].upload_density == fast["edge"].download_density == 1.0
    assert slow["edge"].upload_density < 1.0
    assert slow["edge"].download_density == slow["edge"].upload_density  # not flora: both ways
    assert slow["hub"].upload_density == 1.0  # the hub's link is never the bottleneck
    d = slow["edge"].upload_density
    dense = 4 * slow["edge"].predicted.lora_params
    assert slow["edge"].predicted.upload_bytes == pytest.approx(dense * (d + min(1 / 32, d)), rel=1e-6)


def test_dense_only_ladder_and_flora_download(tmp_path):
    only_dense = _plan_for(tmp_path, _link_profile(2, densities=[1.0], precisions=["fp32"]))
    assert only_dense["edge"].upload_density == 1.0 and only_dense["edge"].upload_precision == "fp32"
    flora = _plan_for(tmp_path, {**_link_profile(2), "aggregation": "flora"})
    edge = flora["edge"]
    assert edge.upload_density < 1.0 or edge.upload_precision != "fp32"
    # flora merges its stack into every base: downloaded exact, whatever the upload
    assert edge.download_density == 1.0 and edge.download_precision == "fp32"


WIRE_LADDER = ["fp32", "bf16", "int8", "nf4"]


@pytest.mark.parametrize("method", ["milp", "decomposed"])
def test_wire_precision_is_lower_where_the_uplink_is_tight(tmp_path, method):
    slow = _plan_for(tmp_path, _link_profile(2, densities=[1.0], precisions=WIRE_LADDER,
                                             precision_quality=PRICED_PRECISIONS), method)
    fast = _plan_for(tmp_path, _link_profile(1000, densities=[1.0], precisions=WIRE_LADDER,
                                             precision_quality=PRICED_PRECISIONS), method)
    width = {p: bytes_per_value(1.0, p) for p in WIRE_LADDER}
    # the 2 Mbit/s edge sends fewer bytes per value than the 500 Mbit/s hub beside it, and than
    # itself on a fat link
    assert width[slow["edge"].upload_precision] < width[slow["hub"].upload_precision]
    assert width[slow["edge"].upload_precision] < width[fast["edge"].upload_precision]
    assert slow["hub"].upload_precision == "fp32"  # the hub's link is never the bottleneck
    assert slow["edge"].download_precision == slow["edge"].upload_precision  # not flora: both ways


def test_chosen_precision_is_written_into_a_valid_plan_with_bytes_per_value(tmp_path):
    """The plan carries the (density, precision) the planner chose, reloads as a valid plan, and
    predicts each entry's bytes as precision.bytes_per_value(d, p) x its adapter's values."""
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump(_link_profile(2, precisions=WIRE_LADDER)))
    plan = make_plan(path)
    saved = load_plan(save_plan(plan, tmp_path / "p.plan.yaml"))
    assert saved.servers == plan.servers
    assert {s.upload_precision for s in saved.servers} - {"fp32"}  # something below fp32 was chosen
    by_name = {m.name: m for m in load_shapes("smollm2-135m").matrices}
    for s in saved.servers:
        values = [by_name[n].lora_params(r) for n, r in s.rank_pattern.items()]
        assert s.predicted.lora_params == sum(values)
        up = bytes_per_value(s.upload_density, s.upload_precision) * sum(values)
        down = bytes_per_value(s.download_density, s.download_precision) * sum(values)
        assert s.predicted.upload_bytes == pytest.approx(up, abs=1)
        assert s.predicted.download_bytes == pytest.approx(down, abs=1)


def test_bad_precision_ladder_exits_2_naming_the_field_and_valid_values(tmp_path):
    runner, out = CliRunner(), tmp_path / "x.plan.yaml"
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(_link_profile(2, precisions=["fp32", "int4"])))
    result = runner.invoke(app, ["plan", str(path), "-o", str(out)])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert "candidates.precisions[1]" in result.output and "'int4'" in result.output
    assert all(p in result.output for p in ("fp32", "bf16", "int8", "nf4", "fp4"))
    raw = _link_profile(2, precisions=["fp32", "nf4"])
    raw["objective"]["precision_quality"] = {"fp32": 1.0}
    path.write_text(yaml.safe_dump(raw))
    result = runner.invoke(app, ["plan", str(path), "-o", str(out)])
    assert result.exit_code == 2 and "precision_quality" in result.output and "nf4" in result.output
    assert not out.exists()


def test_density_without_quality_entry_is_a_clear_error():
    raw = _link_profile(1, densities=[1.0, 0.5])
    with pytest.raises(FedpipeError) as e:
        parse_profile(raw)
    assert "density_quality" in str(e.value.problems) and "0.5" in str(e.value.problems)
    raw = _link_profile(1, densities=[1.0, 1.5])
    with pytest.raises(FedpipeError) as e:
        parse_profile(raw)
    assert "candidates.densities" in str(e.value.problems)
