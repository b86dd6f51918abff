"""MILP: its optimum equals brute force on small instances, with HiGHS and CBC alike."""

import pytest
from instances import brute_force_objective, enumerated_optimum, random_instance

from fedpipe.planning.planner import plan_problem


@pytest.mark.parametrize("seed", range(5))
def test_milp_matches_brute_force_two_servers(seed):
    problem = random_instance(seed, 2, [0, 8, 16])
    choices, ev, report, _ = plan_problem(problem, solver="highs", time_limit=60)
    assert report.status == "optimal"
    assert ev.objective == pytest.approx(brute_force_objective(problem), rel=2e-4, abs=1e-6)


@pytest.mark.parametrize("seed", range(3))
def test_milp_matches_brute_force_three_servers(seed):
    problem = random_instance(100 + seed, 3, [0, 16])
    _, ev, _, _ = plan_problem(problem, solver="highs", time_limit=60)
    assert ev.objective == pytest.approx(brute_force_objective(problem), rel=2e-4, abs=1e-6)


WIRE_LADDER = ["fp32", "bf16", "int8", "nf4"]


@pytest.mark.parametrize("kind", ["weighted", "rate"])
@pytest.mark.parametrize("seed", range(3))
def test_milp_matches_brute_force_with_wire_precisions(seed, kind):
    """Precision in the choice set: brute force enumerates every (density, precision) of the
    ladders, including the pairs the model leaves out as dominated."""
    problem = random_instance(300 + seed, 2, [0, 16], kind=kind, precisions=WIRE_LADDER)
    assert len(problem.wire_options) < 2 * len(WIRE_LADDER)  # some pairs are dominated
    choices, ev, report, _ = plan_problem(problem, method="milp", solver="highs", time_limit=60)
    assert report.status == "optimal"
    assert ev.objective == pytest.approx(brute_force_objective(problem), rel=2e-4, abs=1e-6)


def test_flora_with_wire_precisions_matches_enumeration():
    problem = random_instance(5, 2, [0, 16], aggregation="flora", precisions=["fp32", "nf4"])
    choices, ev, _, _ = plan_problem(problem, method="milp", solver="highs", time_limit=60)
    assert ev.objective == pytest.approx(enumerated_optimum(problem), rel=2e-4, abs=1e-6)


def test_cbc_agrees_with_highs():
    problem = random_instance(7, 2, [0, 8, 16])
    _, ev_h, _, _ = plan_problem(problem, solver="highs", time_limit=60)
    problem = random_instance(7, 2, [0, 8, 16])
    _, ev_c, report, _ = plan_problem(problem, solver="cbc", time_limit=60)
    assert report.solver == "cbc"
    assert ev_c.objective == pytest.approx(ev_h.objective, rel=2e-4)


def test_flora_download_couples_servers_and_matches_enumeration():
    problem = random_instance(3, 2, [0, 16], aggregation="flora")
    choices, ev, _, _ = plan_problem(problem, solver="highs", time_limit=60)
    best = enumerated_optimum(problem)
    assert ev.objective == pytest.approx(best, rel=2e-4, abs=1e-6)
    # every server downloads the stack: the same bytes for all
    assert ev.costs[0].download_bytes == ev.costs[1].download_bytes == sum(c.upload_bytes for c in ev.costs)


def test_more_important_matrix_never_gets_lower_rank_within_a_type():
    problem = random_instance(11, 2, [0, 8, 16, 32])
    choices, _, _, _ = plan_problem(problem, solver="highs", time_limit=60)
    for ch in choices:
        for kind in ("q_proj", "down_proj"):
            mats = sorted((m for m in problem.matrices if m.kind == kind), key=lambda m: -problem.weights[m.name])
            ranks = [ch.ranks.get(m.name, 0) for m in mats]
            assert ranks == sorted(ranks, reverse=True)
