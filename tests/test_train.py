"""The per-round learning rate (`train.round_learning_rate`): hand-checkable values and refusals."""

from itertools import pairwise

import pytest

from fedpipe.errors import FedpipeError
from fedpipe.train import COSINE_FLOOR, round_learning_rate


def test_constant_is_the_peak_every_round():
    assert [round_learning_rate(1e-3, "constant", r, 4) for r in range(1, 5)] == [1e-3] * 4


def test_cosine_runs_from_the_peak_to_a_tenth_of_it():
    # Prepare / Execute: five rounds, so round 3 sits halfway along the half cosine.
    rates = [round_learning_rate(1.0, "cosine", r, 5) for r in range(1, 6)]
    # Assert: peak, halfway between peak and floor, the floor; falling all the way.
    assert rates[0] == 1.0 and rates[4] == pytest.approx(COSINE_FLOOR) == pytest.approx(0.1)
    assert rates[2] == pytest.approx((1 + COSINE_FLOOR) / 2)
    assert rates[1] == pytest.approx(COSINE_FLOOR + (1 - COSINE_FLOOR) * (1 + 2 ** -0.5) / 2)
    assert all(a > b for a, b in pairwise(rates))


def test_a_one_round_run_trains_at_the_peak():
    assert round_learning_rate(2e-3, "cosine", 1, 1) == 2e-3


@pytest.mark.parametrize("round_index, rounds", [(0, 3), (4, 3), (1, 0), (True, 3), (1.0, 3)])
def test_a_round_outside_the_run_is_refused(round_index, rounds):
    with pytest.raises(FedpipeError, match="valid is 1 <= round <= rounds"):
        round_learning_rate(1e-3, "cosine", round_index, rounds)


def test_an_unknown_schedule_is_refused():
    with pytest.raises(FedpipeError, match="valid is 'constant' or 'cosine'"):
        round_learning_rate(1e-3, "linear", 1, 3)
