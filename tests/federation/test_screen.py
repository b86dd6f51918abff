"""The trust boundary: hand-checkable checks, and a payload fuzzer against the real coordinator."""

import math
import random

import pytest
import torch

from fedpipe.errors import FedpipeError
from fedpipe.federation.coordinator import Coordinator
from fedpipe.federation.screen import (
    Expected,
    Refused,
    check_content,
    check_global,
    check_sender,
    clipped,
    norm_outliers,
    product_norm,
)
from fedpipe.lora import ClientUpdate, LoraFactors
from fedpipe.protocol import update_payload

SHAPES = {"m.q": (6, 5), "m.v": (4, 5)}  # (d_out, d_in)


def expected(member="a", ranks=None, n_samples=10, round_index=1, entry="e") -> Expected:
    ranks = ranks or {"m.q": 2, "m.v": 3}
    return Expected(member, entry, round_index, n_samples, ranks, {n: SHAPES[n] for n in ranks})


def factors(ranks, seed=0, scale=1.0) -> dict[str, LoraFactors]:
    gen = torch.Generator().manual_seed(seed)
    return {n: LoraFactors(torch.randn(r, SHAPES[n][1], generator=gen),
                           torch.randn(SHAPES[n][0], r, generator=gen) * scale, 0.5) for n, r in ranks.items()}


def test_sender_claims_must_match_the_plan():
    meta = {"server": "a", "entry": "e", "round": "1", "n_samples": "10"}
    check_sender(meta, expected())
    for key, lie in (("server", "b"), ("entry", "x"), ("round", "2"), ("n_samples", str(10**15))):
        with pytest.raises(Refused, match=f"server a: update refused: it claims {key}"):
            check_sender(meta | {key: lie}, expected())


def test_content_must_be_the_plans_modules_ranks_and_finite():
    exp = expected()
    check_content(ClientUpdate("a", 10, factors(exp.ranks)), exp)
    with pytest.raises(Refused, match="modules differ"):
        check_content(ClientUpdate("a", 10, factors({"m.q": 2})), exp)
    with pytest.raises(Refused, match="the plan gives rank 2"):
        check_content(ClientUpdate("a", 10, factors({"m.q": 3, "m.v": 3})), exp)
    bad = factors(exp.ranks)
    bad["m.v"].A[0, 0] = float("inf")
    with pytest.raises(Refused, match="m.v holds non-finite"):
        check_content(ClientUpdate("a", 10, bad), exp)


def test_product_norm_is_the_dense_norm():
    f = factors({"m.q": 2, "m.v": 3}, seed=3)
    dense = math.sqrt(sum(float(x.delta().pow(2).sum()) for x in f.values()))
    assert product_norm(f) == pytest.approx(dense, rel=1e-9)


def test_norm_outliers_use_the_low_median():
    # Prepare: two servers, one lying by 1e18 (a plain median would be half the liar's norm)
    norms = {"honest": 2.0, "liar": 2e18}
    # Execute / Assert
    assert list(norm_outliers(norms, 10.0)) == ["liar"]
    assert norm_outliers({"a": 1.0, "b": 9.0, "c": 3.0}, 10.0) == {}
    assert norm_outliers(norms, None) == {}


def test_clipping_changes_nothing_within_the_bound():
    u = ClientUpdate("a", 10, factors({"m.q": 2}))
    n = product_norm(u.factors)
    assert clipped(u, n * 1.01) is u
    smaller = clipped(u, n / 4)
    assert product_norm(smaller.factors) == pytest.approx(n / 4, rel=1e-6)
    torch.testing.assert_close(smaller.factors["m.q"].delta() * 4, u.factors["m.q"].delta())


def test_a_non_finite_global_is_refused():
    f = factors({"m.q": 2})
    check_global(f, 1)
    f["m.q"].B[0, 0] = float("nan")
    with pytest.raises(FedpipeError, match="round 1: the aggregated global adapter is not finite"):
        check_global(f, 1)


# ---------------------------------------------------------------------------------------- fuzzer
MEMBERS = {"a": {"m.q": 2, "m.v": 3}, "b": {"m.q": 4, "m.v": 1}, "c": {"m.q": 2, "m.v": 2}}
SAMPLES = {"a": 10, "b": 30, "c": 20}
LIES = ("nan", "inf", "huge_norm", "wrong_rank", "missing_module", "extra_module", "other_name",
        "duplicate", "huge_samples", "other_round")


def honest(member: str, seed: int) -> bytes:
    return update_payload(factors(MEMBERS[member], seed), server=member, entry=member, n_samples=SAMPLES[member],
                          round_index=1, fresh_seed=seed, train_loss=1.0)


def lying(member: str, lie: str, seed: int) -> bytes:
    ranks, meta = dict(MEMBERS[member]), dict(server=member, entry=member, n_samples=SAMPLES[member],
                                              round_index=1, fresh_seed=seed, train_loss=1.0)
    f = factors(ranks, seed)
    if lie in ("nan", "inf"):
        f["m.q"].B[1, 0] = float(lie)
    elif lie == "huge_norm":
        f = factors(ranks, seed, scale=1e18)
    elif lie == "wrong_rank":
        f["m.q"] = factors({"m.q": ranks["m.q"] + 1}, seed)["m.q"]
    elif lie == "missing_module":
        del f["m.v"]
    elif lie == "extra_module":
        f["m.x"] = LoraFactors(torch.ones(1, 3), torch.ones(3, 1))
    elif lie == "other_name":
        meta["server"] = "c" if member != "c" else "a"  # claims to be another member
    elif lie == "duplicate":
        return honest("c" if member != "c" else "a", seed)  # replays another member's update
    elif lie == "huge_samples":
        meta["n_samples"] = 10**15
    elif lie == "other_round":
        meta["round_index"] = 7
    return update_payload(f, **meta)


def mutate(payload: bytes, rng: random.Random) -> tuple[str, bytes]:
    """Byte flips or a truncation: the damage a broken link or disk does."""
    data = bytearray(payload)
    if rng.random() < 0.3:
        return "truncated", bytes(data[: rng.randrange(len(data))])
    for _ in range(rng.randint(1, 8)):
        data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
    return "bytes_flipped", bytes(data)


@pytest.mark.parametrize("rule", ["fedit", "hetlora", "flora", "flexlora"])
def test_fuzzed_payloads_never_poison_the_global_model(rule):
    """Every case is refused naming the server, or aggregated into a finite global; no lie passes."""
    rng = random.Random(rule)
    tried = refused = wrongly_accepted = 0
    for case in range(120):
        coordinator = Coordinator(rule)
        payloads = {m: honest(m, case) for m in MEMBERS}
        victim = rng.choice(sorted(MEMBERS))
        kind = rng.choice(LIES + ("damaged",) * 4)
        if kind == "damaged":
            kind, payloads[victim] = mutate(payloads[victim], rng)
        else:
            payloads[victim] = lying(victim, kind, case)
        tried += 1
        accepted = []
        for member, payload in payloads.items():
            exp = Expected(member, member, 1, SAMPLES[member], MEMBERS[member],
                           {n: SHAPES[n] for n in MEMBERS[member]})
            try:
                accepted.append(coordinator.receive(payload, exp))
            except Refused as e:
                assert member == victim and str(e).startswith(f"server {member}: update refused"), str(e)
                refused += 1
        norms = {u.server: product_norm(u.factors) for u in accepted}
        outliers = norm_outliers(norms, 10.0)
        refused += len(outliers)
        accepted = [u for u in accepted if u.server not in outliers]
        if kind in LIES and any(u.server == victim for u in accepted):
            wrongly_accepted += 1
        try:
            new = coordinator.aggregate(accepted)
        except FedpipeError as e:
            assert "not finite" in str(e)
            continue
        assert all(torch.isfinite(f.A).all() and torch.isfinite(f.B).all() for f in new.factors.values())
        assert {u.n_samples for u in accepted} <= set(SAMPLES.values())
    print(f"\n{rule}: {tried} fuzzed rounds, {refused} updates refused, {wrongly_accepted} lies accepted")
    assert wrongly_accepted == 0 and refused >= tried * 0.6


def test_a_flipped_train_loss_is_refused_not_a_crash():
    """Found by the fuzzer: one flipped bit turned train_loss into '1.000p00'."""
    from fedpipe.protocol import read_update

    f = {"m": LoraFactors(A=torch.ones(2, 4), B=torch.ones(4, 2))}
    good = update_payload(f, server="s", entry="s", n_samples=3, round_index=1, fresh_seed=0,
                          train_loss=1.0)
    bad = good.replace(b"1.000000", b"1.000p00")
    assert read_update(good).metrics["train_loss"] == 1.0
    with pytest.raises(FedpipeError, match="no valid train_loss"):
        read_update(bad)
