"""A sampled cohort's round time: what a round takes when only some servers train.

The round lasts as long as the slowest server sampled, so with a cohort the plan's makespan (the
slowest of all) overstates it. Cohorts are drawn as the run draws them (`federation.cohort`, the
task's seed), over many rounds, and the round times of their slowest members summarised: the
expected value and the 90th percentile. Every server has the same chance of being sampled
(size / servers, stratified or not), so the plan's sample-weighted quality needs no reweighting.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from fedpipe.cohort import count_or_fraction, draw_cohort

DRAWS = 2000  # cohorts sampled; the p90's standard error is then well under 1% of its spread


def cohort_round_times(round_s: Sequence[float], counts: Sequence[int], cohort: int | float,
                       stratify: bool, seed: int, draws: int = DRAWS) -> tuple[int, float, float]:
    """(cohort size, expected round time, p90) for classes with these round times and server
    counts (classes that train nothing left out by the caller)."""
    members = [(f"{c}/{i}", str(c)) for c, n in enumerate(counts) for i in range(n)]
    size = count_or_fraction("task.cohort", cohort, len(members))
    times = sorted(max(round_s[int(m.split("/")[0])]
                       for m in draw_cohort(members, r, seed, size, stratify))
                   for r in range(1, draws + 1))
    return size, sum(times) / draws, times[min(draws - 1, math.ceil(0.9 * draws) - 1)]
