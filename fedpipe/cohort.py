"""Who trains in a round: a sampled cohort, a pure function of (seed, round).

Every transport, a resumed run and the planner's cohort makespan (`fedpipe.planning`) draw the
same cohorts because nothing but the seed, the round and the plan's members goes in. Stratified,
each hardware class (plan entry) gets its share of the cohort: the whole part always, the
fractional part by systematic rounding, so every server's chance of being sampled is exactly
size / servers, in a small class as in a large one. Nothing here imports torch.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence

from fedpipe.errors import FedpipeError


def count_or_fraction(field: str, value: str | int | float, n_servers: int) -> int:
    """A number of servers: an int (or "2") is a count, a float (or "0.5", written with a decimal
    point) a fraction of `n_servers`, rounded up."""
    raw = str(value).strip()
    try:
        number = float(raw) if "." in raw else int(raw)
    except ValueError:
        number = None
    if isinstance(number, float) and 0 < number <= 1:
        return max(1, math.ceil(number * n_servers - 1e-9))
    if isinstance(number, int) and 1 <= number <= n_servers:
        return number
    raise FedpipeError(f"{field}: {raw!r} is neither a count from 1 to {n_servers} nor a fraction "
                       "in (0, 1] written with a decimal point")


def draw_cohort(members: Sequence[tuple[str, str]], round_index: int, seed: int, size: int,
                stratify: bool = False) -> list[str]:
    """`size` of the (member, class) pairs for this round, in the order given."""
    if size >= len(members):
        return [m for m, _ in members]
    rng = random.Random(f"fedpipe-cohort:{seed}:{round_index}")  # str seeds hash the same everywhere
    if not stratify:
        chosen = set(rng.sample([m for m, _ in members], size))
    else:
        classes: dict[str, list[str]] = {}
        for m, c in members:
            classes.setdefault(c, []).append(m)
        chosen = set()
        for names, k in zip(classes.values(), class_quotas([len(v) for v in classes.values()], size, rng),
                            strict=True):
            chosen.update(rng.sample(names, k))
    return [m for m, _ in members if m in chosen]


def class_quotas(counts: Sequence[int], size: int, rng: random.Random) -> list[int]:
    """Seats per class summing to `size`: class c gets floor(q_c) or ceil(q_c) of its expected share
    q_c = size * count_c / total, the ceiling with probability frac(q_c) (systematic rounding)."""
    total = sum(counts)
    shares = [size * c / total for c in counts]
    u, cumulative, quotas = rng.random(), 0.0, []
    for share in shares:
        whole = math.floor(share)
        frac = share - whole
        quotas.append(whole + math.floor(cumulative + frac + u + 1e-9) - math.floor(cumulative + u + 1e-9))
        cumulative += frac
    return quotas
