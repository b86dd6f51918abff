"""Cohorts: the seeded draw, and flora servers that sat out rounds catching up exactly."""

from collections import Counter

import pytest
import torch

from fedpipe import client
from fedpipe.client import AdaptedModel
from fedpipe.cohort import count_or_fraction, draw_cohort
from fedpipe.errors import FedpipeError
from fedpipe.federation.coordinator import Coordinator
from fedpipe.lora import ClientUpdate, LoraFactors
from fedpipe.plan import ServerPlan
from fedpipe.protocol import read_broadcast

FLEET = [(f"phone-{i}", "phone") for i in range(12)] + [(f"box-{i}", "box") for i in range(3)] + [("cloud", "cloud")]


def test_the_cohort_is_a_function_of_seed_and_round():
    a = draw_cohort(FLEET, 3, seed=7, size=4)
    assert a == draw_cohort(FLEET, 3, seed=7, size=4) and len(a) == 4
    assert a == [m for m, _ in FLEET if m in a]  # plan order
    assert any(draw_cohort(FLEET, r, seed=7, size=4) != a for r in range(4, 9))
    assert draw_cohort(FLEET, 1, seed=0, size=99) == [m for m, _ in FLEET]


@pytest.mark.parametrize("stratify", [False, True])
def test_every_server_is_sampled_with_the_same_chance(stratify):
    counts, rounds = Counter(), 4000
    for r in range(1, rounds + 1):
        chosen = draw_cohort(FLEET, r, seed=1, size=4, stratify=stratify)
        assert len(chosen) == 4
        counts.update(chosen)
    chance = {m: counts[m] / rounds for m, _ in FLEET}
    assert all(abs(p - 4 / 16) < 0.035 for p in chance.values()), chance


def test_stratified_cohorts_hold_each_class_share():
    for r in range(1, 200):
        classes = Counter(c for m, c in FLEET if m in draw_cohort(FLEET, r, seed=2, size=8, stratify=True))
        assert classes["phone"] == 6 and classes["box"] in (1, 2) and classes["cloud"] in (0, 1)


def test_cohort_and_participation_sizes_name_the_valid_range():
    assert count_or_fraction("cohort", "0.125", 64) == 8 and count_or_fraction("cohort", 8, 64) == 8
    for bad in ("0", "65", "1.5", "eight"):
        with pytest.raises(FedpipeError, match="cohort: .* count from 1 to 64"):
            count_or_fraction("cohort", bad, 64)


def dense(factors: dict[str, LoraFactors]) -> dict[str, torch.Tensor]:
    return {n: (f.B.double() @ f.A.double()) * f.scale for n, f in factors.items()}


def test_sampled_flora_keeps_every_base_equal_to_the_global_it_trains_on(monkeypatch):
    """A sampled flora run: the global model is the exact sum of the rounds' merged updates, and
    every server, whichever rounds it sat out, starts from a base equal to that global (its own
    base, as on Flower, and one base shared by its class, as in-process). A server far behind gets
    the cumulative update when that is fewer bytes than the merges it missed."""
    monkeypatch.setattr(client, "apply_base_delta", lambda *args: None)
    names = ["m.q", "m.v"]
    members = [(f"s{i}", "edge") for i in range(4)]
    entry = ServerPlan.model_construct(name="edge", members=[m for m, _ in members],
                                       rank_pattern=dict.fromkeys(names, 1), lora_alpha_ratio=1.0)
    coordinator, gen = Coordinator("flora"), torch.Generator().manual_seed(0)
    own = {m: AdaptedModel(None, 16) for m, _ in members}
    shared, last = AdaptedModel(None, 16), {m: 0 for m, _ in members}
    expected = {n: torch.zeros(64, 8, dtype=torch.float64) for n in names}  # flora caps ranks at 8
    kinds = Counter()
    for r in range(1, 13):
        updates = []
        for m in draw_cohort(members, r, seed=3, size=2):
            payload = coordinator.broadcast(entry, since=last[m])
            b = read_broadcast(payload)
            kinds["full" if b.base == "full" else f"{r - b.since} rounds"] += 1
            for base in (own[m], shared):
                base.merge(None, b, m)
                held = dense(base.merged)
                for n in expected:
                    torch.testing.assert_close(held.get(n, torch.zeros(64, 8, dtype=torch.float64)),
                                               expected[n], rtol=1e-5, atol=1e-6)
            last[m] = r
            factors = {n: LoraFactors(torch.randn(1, 8, generator=gen), torch.randn(64, 1, generator=gen))
                       for n in names}
            updates.append(ClientUpdate(m, 10 + r, factors))
        total = sum(u.n_samples for u in updates)
        for u in updates:
            for n, f in u.factors.items():
                expected[n] += u.n_samples / total * (f.B.double() @ f.A.double())
        new = coordinator.aggregate(updates)
        for n in names:
            torch.testing.assert_close(dense(new.factors)[n], expected[n], rtol=1e-5, atol=1e-6)
    assert kinds["full"] and any(int(k.split()[0]) > 1 for k in kinds if k != "full"), kinds
    assert max(coordinator.merges) == 13 and len(coordinator.merges) < 12  # only what can still be smaller


def test_a_base_behind_the_merges_sent_is_refused(monkeypatch):
    monkeypatch.setattr(client, "apply_base_delta", lambda *args: None)
    entry = ServerPlan.model_construct(name="edge", members=["a"], rank_pattern={"m.q": 2},
                                       lora_alpha_ratio=1.0)
    coordinator = Coordinator("flora")
    f = {"m.q": LoraFactors(torch.ones(2, 8), torch.ones(8, 2))}
    for r in (1, 2):
        coordinator.broadcast(entry, since=r - 1)
        coordinator.aggregate([ClientUpdate("a", 1, f)])
    with pytest.raises(FedpipeError, match="base holds round 1's merge, round 3's broadcast adds to round 2's"):
        AdaptedModel(None, 16, merged_round=1).merge(None, read_broadcast(coordinator.broadcast(entry, since=2)), "a")
