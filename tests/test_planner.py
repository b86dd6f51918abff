"""Planner: the MILP's optimum equals brute force on small instances; plans respect every budget."""

import itertools
import random
from pathlib import Path

import numpy as np
import pytest
import yaml
from peft import LoraConfig

from fedpipe.errors import FedpipeError
from fedpipe.importance import ImportanceReport
from fedpipe.plan import load_plan, save_plan
from fedpipe.planning.cost import server_cost
from fedpipe.planning.planner import make_plan, plan_problem
from fedpipe.planning.problem import Choice, build_problem, evaluate
from fedpipe.profile import parse_profile
from fedpipe.shapes import shapes_from_config

ROOT = Path(__file__).parent.parent
# Llama-7B-wide, two layers: realistic GiB-sized coefficients, few matrices.
SHAPES = shapes_from_config({"hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 2,
                             "num_attention_heads": 32, "vocab_size": 32000}, "tiny-wide")


def random_instance(seed: int, n_servers: int, ranks: list[int], aggregation: str = "hetlora"):
    rng = random.Random(seed)
    servers = [{"name": f"s{i}", "memory_gib": rng.choice([2.0, 2.6, 3.0, 4.0, 8.0]),
                "tflops": rng.choice([0.5, 2.0, 10.0]), "uplink_mbps": rng.choice([5, 50, 500]),
                "downlink_mbps": rng.choice([20, 200]), "samples": rng.randint(50, 500)}
               for i in range(n_servers)]
    profile = parse_profile({
        "model": "tiny-wide", "aggregation": aggregation,
        "task": {"seq_len": 256, "local_steps": 2},
        "candidates": {"targets": ["q_proj", "down_proj"], "ranks": ranks, "bits": [4, 16],
                       "batch_sizes": [1, 2], "densities": [1.0, 0.25]},
        "objective": {"time_weight": rng.choice([0.05, 0.3, 1.0])},
        "servers": servers,
    })
    scores = {m.name: rng.random() for m in SHAPES.matrices}
    return build_problem(profile, SHAPES, ImportanceReport(scorer="test", model="tiny-wide", scores=scores))


def per_server_options(problem, k):
    """Every (choice, quality term, round time) a server can run within its memory."""
    cls, names = problem.classes[k], [m.name for m in problem.matrices]
    by_name = {m.name: m for m in problem.matrices}
    out = []
    for q, b, d in problem.configs(k):
        for ranks in itertools.product(problem.ranks, repeat=len(names)):
            pattern = {n: r for n, r in zip(names, ranks, strict=True) if r > 0}
            down = sum(problem.cost.wire_bytes(by_name[n], r, d) for n, r in pattern.items())
            c = server_cost(problem.cost, cls.rep, q, b, pattern, by_name, down, d)
            if c.memory_gib <= cls.rep.memory_gib:
                cov = sum(problem.weights[n] * problem.gain(r) for n, r in pattern.items())
                out.append((problem.omega[k] * problem.config_factor(q, b, d) * cov, c.round_s))
    return np.array(out)


def brute_force_objective(problem) -> float:
    options = [per_server_options(problem, k) for k in range(len(problem.classes))]
    grids = np.meshgrid(*[o[:, 0] for o in options], indexing="ij")
    times = np.meshgrid(*[o[:, 1] for o in options], indexing="ij")
    quality = sum(grids)
    makespan = np.maximum.reduce(times)
    lam = problem.profile.objective.time_weight / problem.t_ref
    return float((quality - lam * makespan).max())


def enumerated_optimum(problem) -> float:
    """The best objective over every combination of every server's choices, by `evaluate`
    (so couplings such as flora's stacked download are exact)."""
    names = [m.name for m in problem.matrices]
    options = [[Choice(q, b, {n: r for n, r in zip(names, rs, strict=True) if r > 0}, d)
                for q, b, d in problem.configs(k)
                for rs in itertools.product(problem.ranks, repeat=len(names))]
               for k in range(len(problem.classes))]
    return max(e.objective for combo in itertools.product(*options)
               for e in [evaluate(problem, list(combo))]
               if all(c.memory_gib <= cls.rep.memory_gib for c, cls in zip(e.costs, problem.classes, strict=True)))


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


def _link_profile(mbps: float, densities: list[float] | None = None, **objective):
    """One server whose links we vary next to a fast hub: which density does the planner pick?"""
    candidates = {"targets": ["q_proj", "v_proj"], "ranks": [0, 4, 8], "bits": [16],
                  "batch_sizes": [4]}
    if densities is not None:
        candidates["densities"] = densities
    return {"model": "smollm2-135m", "task": {"seq_len": 64, "local_steps": 5},
            "candidates": candidates, "objective": objective,
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
    fast = _plan_for(tmp_path, _link_profile(1000), method)
    slow = _plan_for(tmp_path, _link_profile(2), method)
    assert fast["edge"].upload_density == fast["edge"].download_density == 1.0
    assert slow["edge"].upload_density < 1.0
    assert slow["edge"].download_density == slow["edge"].upload_density  # not flora: both ways
    assert slow["hub"].upload_density == 1.0  # the hub's link is never the bottleneck
    d = slow["edge"].upload_density
    dense = 4 * slow["edge"].predicted.lora_params
    assert slow["edge"].predicted.upload_bytes == pytest.approx(dense * (d + min(1 / 32, d)), rel=1e-6)


def test_dense_only_ladder_and_flora_download(tmp_path):
    only_dense = _plan_for(tmp_path, _link_profile(2, densities=[1.0]))
    assert only_dense["edge"].upload_density == 1.0
    flora = _plan_for(tmp_path, {**_link_profile(2), "aggregation": "flora"})
    assert flora["edge"].upload_density < 1.0 and flora["edge"].download_density == 1.0


def test_density_without_quality_entry_is_a_clear_error():
    raw = _link_profile(1, densities=[1.0, 0.5])
    with pytest.raises(FedpipeError) as e:
        parse_profile(raw)
    assert "density_quality" in str(e.value.problems) and "0.5" in str(e.value.problems)
    raw = _link_profile(1, densities=[1.0, 1.5])
    with pytest.raises(FedpipeError) as e:
        parse_profile(raw)
    assert "candidates.densities" in str(e.value.problems)
