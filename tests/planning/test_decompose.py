"""Decomposed planner: equal to brute force and the MILP on small instances, honest bounds, budgets
kept, identical servers treated alike, and a thousand servers planned as a handful of classes."""

import itertools
import random
from pathlib import Path

import pytest
from instances import SHAPES, brute_force_objective, enumerated_optimum, random_instance
from typer.testing import CliRunner

import fedpipe.planning.decompose as decompose
from fedpipe.cli import app
from fedpipe.errors import FedpipeError
from fedpipe.importance import ImportanceReport
from fedpipe.plan import load_plan
from fedpipe.planning.milp import milp_size, solve_baseline, solve_milp
from fedpipe.planning.planner import AUTO_MILP_ROWS, choose_method, plan_problem
from fedpipe.planning.problem import build_problem, evaluate, hardware_key
from fedpipe.profile import parse_profile
from fedpipe.shapes import load_shapes

DATA = Path(__file__).parents[1] / "data"


def _objective_with_same_scale(problem, method):
    """Plan with `method` after fixing T_ref from the MILP baseline, so objectives compare."""
    choices, _ = solve_baseline(problem, "highs", 60)
    problem.t_ref = max(evaluate(problem, choices).makespan, 1e-9)
    if method == "milp":
        choices, report = solve_milp(problem, "highs", 60)
    else:
        choices, report = decompose.solve_decomposed(problem)
    return choices, evaluate(problem, choices), report


@pytest.mark.parametrize("seed", range(5))
def test_decomposed_matches_brute_force_two_servers(seed):
    problem = random_instance(seed, 2, [0, 8, 16])
    _, ev, report, _ = plan_problem(problem, method="decomposed")
    assert report.method == "decomposed" and report.status == "optimal" and report.gap <= 1e-4
    assert ev.objective == pytest.approx(brute_force_objective(problem), rel=1e-6, abs=1e-9)


@pytest.mark.parametrize("seed", range(3))
def test_decomposed_matches_brute_force_three_servers(seed):
    problem = random_instance(100 + seed, 3, [0, 16])
    _, ev, report, _ = plan_problem(problem, method="decomposed")
    assert ev.objective == pytest.approx(brute_force_objective(problem), rel=1e-6, abs=1e-9)
    assert report.objective == pytest.approx(ev.objective)


@pytest.mark.parametrize("kind", ["weighted", "rate"])
@pytest.mark.parametrize("seed", range(6))
def test_decomposed_matches_brute_force_with_wire_precisions(seed, kind):
    """Precision in the choice set (brute force over the full ladders, dominated pairs included);
    across these instances both lower precisions and sparse densities get chosen."""
    problem = random_instance(300 + seed, 2, [0, 16], kind=kind,
                              precisions=["fp32", "bf16", "int8", "nf4"])
    choices, ev, report, _ = plan_problem(problem, method="decomposed")
    assert report.status == "optimal"
    assert ev.objective == pytest.approx(brute_force_objective(problem), rel=1e-6, abs=1e-9)


def test_wire_precisions_get_chosen_in_the_brute_force_instances():
    """The instances above are not all fp32: the comparison covers real precision choices."""
    chosen = set()
    for seed, kind in itertools.product(range(6), ["weighted", "rate"]):
        problem = random_instance(300 + seed, 2, [0, 16], kind=kind,
                                  precisions=["fp32", "bf16", "int8", "nf4"])
        chosen |= {(c.density, c.precision) for c in plan_problem(problem, method="decomposed")[0]}
    assert {p for _, p in chosen} == {"fp32", "bf16", "int8", "nf4"}
    assert {d for d, _ in chosen} == {1.0, 0.25}


@pytest.mark.parametrize("seed", range(3))
def test_lp_window_path_bound_is_valid_and_plan_close(seed, monkeypatch):
    """Forcing the LP-guided search (no exhaustive enumeration): the proven bound really bounds
    the brute-force optimum and the plan is within the reported gap of it."""
    monkeypatch.setattr(decompose, "EXHAUSTIVE_COMBOS", 0)
    problem = random_instance(200 + seed, 2, [0, 8, 16])
    _, ev, report, _ = plan_problem(problem, method="decomposed")
    best = brute_force_objective(problem)
    bound = ev.objective / (1 - report.gap) if ev.objective > 0 else ev.objective + report.gap
    assert bound >= best - 1e-9
    assert ev.objective >= best - abs(best) * 1e-2


def _smollm_instance(seed: int, n: int, aggregation: str = "hetlora"):
    """Three cost groups of 30 matrices: too many combinations to enumerate (the LP path)."""
    rng = random.Random(seed)
    servers = [{"name": f"e{i}", "memory_gib": rng.choice([0.9, 1.2, 2.0]), "tflops": rng.choice([1, 5, 20]),
                "uplink_mbps": rng.choice([5, 50, 500]), "downlink_mbps": rng.choice([20, 200]),
                "samples": rng.randint(50, 500)} for i in range(n)]
    profile = parse_profile({
        "model": "smollm2-135m", "aggregation": aggregation, "task": {"seq_len": 128, "local_steps": 5},
        "candidates": {"targets": ["q_proj", "k_proj", "gate_proj"], "ranks": [0, 4, 8, 16],
                       "bits": [4, 16], "batch_sizes": [2, 4]},
        "objective": {"time_weight": rng.choice([0.1, 0.3])}, "servers": servers})
    return build_problem(profile, load_shapes("smollm2-135m"))


def test_decomposed_matches_milp_with_many_matrices():
    problem = _smollm_instance(0, 3)
    assert not decompose.exhaustive_possible(decompose.tables_for(problem))
    _, ev_m, rep_m = _objective_with_same_scale(problem, "milp")
    _, ev_d, rep_d = _objective_with_same_scale(problem, "decomposed")
    assert rep_m.status == "optimal"
    assert ev_d.objective >= ev_m.objective * (1 - 1e-3)
    # the decomposed bound also bounds the MILP's proven optimum
    assert ev_m.objective <= ev_d.objective / (1 - rep_d.gap) + 1e-9


@pytest.mark.parametrize("seed", [0, 3, 4])
def test_flora_decomposed_close_to_enumeration(seed):
    problem = random_instance(seed, 2, [0, 16], aggregation="flora")
    choices, ev, report, _ = plan_problem(problem, method="decomposed")
    best = enumerated_optimum(problem)
    assert ev.objective >= best - 1e-2 * abs(best)
    assert report.status in ("optimal", "feasible")
    assert ev.objective <= best + 1e-9  # never better than the true optimum: costs are honest
    # everyone downloads the whole stack, dense (float32), whatever each upload's density
    assert ev.costs[0].download_bytes == 4 * sum(c.lora_params for c in ev.costs)


def test_identical_hardware_gets_identical_configuration():
    servers = [{"name": f"twin{i}", "memory_gib": 3.0, "tflops": 2.0, "uplink_mbps": 50,
                "downlink_mbps": 200, "samples": 100 + 37 * i} for i in range(4)]
    servers += [{"name": "big", "memory_gib": 8.0, "tflops": 10.0, "uplink_mbps": 500,
                 "downlink_mbps": 200, "samples": 300, "count": 3}]
    profile = parse_profile({
        "model": "tiny-wide", "task": {"seq_len": 256, "local_steps": 2},
        "candidates": {"targets": ["q_proj", "down_proj"], "ranks": [0, 8, 16], "bits": [4, 16],
                       "batch_sizes": [1, 2]}, "servers": servers})
    scores = {m.name: 1.0 + i for i, m in enumerate(SHAPES.matrices)}
    problem = build_problem(profile, SHAPES, ImportanceReport(scorer="t", model="tiny-wide", scores=scores))
    assert len(problem.classes) == 5  # samples differ: five classes, two kinds of hardware
    choices, ev, report, _ = plan_problem(problem, method="decomposed")
    twins = {(c.bits, c.batch, tuple(sorted(c.ranks.items()))) for c in choices[:4]}
    assert len(twins) == 1
    milp, _ = solve_milp(problem, "highs", 60)
    assert ev.objective == pytest.approx(evaluate(problem, milp).objective, rel=1e-4, abs=1e-9)


@pytest.mark.parametrize("seed", range(4))
def test_memory_and_deadline_never_violated(seed):
    problem = random_instance(300 + seed, 3, [0, 8, 16])
    _, ev, _, _ = plan_problem(problem, method="decomposed")
    raw = problem.profile.model_dump()
    raw["objective"]["deadline_s"] = ev.makespan * 0.8
    tight = build_problem(parse_profile(raw), SHAPES, problem.importance)
    try:
        _, ev2, _, _ = plan_problem(tight, method="decomposed")
    except FedpipeError as e:  # a deadline below the fastest round is reported, not ignored
        assert "deadline" in str(e)
        return
    assert ev2.makespan <= ev.makespan * 0.8 * (1 + 1e-9)
    for c, cls in zip(ev2.costs, tight.classes, strict=True):
        assert c.memory_gib <= cls.rep.memory_gib


def test_baseline_matches_milp_baseline():
    for seed in range(3):
        problem = random_instance(400 + seed, 3, [0, 8, 16])
        milp = solve_baseline(problem, "highs", 60)
        dec = decompose.solve_baseline_decomposed(problem)
        assert evaluate(problem, dec).quality == pytest.approx(evaluate(problem, milp[0]).quality, rel=1e-9)


def test_method_choice_and_validation():
    tiny = random_instance(0, 2, [0, 8, 16])
    assert milp_size(tiny) <= AUTO_MILP_ROWS and choose_method(tiny, "auto") == "milp"
    assert choose_method(_smollm_instance(0, 3), "auto") == "decomposed"
    with pytest.raises(FedpipeError, match="method"):
        plan_problem(tiny, method="simplex")


def test_cli_method_option(tmp_path):
    out = tmp_path / "small.plan.yaml"
    result = CliRunner().invoke(app, ["plan", str(DATA / "small.yaml"), "-o", str(out),
                                      "--method", "decomposed"])
    assert result.exit_code == 0, result.output
    plan = load_plan(out)
    assert plan.solver.method == "decomposed" and plan.solver.status in ("optimal", "feasible")


def _fleet(n: int, classes: int = 20):
    rng = random.Random(7)
    kinds = [{"memory_gib": m, "tflops": t, "uplink_mbps": u, "downlink_mbps": d}
             for m, t, u, d in itertools.islice(itertools.product([48, 80, 141, 192, 320], [60, 250, 900],
                                                                  [100, 1000], [500, 5000]), 0, None, 3)]
    kinds = kinds[:classes]
    servers = [{"name": f"n{i}", **rng.choice(kinds), "samples": rng.randint(100, 10000)} for i in range(n)]
    profile = parse_profile({
        "model": "llama-2-70b", "task": {"seq_len": 256, "local_steps": 10},
        "candidates": {"ranks": [0, 4, 8, 16, 32, 64], "bits": [4, 8, 16], "batch_sizes": [1, 2, 4, 8]},
        "servers": servers})
    return build_problem(profile, load_shapes("llama-2-70b")), len(kinds)


def test_thousand_servers_plan_as_hardware_classes():
    problem, n_kinds = _fleet(1000)
    assert n_kinds == 20 and len(problem.classes) > 900
    choices, ev, report, baseline = plan_problem(problem, time_limit=120)
    assert report.method == "decomposed" and report.status in ("optimal", "feasible")
    assert report.gap is not None and report.gap <= 1e-3
    by_hw = {}
    for cls, ch, c in zip(problem.classes, choices, ev.costs, strict=True):
        assert c.memory_gib <= cls.rep.memory_gib
        by_hw.setdefault(hardware_key(cls.rep), set()).add(id(ch))
    assert len(by_hw) == n_kinds and all(len(v) == 1 for v in by_hw.values())
    assert baseline is not None and ev.objective > 0
