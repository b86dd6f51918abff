"""candidates.selection: the spread rule's sets, and the MILP, the decomposed search and brute force
agreeing under it on instances where it binds."""

import json
import math
from pathlib import Path

import pytest
from instances import brute_force_objective, random_instance

import fedpipe.planning.decompose as decompose
from fedpipe.errors import FedpipeError
from fedpipe.importance import ImportanceReport
from fedpipe.planning.milp import solve_baseline
from fedpipe.planning.planner import plan_problem
from fedpipe.planning.problem import build_problem, evaluate, is_feasible
from fedpipe.profile import parse_profile
from fedpipe.shapes import load_shapes

ARMS = Path(__file__).parents[2] / "benchmarks" / "results" / "importance-arms-cpu.json"

# instances where spread binds (the relaxed optimum breaks it): (seed, servers, ranks, objective)
BINDING = [(9, 2, [0, 8, 16], "rate"), (100, 3, [0, 16], "rate"), (105, 3, [0, 16], "rate"),
           (0, 2, [0, 64, 256], "rate"), (4, 2, [0, 512], "weighted"), (6, 2, [0, 512], "weighted")]


def _smollm(scores: dict[str, float], selection: str = "spread"):
    profile = parse_profile({"model": "smollm2-135m", "candidates": {"selection": selection},
                             "servers": [{"name": "a", "memory_gib": 4, "tflops": 1, "uplink_mbps": 10,
                                          "downlink_mbps": 10, "samples": 10}]})
    shapes = load_shapes("smollm2-135m")
    return build_problem(profile, shapes, ImportanceReport(scorer="t", model="smollm2-135m", scores=scores))


def test_spread_reproduces_the_measured_arm():
    """At 21 of 210 on the benchmark's stored scores, spread adapts exactly the type-layer-spread
    arm that beat random selection."""
    store = json.loads(ARMS.read_text())
    problem = _smollm(store["scores"]["sensitivity"])
    assert problem.adaptable_sets[21] == frozenset(store["arms"]["type-layer-spread"]["matrices"])


def test_every_spread_set_keeps_both_limits():
    store = json.loads(ARMS.read_text())
    problem = _smollm(store["scores"]["sensitivity"])
    by_name = {m.name: m for m in problem.matrices}
    sets = problem.adaptable_sets
    # the walk ends short only just below full layers (n near a multiple of 30): those counts
    # are not offered, every other is
    assert set(range(58)) <= set(sets) and len(sets[210]) == 210 and len(sets) > 130
    for n, names in sets.items():
        members = [by_name[x] for x in names]
        assert len(members) == n
        layers = [sum(m.layer == la for m in members) for la in range(30)]
        types = [sum(m.kind == t for m in members) for t in {m.kind for m in problem.matrices}]
        assert max(layers) <= math.ceil(n / 30)
        assert max(types) - min(types) <= 1


def test_importance_alone_piles_up_where_spread_does_not():
    """Without the rule the planner's top-21 take several matrices of one layer (here layer 29)."""
    store = json.loads(ARMS.read_text())
    problem = _smollm(store["scores"]["sensitivity"])
    top = sorted(problem.matrices, key=lambda m: -problem.weights[m.name])[:21]
    assert max(sum(m.layer == la for m in top) for la in range(30)) >= 3
    assert not problem.selection_allows({m.name: 8 for m in top})


@pytest.mark.parametrize(("seed", "servers", "ranks", "kind"), BINDING)
def test_milp_decomposed_and_brute_force_agree_where_spread_binds(seed, servers, ranks, kind):
    problem = random_instance(seed, servers, ranks, kind=kind, selection="spread")
    _, ev_d, rep_d, _ = plan_problem(problem, method="decomposed")
    _, ev_m, rep_m, _ = plan_problem(problem, method="milp", solver="highs", time_limit=60)
    best = brute_force_objective(problem)
    assert best < brute_force_objective(problem.relaxed()) - 1e-9  # the rule binds here
    assert rep_d.status == rep_m.status == "optimal"
    assert ev_d.objective == pytest.approx(best, rel=1e-6, abs=1e-9)
    assert ev_m.objective == pytest.approx(best, rel=2e-4, abs=1e-6)


@pytest.mark.parametrize(("seed", "servers", "ranks", "kind"), BINDING[:3])
def test_lp_window_path_under_spread(seed, servers, ranks, kind, monkeypatch):
    """Without enumeration (the path large models take) the bound still bounds the optimum and
    the plan obeys the rule."""
    monkeypatch.setattr(decompose, "EXHAUSTIVE_COMBOS", 0)
    problem = random_instance(seed, servers, ranks, kind=kind, selection="spread")
    choices, ev, report, _ = plan_problem(problem, method="decomposed")
    best = brute_force_objective(problem)
    assert is_feasible(problem, choices, ev)
    assert ev.objective / (1 - report.gap) >= best - 1e-9
    assert ev.objective >= best - abs(best) * 1e-2


def test_is_feasible_refuses_a_plan_that_breaks_the_rule():
    seed, servers, ranks, kind = BINDING[0]
    problem = random_instance(seed, servers, ranks, kind=kind, selection="spread")
    free, _, _, _ = plan_problem(problem.relaxed(), method="decomposed")
    assert not is_feasible(problem, free, evaluate(problem, free))
    assert is_feasible(problem.relaxed(), free, evaluate(problem, free))


def test_baselines_agree_under_spread():
    for seed, servers, ranks, kind in BINDING:
        problem = random_instance(seed, servers, ranks, kind=kind, selection="spread")
        milp = solve_baseline(problem, "highs", 60)[0]
        dec = decompose.solve_baseline_decomposed(problem)
        assert problem.selection_allows(dec[0].ranks) and problem.selection_allows(milp[0].ranks)
        assert evaluate(problem, dec).quality == pytest.approx(evaluate(problem, milp).quality, rel=1e-9)


def test_unknown_selection_names_the_field():
    with pytest.raises(FedpipeError) as err:
        parse_profile({"model": "smollm2-135m", "candidates": {"selection": "random"},
                       "servers": [{"name": "a", "memory_gib": 4, "tflops": 1, "uplink_mbps": 10,
                                    "downlink_mbps": 10, "samples": 10}]})
    assert any("candidates.selection" in p and "spread" in p for p in err.value.problems)
