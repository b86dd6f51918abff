"""Strategies (`fedpipe plan --strategy`): every rule's plan fits memory, validates, and does what
its paper says; bad names and servers no rule can fit are clear errors (exit 2)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from fedpipe.cli import app
from fedpipe.errors import FedpipeError
from fedpipe.plan import load_plan, save_plan
from fedpipe.planning.problem import build_problem
from fedpipe.planning.strategies import get_strategy, make_plan, strategy_names
from fedpipe.planning.strategies.capacity import capacities
from fedpipe.profile import load_profile
from fedpipe.shapes import load_shapes

ROOT = Path(__file__).resolve().parents[2]
PROFILES = sorted((ROOT / "profiles").glob("*.yaml"))
HEURISTICS = [n for n in strategy_names() if n != "fedpipe"]


def layer_of(name: str) -> int:
    return int(name.split(".")[2])


@pytest.fixture(scope="module")
def cluster_plans() -> dict:
    return {n: make_plan(ROOT / "profiles" / "cluster.yaml", n) for n in strategy_names()}


@pytest.mark.parametrize("profile", PROFILES, ids=lambda p: p.stem)
@pytest.mark.parametrize("name", strategy_names())
def test_every_strategy_fits_memory_and_validates(profile: Path, name: str, tmp_path: Path) -> None:
    plan = make_plan(profile, name)
    assert plan.strategy == name
    for s in plan.servers:
        assert s.predicted.memory_gib <= s.predicted.memory_budget_gib * (1 + 1e-9), s.name
        assert s.rank_pattern, f"{name} adapts nothing on {s.name}"
    again = load_plan(save_plan(plan, tmp_path / "p.plan.yaml"))
    assert again == plan


def test_homogeneous_is_the_planners_own_baseline(cluster_plans: dict) -> None:
    homogeneous, fedpipe = cluster_plans["homogeneous"], cluster_plans["fedpipe"]
    b = fedpipe.baseline
    assert {(s.bits, s.batch_size, len(s.rank_pattern)) for s in homogeneous.servers} == {
        (b.bits, b.batch_size, b.adapted_matrices)}
    assert all(s.upload_density == s.download_density == 1.0 for s in homogeneous.servers)
    assert homogeneous.summary == b.summary  # its own predictions, not the optimiser's


def test_uniform_and_topk_use_one_rank_everywhere(cluster_plans: dict) -> None:
    for name in ("uniform", "importance-topk"):
        ranks = {r for s in cluster_plans[name].servers for r in s.rank_pattern.values()}
        assert len(ranks) == 1, name
    n_all = len(cluster_plans["uniform"].servers[0].rank_pattern)
    assert all(len(s.rank_pattern) == n_all for s in cluster_plans["uniform"].servers)
    assert all(len(s.rank_pattern) < n_all for s in cluster_plans["importance-topk"].servers)


def test_hetlora_rank_grows_with_capacity(cluster_plans: dict) -> None:
    profile = load_profile(ROOT / "profiles" / "cluster.yaml")
    problem = build_problem(profile, load_shapes(profile.model))
    cap = dict(zip((c.rep.name for c in problem.classes), capacities(problem), strict=True))
    plan = cluster_plans["hetlora"]
    rank = {s.name: set(s.rank_pattern.values()) for s in plan.servers}
    assert all(len(r) == 1 for r in rank.values())  # one rank per server, on every matrix
    by_cap = sorted(plan.servers, key=lambda s: cap[s.name])
    ranks = [max(rank[s.name]) for s in by_cap]
    assert ranks == sorted(ranks) and ranks[0] < ranks[-1]


def test_legend_adapts_a_suffix_with_ranks_nondecreasing_in_depth(cluster_plans: dict) -> None:
    plan = cluster_plans["legend"]
    layers = 30  # SmolLM2-135M
    depths = []
    for s in plan.servers:
        by_layer: dict[int, set[int]] = {}
        for name, r in s.rank_pattern.items():
            by_layer.setdefault(layer_of(name), set()).add(r)
        adapted = sorted(by_layer)
        assert adapted == list(range(layers - len(adapted), layers)), s.name  # a suffix
        tops = [max(by_layer[layer]) for layer in adapted]
        assert all(len(by_layer[layer]) == 1 for layer in adapted)
        assert tops == sorted(tops), s.name
        depths.append(len(adapted))
    assert min(depths) < max(depths)  # depth follows capacity


def test_a_server_no_rule_can_fit_is_named(tmp_path: Path) -> None:
    raw = yaml.safe_load((ROOT / "profiles" / "cluster.yaml").read_text())
    raw["candidates"]["ranks"] = [0, 1024]  # rank 1024 on every matrix cannot fit the jetson
    path = tmp_path / "tight.yaml"
    path.write_text(yaml.safe_dump(raw))
    for name in ("uniform", "hetlora"):
        with pytest.raises(FedpipeError) as err:
            make_plan(path, name)
        assert "jetson" in str(err.value) and "short by" in str(err.value), name


def test_bad_strategy_exits_2_with_the_valid_names(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["plan", str(ROOT / "profiles" / "cluster.yaml"),
                                      "--strategy", "nope", "-o", str(tmp_path / "x.yaml")])
    assert result.exit_code == 2
    assert all(n in result.output for n in strategy_names())
    assert not (tmp_path / "x.yaml").exists()
    with pytest.raises(FedpipeError):
        get_strategy("nope")


def test_cli_writes_strategy_plan_beside_the_default(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, ["plan", str(ROOT / "profiles" / "cluster.yaml"),
                                      "--strategy", "HetLoRA", "--importance", "prior"])
    assert result.exit_code == 0, result.output
    assert "strategy hetlora" in result.output
    assert load_plan(tmp_path / "plans" / "cluster.hetlora.plan.yaml").strategy == "hetlora"
