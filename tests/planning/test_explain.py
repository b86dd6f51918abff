"""explain and show: binding constraints, priced next-better options, forgone importance, rank maps."""

import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from typer.testing import CliRunner

from fedpipe.cli import app
from fedpipe.plan import load_plan, save_plan
from fedpipe.planning.explain import explain_plan, layer_ranges, plan_problem_context
from fedpipe.planning.problem import Choice, evaluate
from fedpipe.planning.strategies import make_plan
from fedpipe.planning.sweep import run_sweep
from fedpipe.plots import plan_layout, rank_map

DATA = Path(__file__).parents[1] / "data"
runner = CliRunner()


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """small.yaml with a tighter edge: it plans on 4 bits, short of memory for 16."""
    folder = tmp_path_factory.mktemp("explain")
    raw = yaml.safe_load((DATA / "small.yaml").read_text())
    raw["servers"][0]["memory_gib"] = 0.95
    profile = folder / "tight.yaml"
    profile.write_text(yaml.safe_dump(raw))
    path = save_plan(make_plan(profile), folder / "tight.plan.yaml")
    return path, load_plan(path)


def test_layer_ranges():
    assert layer_ranges([5, 0, 1, 2, 7, 8]) == "0-2, 5, 7-8"
    assert layer_ranges([]) == "-"


def test_explanation_matches_plan_and_prices_options(small):
    path, plan = small
    e = explain_plan(plan, str(path))
    assert e.warnings == [] and e.makespan_s == pytest.approx(plan.summary.makespan_s)
    for s in e.servers:
        sp = plan.server(s.server)
        assert s.binding == sp.binding and (s.bits, s.batch_size) == (sp.bits, sp.batch_size)
        assert s.covered == pytest.approx(sp.importance_covered, abs=1e-6)
        assert s.forgone == pytest.approx(s.forgone_unadapted + s.forgone_lower_rank)
        assert sum(c.forgone for c in s.by_type) == pytest.approx(s.forgone)
    edge = next(s for s in e.servers if s.server == "edge")
    assert edge.bits == 4 and edge.binding == ["round_time"] and "sets the makespan" in edge.constraints[1]
    up = next(o for o in edge.options if o.kind == "bits")
    assert up.blocked_by == ["memory"] and up.needs.startswith("+")
    # the shortfall is exact: with that much more memory the 16-bit configuration fits
    problem, choices, _ = plan_problem_context(plan)
    alt = [Choice(16, choices[0].batch, choices[0].ranks), choices[1]]
    assert evaluate(problem, alt).costs[0].memory_gib == pytest.approx(up.memory_gib)
    assert up.memory_gib - up.memory_budget_gib > 0


def test_break_even_time_weight_is_where_the_option_pays(small):
    """An option that fits but costs more time than it is worth: at the reported time_weight
    its objective change is zero."""
    _, plan = small
    e = explain_plan(plan)
    fits = [o for s in e.servers for o in s.options if o.blocked_by == ["objective"]]
    assert fits, "small.yaml should have a server that could adapt more but is held by time"
    o = fits[0]
    weight = o.break_even_time_weight
    assert f"time_weight <= {weight:.3g}" in o.needs and weight < e.time_weight
    dt = o.makespan_s - e.makespan_s
    assert o.d_quality - weight * dt / e.reference_time_s == pytest.approx(0, abs=1e-9)
    assert o.d_objective == pytest.approx(o.d_quality - e.time_weight * dt / e.reference_time_s)


def test_deadline_blocks_options_that_slow_the_round(tmp_path):
    point = run_sweep(DATA / "small.yaml", {"deadline": ["0.9x"]}, out_dir=tmp_path).points[0]
    e = explain_plan(load_plan(point.plan), server="edge")
    edge = e.servers[0]
    assert edge.constraints[-1].startswith("deadline:") and f"of {e.deadline_s:g} s" in edge.constraints[-1]
    slower = [o for o in edge.options if "deadline" in o.blocked_by]
    assert slower and all(o.makespan_s > e.deadline_s for o in slower)
    assert all(f"a deadline of {o.makespan_s:.3g} s" in o.needs for o in slower)


def test_cli_explain_text_json_and_errors(small, tmp_path):
    path, _ = small
    result = runner.invoke(app, ["explain", str(path)])
    assert result.exit_code == 0, result.output
    for word in ("edge", "hub", "binding", "next-better option", "GiB memory", "forgone", "16-bit base"):
        assert word in result.output
    data = json.loads(runner.invoke(app, ["explain", str(path), "--server", "hub", "--json"]).output)
    assert [s["server"] for s in data["servers"]] == ["hub"]
    bad = runner.invoke(app, ["explain", str(path), "--server", "nope"])
    assert bad.exit_code == 2 and "servers: edge, hub" in bad.output
    moved = tmp_path / "moved.plan.yaml"
    raw = yaml.safe_load(path.read_text())
    raw["profile"]["path"] = str(tmp_path / "gone.yaml")
    moved.write_text(yaml.safe_dump(raw))
    lost = runner.invoke(app, ["explain", str(moved)])
    assert lost.exit_code == 2 and "--profile" in lost.output and "Traceback" not in lost.output
    found = runner.invoke(app, ["explain", str(moved), "--profile", raw_profile(path)])
    assert found.exit_code == 0, found.output


def raw_profile(plan_path: Path) -> str:
    """The profile the plan records (written relative to the plan file)."""
    return str(plan_path.parent / yaml.safe_load(plan_path.read_text())["profile"]["path"])


def test_rank_map_is_mean_rank_per_layer(small):
    _, plan = small
    layers, types = plan_layout(plan)
    assert (layers, types) == (30, ["q_proj", "v_proj"])
    rm = rank_map(plan, layers, types)
    hub = plan.servers[1]
    expected = np.zeros(layers)
    for name, r in hub.rank_pattern.items():
        expected[int(name.split(".")[2])] += r / 2
    assert np.allclose(rm.values[1], expected) and rm.max_rank == 8


def test_cli_show_renders_tables_rank_map_and_png(small, tmp_path):
    path, _ = small
    png = tmp_path / "rank.png"
    result = runner.invoke(app, ["show", str(path), "--png", str(png)])
    assert result.exit_code == 0, result.output
    for word in ("plan small", "predictions against budgets", "rank map", "layers 0 → 29", "importance covered"):
        assert word in result.output
    assert png.stat().st_size > 5_000
