"""A measured quality model (calibration.quality) in the planner: the fit from probe drops, what
the profile accepts, and every solver still equal to brute force under measured gains and shares."""

import pytest
from instances import SHAPES, brute_force_objective, random_instance

from fedpipe.errors import FedpipeError
from fedpipe.planning.planner import plan_problem
from fedpipe.planning.problem import build_problem, with_type_shares
from fedpipe.profile import QualityCalibration, parse_profile
from fedpipe.quality import fit_quality, parse_seeds, probes
from fedpipe.shapes import Matrix

PROFILE = {"model": "tiny-wide",
           "candidates": {"targets": ["q_proj", "down_proj"], "ranks": [0, 4, 8, 16], "bits": [4, 8, 16],
                          "batch_sizes": [2, 4]},
           "servers": [{"name": "a", "memory_gib": 8, "tflops": 1, "uplink_mbps": 10,
                        "downlink_mbps": 10, "samples": 10}]}
MEASURED = {"rank_gain": {4: 0.5, 8: 0.8, 16: 1.0}, "type_share": {"q_proj": 0.25, "down_proj": 0.75},
            "batch_exponent": 1.0, "bits_quality": {4: 0.9, 8: 1.0, 16: 1.0}}


def _drops(profile, values):
    return {p: values[(p.factor, p.level)] for p in probes(profile)}


def test_probes_vary_one_factor_from_the_reference():
    profile = parse_profile(PROFILE)
    labels = [p.label for p in probes(profile)]
    assert labels == ["reference", "rank 4", "rank 8", "q_proj alone", "down_proj alone", "batch 2",
                      "4-bit base", "8-bit base"]
    ref = probes(profile)[0]
    assert (ref.bits, ref.batch, ref.rank, ref.types) == (16, 4, 16, ("q_proj", "down_proj"))


def test_fit_from_hand_checkable_drops():
    # Prepare: reference drop 2.0; rank 8 dips below rank 4 (noise); batch 2 keeps half
    profile = parse_profile(PROFILE)
    drops = _drops(profile, {("reference", None): 2.0, ("rank", 4): 1.0, ("rank", 8): 0.9,
                             ("type", "q_proj"): 0.5, ("type", "down_proj"): 1.5,
                             ("batch", 2): 1.0, ("bits", 4): 1.9, ("bits", 8): 2.2})
    # Execute
    q = fit_quality(profile, drops, "note")
    # Assert: ratios to the reference, made non-decreasing, capped at 1
    assert q.rank_gain == {4: 0.5, 8: 0.5, 16: 1.0}
    assert q.type_share == {"q_proj": 0.25, "down_proj": 0.75}
    assert q.batch_exponent == pytest.approx(1.0)  # log(1/2) / log(2/4)
    assert q.bits_quality == {4: 0.95, 8: 1.0, 16: 1.0}
    assert q.probes == "note"


def test_fit_refuses_a_reference_that_did_not_learn():
    profile = parse_profile(PROFILE)
    values = {(p.factor, p.level): 0.1 for p in probes(profile)}
    values[("reference", None)] = -0.01
    with pytest.raises(FedpipeError, match="reference probe did not learn"):
        fit_quality(profile, _drops(profile, values))


def test_parse_seeds():
    assert parse_seeds("1, 0,1") == [0, 1]
    with pytest.raises(FedpipeError, match="--seeds"):
        parse_seeds("0,x")


def test_profile_takes_a_measured_model_and_names_what_is_missing():
    profile = parse_profile({**PROFILE, "calibration": {"quality": MEASURED}})
    assert profile.calibration.quality.rank_gain[8] == 0.8
    missing = {**MEASURED, "rank_gain": {4: 0.5, 16: 1.0}}
    with pytest.raises(FedpipeError, match=r"calibration.quality.rank_gain has no entry .*\[8\]"):
        parse_profile({**PROFILE, "calibration": {"quality": missing}})
    with pytest.raises(FedpipeError, match="must not decrease"):
        parse_profile({**PROFILE, "calibration": {"quality": {**MEASURED, "rank_gain": {4: 0.9, 8: 0.8, 16: 1.0}}}})
    with pytest.raises(FedpipeError, match="top rank 16 must keep 1.0"):
        parse_profile({**PROFILE, "calibration": {"quality": {**MEASURED, "rank_gain": {4: 0.5, 8: 0.8, 16: 0.9}}}})


def test_problem_uses_the_measured_model():
    prior = build_problem(parse_profile(PROFILE), SHAPES)
    measured = build_problem(parse_profile({**PROFILE, "calibration": {"quality": MEASURED}}), SHAPES)
    assert prior.gain(4) == pytest.approx(0.5 * 2.3219 / 2.0437, rel=1e-3)  # log2(5) / log2(17)
    assert measured.gain(4) == 0.5 and measured.gain(0) == 0.0
    assert measured.config_factor(4, 2) == pytest.approx(0.9 * 0.5)  # bits 0.9, (2/4)^1
    assert prior.config_factor(16, 2) == pytest.approx(0.5 ** 0.25)
    by_type = {}
    for m in measured.matrices:
        by_type[m.kind] = by_type.get(m.kind, 0.0) + measured.weights[m.name]
    assert by_type == pytest.approx({"q_proj": 0.25, "down_proj": 0.75})


def test_type_shares_keep_the_order_within_a_type():
    ms = [Matrix("l0.q", "q_proj", 0, 4, 4), Matrix("l1.q", "q_proj", 1, 4, 4),
          Matrix("l0.d", "down_proj", 0, 4, 8)]
    w = with_type_shares({"l0.q": 0.6, "l1.q": 0.2, "l0.d": 0.2}, ms, {"q_proj": 1.0, "down_proj": 3.0})
    assert w == pytest.approx({"l0.q": 0.1875, "l1.q": 0.0625, "l0.d": 0.75})


@pytest.mark.parametrize("method", ["decomposed", "milp"])
@pytest.mark.parametrize("kind", ["weighted", "rate"])
@pytest.mark.parametrize("seed", range(3))
def test_solvers_equal_brute_force_under_a_measured_model(seed, kind, method):
    """Measured gains are not the log curve (rank 8 keeps nothing over rank 4 here), and shares
    reweight the types: the solvers' structure (nested ranks per type, gain tables) must still hold."""
    base = random_instance(500 + seed, 2, [0, 4, 8, 16], kind=kind)
    quality = QualityCalibration(rank_gain={4: 0.7, 8: 0.7, 16: 1.0},
                                 type_share={"q_proj": 0.8, "down_proj": 0.2}, batch_exponent=0.6,
                                 bits_quality={4: 0.8, 16: 1.0})
    profile = base.profile.model_copy(update={"calibration": base.profile.calibration.model_copy(
        update={"quality": quality})})
    problem = build_problem(profile, SHAPES, base.importance)
    _, ev, report, _ = plan_problem(problem, method=method)
    assert report.status == "optimal"
    assert ev.objective == pytest.approx(brute_force_objective(problem), rel=1e-6, abs=1e-9)
