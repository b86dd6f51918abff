"""Thresholded global rank: the kept components, the reported error, flexlora and flora with it."""

from __future__ import annotations

import math

import pytest
import torch

from fedpipe.aggregators import (
    FlexLoRA,
    FLoRA,
    Truncation,
    cut_metrics,
    get_aggregator,
    truncate,
)
from fedpipe.aggregators.truncate import kept_rank, truncate_svd
from fedpipe.errors import FedpipeError
from fedpipe.lora import ClientUpdate, GlobalAdapter, LoraFactors


@pytest.mark.parametrize("rule,k", [
    (None, 3), (Truncation(), 3), (Truncation(energy=0.9), 2), (Truncation(energy=9 / 14), 1),
    (Truncation(energy=0.5), 1), (Truncation(max_rank=2), 2), (Truncation(energy=0.99, max_rank=1), 1),
])
def test_kept_rank_by_hand(rule, k):
    # sigma^2 = 9, 4, 1 of 14: 9/14 = 0.64, 13/14 = 0.93
    assert kept_rank(torch.tensor([3.0, 2.0, 1.0]), rule) == k


def test_kept_rank_keeps_one_of_a_zero_update_and_skips_round_off():
    assert kept_rank(torch.zeros(3), Truncation(energy=0.5)) == 1
    assert kept_rank(torch.tensor([1.0, 1e-9]), Truncation()) == 1  # below the numerical rank


def test_truncate_svd_by_hand():
    # Prepare: dW = diag(3, 2, 1) as its own SVD.
    eye = torch.eye(3)
    # Execute
    f, cut = truncate_svd(eye, torch.tensor([3.0, 2.0, 1.0]), eye, Truncation(energy=0.9))
    # Assert
    assert torch.allclose(f.B @ f.A, torch.diag(torch.tensor([3.0, 2.0, 0.0])))
    assert (cut.rank_before, cut.rank) == (3, 2)
    assert cut.error == pytest.approx(1.0) and cut.norm == pytest.approx(math.sqrt(14))
    assert cut.relative == pytest.approx(1 / math.sqrt(14))


def test_truncate_any_adapter_is_the_best_rank_k_approximation():
    # Prepare: non-orthogonal factors of rank 3 (the form fedit's averages have).
    g = torch.Generator().manual_seed(0)
    f = LoraFactors(torch.randn(3, 7, generator=g), torch.randn(5, 3, generator=g), scale=0.5)
    dense = f.delta()
    # Execute
    out, cuts = truncate(GlobalAdapter({"m": f}, round=4), Truncation(max_rank=1))
    # Assert: Eckart-Young, against the dense SVD.
    U, S, Vh = torch.linalg.svd(dense)
    best = S[0] * torch.outer(U[:, 0], Vh[0])
    assert out.round == 4 and out.factors["m"].rank == 1 and out.factors["m"].scale == 1.0
    assert torch.allclose(out.factors["m"].delta(), best, atol=1e-5)
    assert cuts["m"].error == pytest.approx(float((dense - best).norm()), rel=1e-5)
    assert cuts["m"].relative == pytest.approx(float((dense - best).norm() / dense.norm()), rel=1e-5)


def _two_servers() -> list[ClientUpdate]:
    """Equal samples, orthogonal rank-1 updates 3 e1 e1^T and e2 e2^T: dW = diag(1.5, 0.5, 0)."""
    e = torch.eye(3)
    return [ClientUpdate("a", 10, {"m": LoraFactors(3 * e[:1], e[:, :1], 1.0)}),
            ClientUpdate("b", 10, {"m": LoraFactors(e[1:2], e[:, 1:2], 1.0)})]


def test_flexlora_truncates_the_global_and_reports_the_cut():
    # Prepare: sigma^2 = 2.25, 0.25 of 2.5; energy 0.8 keeps the first.
    agg = get_aggregator("flexlora", Truncation(energy=0.8))
    # Execute
    g = agg.aggregate(_two_servers(), None)
    # Assert
    assert g.factors["m"].rank == 1
    assert torch.allclose(g.factors["m"].delta().float(), torch.diag(torch.tensor([1.5, 0.0, 0.0])))
    assert agg.cuts["m"].error == pytest.approx(0.5) and agg.cuts["m"].rank_before == 2
    metrics = cut_metrics(agg.cuts)
    assert metrics["truncation_error"] == pytest.approx(0.5)
    assert metrics["truncation_error_rel"] == pytest.approx(0.5 / math.sqrt(2.5))
    assert metrics["global_rank_sum"] == metrics["global_rank_max"] == 1
    # Default: nothing cut, nothing reported, the exact update.
    plain = FlexLoRA()
    assert plain.aggregate(_two_servers(), None).factors["m"].rank == 2 and plain.cuts == {}
    assert cut_metrics(plain.cuts) == {}


def test_flora_broadcasts_and_records_the_truncated_stack():
    agg = FLoRA(Truncation(max_rank=1))
    g1 = agg.aggregate(_two_servers(), None)
    b1 = agg.broadcast(g1, None, ranks={"m": 1}, scales={"m": 2.0})
    one = torch.diag(torch.tensor([1.5, 0.0, 0.0]))
    assert torch.allclose(b1.base_delta["m"].delta().float(), one)
    assert torch.allclose(g1.factors["m"].delta().float(), one)
    assert agg.cuts["m"].error == pytest.approx(0.5)
    # Round 2 appends its own truncated stack, and the broadcast slices it back out.
    g2 = agg.aggregate(_two_servers(), g1)
    b2 = agg.broadcast(g2, g1, ranks={"m": 1}, scales={"m": 2.0})
    assert g2.factors["m"].rank == 2
    assert torch.allclose(b2.base_delta["m"].delta().float(), one)
    assert torch.allclose(g2.factors["m"].delta().float(), 2 * one)


@pytest.mark.parametrize("make,match", [
    (lambda: get_aggregator("fedit", Truncation()), "fedit keeps the global rank"),
    (lambda: get_aggregator("hetlora", Truncation()), "valid with flexlora and flora"),
    (lambda: Truncation(energy=0.0), "energy"), (lambda: Truncation(energy=1.5), "energy"),
    (lambda: Truncation(max_rank=0), "max_rank"),
])
def test_bad_truncation_is_refused(make, match):
    with pytest.raises(FedpipeError, match=match):
        make()
