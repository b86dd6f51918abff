"""Aggregation rules: hand-checkable cases first, then properties over random mixed ranks."""

from __future__ import annotations

import math

import pytest
import torch

from fedpipe.aggregators import (
    REGISTRY,
    Aggregator,
    FedIT,
    FlexLoRA,
    FLoRA,
    HetLoRA,
    aggregator_names,
    get_aggregator,
)
from fedpipe.aggregators.linalg import factored_svd, frobenius_norm, stack_factors
from fedpipe.errors import FedpipeError
from fedpipe.lora import ClientUpdate, GlobalAdapter, LoraFactors
from fedpipe.rules import RULES

Q = "model.layers.0.self_attn.q_proj"
V = "model.layers.0.self_attn.v_proj"
SEEDS = [0, 1, 2, 3, 4]


def lf(A, B, scale=1.0) -> LoraFactors:
    return LoraFactors(torch.tensor(A, dtype=torch.float32), torch.tensor(B, dtype=torch.float32),
                       scale)


def random_updates(seed: int, ranks=(2, 4, 8), shape=(12, 10), module=Q,
                   dtype=torch.float32) -> list[ClientUpdate]:
    """One update per rank, random factors, scale alpha/r with alpha in [4, 32), n in [5, 50)."""
    g = torch.Generator().manual_seed(seed)
    m, n = shape
    updates = []
    for k, r in enumerate(ranks):
        A = torch.randn(r, n, generator=g, dtype=dtype)
        B = torch.randn(m, r, generator=g, dtype=dtype)
        alpha = float(torch.randint(4, 32, (1,), generator=g))
        n_k = int(torch.randint(5, 50, (1,), generator=g))
        updates.append(ClientUpdate(f"s{k}", n_k, {module: LoraFactors(A, B, alpha / r)}))
    return updates


def weights(updates, module=Q) -> list[float]:
    ns = [u.n_samples for u in updates if module in u.factors]
    return [n / sum(ns) for n in ns]


def target(updates, module=Q) -> torch.Tensor:
    """Sum p_k s_k B_k A_k in float64, over the servers that adapted `module`."""
    parts = [u.factors[module] for u in updates if module in u.factors]
    return sum(p * f.delta() for p, f in zip(weights(updates, module), parts, strict=True))


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


# --- registry -------------------------------------------------------------------------------


def test_registry_lists_exactly_the_four_rules():
    # Execute
    names = aggregator_names()
    # Assert
    assert names == ["fedit", "flexlora", "flora", "hetlora"]
    assert set(REGISTRY) == set(names)
    for name in names:
        agg = get_aggregator(name)
        assert isinstance(agg, Aggregator) and agg.name == name
    assert get_aggregator("FlexLoRA").name == "flexlora"
    assert set(RULES) == set(names)  # the traits table and the rule classes name the same rules
    assert {n for n in names if REGISTRY[n].merges_into_base} == {"flora"}


def test_unknown_rule_names_the_valid_ones():
    # Execute
    with pytest.raises(FedpipeError) as err:
        get_aggregator("fedavg")
    # Assert
    text = str(err.value)
    assert "fedavg" in text
    for name in ("fedit", "hetlora", "flora", "flexlora"):
        assert name in text


# --- hand cases -----------------------------------------------------------------------------


def test_fedit_hand_case_averages_factors_and_undoes_the_scale():
    # Prepare: rank 1 on a 2x2 matrix, p = 1/4, 3/4, server b's scale 2 is folded into B.
    a = ClientUpdate("a", 1, {Q: lf([[1.0, 0.0]], [[1.0], [0.0]])})
    b = ClientUpdate("b", 3, {Q: lf([[0.0, 1.0]], [[0.0], [1.0]], scale=2.0)})
    # Execute
    g = FedIT().aggregate([a, b], None)
    out = FedIT().broadcast(g, None, ranks={Q: 1}, scales={Q: 2.0})
    # Assert
    assert g.round == 1
    torch.testing.assert_close(g.factors[Q].A, torch.tensor([[0.25, 0.75]]))
    torch.testing.assert_close(g.factors[Q].B, torch.tensor([[0.25], [1.5]]))
    assert g.factors[Q].scale == 1.0
    start = out.adapter_init[Q]
    assert out.base_delta == {}
    assert start.scale == 2.0
    torch.testing.assert_close(start.B, torch.tensor([[0.125], [0.75]]))
    torch.testing.assert_close(start.delta().float(), g.factors[Q].delta().float())


def test_hetlora_hand_case_pads_weights_by_norm_and_truncates():
    # Prepare: ||B_a A_a||_F = 3 (rank 1), ||B_b A_b||_F = 1 (rank 2), equal samples, so the
    # weights are 3/4 and 1/4; a's factors are zero-padded to rank 2.
    a = ClientUpdate("a", 10, {Q: lf([[1.0, 0.0]], [[3.0], [0.0]])})
    b = ClientUpdate("b", 10, {Q: lf([[0.0, 0.0], [0.0, 1.0]], [[0.0, 0.0], [0.0, 1.0]])})
    # Execute
    g = HetLoRA().aggregate([a, b], None)
    to_a = HetLoRA().broadcast(g, None, ranks={Q: 1}, scales={Q: 1.0})
    to_b = HetLoRA().broadcast(g, None, ranks={Q: 2}, scales={Q: 0.5})
    # Assert
    torch.testing.assert_close(g.factors[Q].A, torch.tensor([[0.75, 0.0], [0.0, 0.25]]))
    torch.testing.assert_close(g.factors[Q].B, torch.tensor([[2.25, 0.0], [0.0, 0.25]]))
    torch.testing.assert_close(to_a.adapter_init[Q].A, torch.tensor([[0.75, 0.0]]))
    torch.testing.assert_close(to_a.adapter_init[Q].B, torch.tensor([[2.25], [0.0]]))
    torch.testing.assert_close(to_b.adapter_init[Q].B, torch.tensor([[4.5, 0.0], [0.0, 0.5]]))
    assert to_b.adapter_init[Q].scale == 0.5


def test_hetlora_falls_back_to_sample_weights_when_every_update_is_zero():
    # Prepare
    a = ClientUpdate("a", 1, {Q: lf([[1.0, 0.0]], [[0.0], [0.0]])})
    b = ClientUpdate("b", 3, {Q: lf([[0.0, 1.0]], [[0.0], [0.0]])})
    # Execute
    g = HetLoRA().aggregate([a, b], None)
    # Assert
    torch.testing.assert_close(g.factors[Q].A, torch.tensor([[0.25, 0.75]]))


def test_flora_hand_case_stacks_and_sends_a_fresh_adapter():
    # Prepare
    a = ClientUpdate("a", 1, {Q: lf([[1.0, 0.0]], [[1.0], [0.0]], scale=2.0)})
    b = ClientUpdate("b", 3, {Q: lf([[0.0, 1.0]], [[0.0], [1.0]])})
    # Execute
    g = FLoRA().aggregate([a, b], None)
    out = FLoRA().broadcast(g, None, ranks={Q: 4}, scales={Q: 4.0})
    # Assert: A = [p_a A_a; p_b A_b], B = [s_a B_a, s_b B_b]
    torch.testing.assert_close(g.factors[Q].A, torch.tensor([[0.25, 0.0], [0.0, 0.75]]))
    torch.testing.assert_close(g.factors[Q].B, torch.tensor([[2.0, 0.0], [0.0, 1.0]]))
    assert out.adapter_init == {}
    torch.testing.assert_close(out.base_delta[Q].B, g.factors[Q].B)


def test_flexlora_hand_case_gives_each_server_its_top_components():
    # Prepare: the sum is diag(3, 1) (a: 4 e1e1^T at p = 1/2 with s = 1.5, b: 2 e2e2^T at 1/2)
    a = ClientUpdate("a", 5, {Q: lf([[2.0, 0.0]], [[2.0], [0.0]], scale=1.5)})
    b = ClientUpdate("b", 5, {Q: lf([[0.0, 2.0]], [[0.0], [1.0]])})
    # Execute
    g = FlexLoRA().aggregate([a, b], None)
    out = FlexLoRA().broadcast(g, None, ranks={Q: 1}, scales={Q: 2.0})
    # Assert
    torch.testing.assert_close(g.factors[Q].delta().float(), torch.diag(torch.tensor([3.0, 1.0])))
    start = out.adapter_init[Q]
    assert start.rank == 1 and start.scale == 2.0
    torch.testing.assert_close(start.delta().float(), torch.tensor([[3.0, 0.0], [0.0, 0.0]]))
    torch.testing.assert_close(start.A.abs(), torch.tensor([[math.sqrt(3.0), 0.0]]))


# --- properties over random seeds, ranks 2/4/8 ------------------------------------------------


@pytest.mark.parametrize("seed", SEEDS)
def test_flora_is_exact_and_cumulative_over_rounds(seed):
    # Prepare
    round1 = random_updates(seed)
    round2 = random_updates(seed + 100)
    agg = FLoRA()
    # Execute
    g1 = agg.aggregate(round1, None)
    g2 = agg.aggregate(round2, g1)
    b1 = agg.broadcast(g1, None, ranks={Q: 4}, scales={Q: 2.0})
    b2 = agg.broadcast(g2, g1, ranks={}, scales={})
    g3 = agg.aggregate(round1, g2)
    b3 = agg.broadcast(g3, g2, ranks={Q: 8}, scales={Q: 2.0})
    # Assert
    assert rel(g3.factors[Q].delta(), 2 * target(round1) + target(round2)) < 1e-5
    assert rel(b3.base_delta[Q].delta(), target(round1)) < 1e-5
    assert rel(g1.factors[Q].delta(), target(round1)) < 1e-5
    assert rel(g2.factors[Q].delta(), target(round1) + target(round2)) < 1e-5
    assert rel(b1.base_delta[Q].delta(), target(round1)) < 1e-5
    assert rel(b2.base_delta[Q].delta(), target(round2)) < 1e-5  # also sent to a non-adapter
    assert b1.adapter_init == {} and b2.adapter_init == {}
    assert g1.factors[Q].rank == 14 and g2.factors[Q].rank == 10 + 14  # previous capped at 10
    assert g2.round == 2 and g2.factors[Q].A.dtype == torch.float32


def test_flora_keeps_modules_nobody_updated_and_sends_no_delta_for_them():
    # Prepare
    g1 = FLoRA().aggregate(random_updates(0, module=V), None)
    # Execute
    g2 = FLoRA().aggregate(random_updates(1), g1)
    out = FLoRA().broadcast(g2, g1, ranks={Q: 2, V: 2}, scales={Q: 1.0, V: 1.0})
    # Assert
    assert set(g2.factors) == {Q, V}
    assert rel(g2.factors[V].delta(), g1.factors[V].delta()) < 1e-6
    assert set(out.base_delta) == {Q}


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("shape", [(12, 10), (40, 30)])  # total rank 14: dense / factored path
def test_flexlora_starts_are_best_rank_r_approximations(seed, shape):
    # Prepare
    updates = random_updates(seed, shape=shape)
    dW = target(updates)
    S = torch.linalg.svdvals(dW)
    agg = FlexLoRA()
    # Execute
    g = agg.aggregate(updates, None)
    starts = {r: agg.broadcast(g, None, ranks={Q: r}, scales={Q: 16.0 / r}).adapter_init[Q]
              for r in (2, 4, 8)}
    # Assert: the global is dW itself, each start its truncated SVD
    assert rel(g.factors[Q].delta(), dW) < 1e-5
    for r, start in starts.items():
        approx = start.delta()
        assert start.rank == r and start.scale == 16.0 / r
        torch.testing.assert_close(torch.linalg.svdvals(approx)[:r], S[:r],
                                   rtol=1e-5, atol=1e-6 * float(S[0]))
        tail = float(S[r:].square().sum().sqrt())
        assert abs(float((dW - approx).norm()) - tail) < 1e-5 * float(S[0])
        U, _, Vh = torch.linalg.svd(dW)
        best = U[:, :r] @ torch.diag(S[:r]) @ Vh[:r]
        assert rel(approx, best) < 1e-4


@pytest.mark.parametrize("seed", SEEDS)
def test_fedit_gap_is_minus_the_factor_covariance(seed):
    # Prepare: equal ranks, scales folded
    updates = random_updates(seed, ranks=(4, 4, 4))
    p = weights(updates)
    folded = [u.factors[Q].folded() for u in updates]
    # Execute
    g = FedIT().aggregate(updates, None)
    # Assert
    A_bar = sum(pk * f.A.double() for pk, f in zip(p, folded, strict=True))
    B_bar = sum(pk * f.B.double() for pk, f in zip(p, folded, strict=True))
    torch.testing.assert_close(g.factors[Q].A.double(), A_bar, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(g.factors[Q].B.double(), B_bar, rtol=1e-5, atol=1e-5)
    gap = g.factors[Q].delta() - target(updates)
    covariance = sum(pk * (f.B.double() - B_bar) @ (f.A.double() - A_bar)
                     for pk, f in zip(p, folded, strict=True))
    assert rel(gap, -covariance) < 1e-5


@pytest.mark.parametrize("seed", SEEDS)
def test_fedit_and_hetlora_zero_pad_to_the_largest_rank(seed):
    # Prepare
    updates = random_updates(seed)
    p = weights(updates)
    norms = [pk * f.scale * frobenius_norm(f.B, f.A)
             for pk, f in zip(p, (u.factors[Q] for u in updates), strict=True)]
    w = [x / sum(norms) for x in norms]
    # Execute
    fedit = FedIT().aggregate(updates, None).factors[Q]
    het = HetLoRA().aggregate(updates, None).factors[Q]
    # Assert: row block i of A_bar only has the servers with rank > i
    for g, ws in ((fedit, p), (het, w)):
        assert g.rank == 8
        for lo, hi in ((0, 2), (2, 4), (4, 8)):
            rows = sum(wk * u.factors[Q].A[lo:hi] for wk, u in zip(ws, updates, strict=True)
                       if u.factors[Q].rank >= hi)
            torch.testing.assert_close(g.A[lo:hi], rows, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("seed", SEEDS)
def test_frobenius_norm_matches_the_dense_product(seed):
    # Prepare
    f = random_updates(seed)[2].factors[Q]
    # Execute / Assert
    assert frobenius_norm(f.B, f.A) == pytest.approx(float((f.B.double() @ f.A.double()).norm()),
                                                     rel=1e-6)


@pytest.mark.parametrize("seed", SEEDS)
def test_factored_svd_matches_dense_svd_without_a_dense_svd(seed, monkeypatch):
    # Prepare: total rank 14 on 60 x 50
    updates = random_updates(seed, shape=(60, 50), dtype=torch.float64)
    stacked = stack_factors([(u.factors[Q], p) for u, p in zip(updates, weights(updates),
                                                                 strict=True)], balanced=True)
    dense = torch.linalg.svdvals(target(updates))
    seen = []
    svd = torch.linalg.svd
    monkeypatch.setattr(torch.linalg, "svd", lambda X, **kw: seen.append(X.shape) or svd(X, **kw))
    # Execute
    U, S, Vh = factored_svd(stacked.B, stacked.A)
    # Assert
    assert seen == [(14, 14)]
    torch.testing.assert_close(S, dense[:14], rtol=1e-10, atol=1e-12)
    assert rel(U @ torch.diag(S) @ Vh, target(updates)) < 1e-12
    torch.testing.assert_close(U.T @ U, torch.eye(14, dtype=torch.float64))
    torch.testing.assert_close(Vh @ Vh.T, torch.eye(14, dtype=torch.float64))


# --- participation, scales, devices, errors -----------------------------------------------------


@pytest.mark.parametrize("rule", ["fedit", "hetlora", "flora", "flexlora"])
def test_module_adapted_by_some_servers_uses_renormalised_weights(rule):
    # Prepare: a adapts q and v, b only q; so v is a's update alone (weight 1, not n_a / (n_a+n_b))
    a, b = random_updates(7, ranks=(4, 4))
    a.factors[V] = random_updates(8, ranks=(4,), module=V)[0].factors[V]
    agg = get_aggregator(rule)
    # Execute
    g = agg.aggregate([a, b], None)
    # Assert
    assert rel(g.factors[V].delta(), a.factors[V].delta()) < 1e-5
    if rule in ("flora", "flexlora"):
        assert rel(g.factors[Q].delta(), target([a, b])) < 1e-5


@pytest.mark.parametrize("rule", ["fedit", "hetlora", "flexlora"])
def test_broadcast_follows_the_servers_ranks(rule):
    # Prepare
    agg = get_aggregator(rule)
    g = agg.aggregate(random_updates(3), None)
    # Execute: no q in ranks -> nothing; rank for v that nobody trained -> nothing (fresh init)
    skip = agg.broadcast(g, None, ranks={V: 4}, scales={V: 1.0})
    zero = agg.broadcast(g, None, ranks={Q: 0}, scales={})
    # Assert
    assert skip.adapter_init == {} and skip.base_delta == {}
    assert zero.adapter_init == {}


@pytest.mark.parametrize("rule", ["fedit", "hetlora", "flexlora"])
def test_padded_components_keep_the_start_and_can_still_learn(rule):
    # Prepare: global rank 2 (fedit, hetlora) or at most 4 (flexlora: rank of the sum), server 16
    agg = get_aggregator(rule)
    g = agg.aggregate(random_updates(4, ranks=(2, 2), shape=(40, 30)), None)
    r_g = g.factors[Q].rank
    # Execute
    start = agg.broadcast(g, None, ranks={Q: 16}, scales={Q: 0.5}).adapter_init[Q]
    # Assert
    assert start.rank == 16
    assert rel(start.delta(), g.factors[Q].delta()) < 1e-6
    assert (start.B[:, r_g:] == 0).all()
    assert (start.A[r_g:].abs().sum(dim=1) > 0).all()
    assert start.A[r_g:].abs().max() <= 1 / math.sqrt(30)


@pytest.mark.parametrize("rule", ["fedit", "hetlora", "flexlora"])
def test_modules_nobody_adapted_this_round_are_carried_over(rule):
    # Prepare
    agg = get_aggregator(rule)
    g1 = agg.aggregate(random_updates(5, module=V), None)
    # Execute
    g2 = agg.aggregate(random_updates(6), g1)
    # Assert
    assert set(g2.factors) == {Q, V} and g2.round == 2
    assert rel(g2.factors[V].delta(), g1.factors[V].delta()) < 1e-6


@pytest.mark.parametrize("rule", ["fedit", "hetlora", "flora", "flexlora"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64])
def test_outputs_are_float32_with_scales_folded(rule, dtype):
    # Prepare
    updates = random_updates(9, dtype=dtype)
    # Execute
    g = get_aggregator(rule).aggregate(updates, None)
    # Assert
    f = g.factors[Q]
    assert f.A.dtype == f.B.dtype == torch.float32 and f.scale == 1.0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("rule", ["fedit", "hetlora", "flora", "flexlora"])
def test_tensors_stay_on_their_device(rule):
    # Prepare
    updates = random_updates(10, shape=(40, 30))
    for u in updates:
        u.factors = {k: LoraFactors(f.A.cuda(), f.B.cuda(), f.scale) for k, f in u.factors.items()}
    agg = get_aggregator(rule)
    # Execute
    g = agg.aggregate(updates, None)
    g2 = agg.aggregate(updates, g)
    out = agg.broadcast(g2, g, ranks={Q: 16}, scales={Q: 2.0})
    # Assert
    tensors = [t for f in (*g2.factors.values(), *out.base_delta.values(),
                           *out.adapter_init.values()) for t in (f.A, f.B)]
    assert tensors and all(t.is_cuda for t in tensors)
    if rule in ("flora", "flexlora"):
        assert rel(g.factors[Q].delta().cpu(), target(updates).cpu()) < 1e-5


def test_mismatched_shapes_name_the_server_and_module():
    # Prepare
    a = random_updates(0, ranks=(2,))[0]
    b = ClientUpdate("edge-b", 3, {Q: LoraFactors(torch.zeros(2, 9), torch.zeros(12, 2))})
    # Execute
    with pytest.raises(FedpipeError) as err:
        FlexLoRA().aggregate([a, b], None)
    # Assert
    assert "edge-b" in str(err.value) and Q in str(err.value)


def test_servers_without_samples_are_rejected_clearly():
    # Prepare
    updates = random_updates(0, ranks=(2, 2))
    for u in updates:
        u.n_samples = 0
    # Execute / Assert
    with pytest.raises(FedpipeError, match="0 samples"):
        FedIT().aggregate(updates, None)


def test_previous_round_starts_at_one_and_counts_up():
    # Prepare
    previous = GlobalAdapter({}, round=4)
    # Execute
    g = HetLoRA().aggregate(random_updates(0), previous)
    # Assert
    assert g.round == 5


def test_flexlora_modules_on_worker_threads_give_the_serial_result():
    # Prepare: six modules, three servers each
    updates = random_updates(11, shape=(40, 30))
    for i in range(5):
        name = f"model.layers.{i}.mlp.up_proj"
        for u, v in zip(updates, random_updates(20 + i, shape=(40, 30), module=name), strict=True):
            u.factors[name] = v.factors[name]
    threads = torch.get_num_threads()
    serial, pooled = FlexLoRA(), FlexLoRA()
    serial.workers, pooled.workers = 1, 3
    # Execute
    a = serial.aggregate(updates, None)
    b = pooled.aggregate(updates, None)
    # Assert: bitwise equal, every module there, torch's thread count restored
    assert a.factors.keys() == b.factors.keys() and len(a.factors) == 6
    for name in a.factors:
        assert torch.equal(a.factors[name].A, b.factors[name].A)
        assert torch.equal(a.factors[name].B, b.factors[name].B)
    assert torch.get_num_threads() == threads
