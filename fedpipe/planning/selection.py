"""Which sets of matrices a class may adapt (``candidates.selection``).

``importance``: any set; the planner then covers the most importance it can, which piles its
matrices onto a few types and layers (the plain top-k of sensitivity).

``spread``: the rule that beat random selection at an equal LoRA budget in
benchmarks/bench_importance.py (README, "Importance: which matrices matter"). A class adapting n
matrices adapts exactly spread_set(n): walk the candidates from the most important down (ties in
name order) and take a matrix while
    (a) its layer holds fewer than ceil(n / L) taken matrices (L = layers with candidates), and
    (b) its type holds fewer than floor(n / T) taken, or exactly that many while fewer than
        n mod T types already hold one more (T = candidate types),
until n are taken. So per-type counts differ by at most one, the extra ones going to the types
whose next candidates come first, and at n = 21 of SmolLM2's 210 this is the measured arm
(type-layer-spread). A count n whose walk ends short of n is not offered. The planner chooses n
(and the ranks on the set); rank 0 outside it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from fedpipe.shapes import Matrix

SELECTIONS = ("importance", "spread")


def importance_order(matrices: Sequence[Matrix], weights: dict[str, float]) -> list[Matrix]:
    """Most important first, ties in name order (as the benchmark ranks them)."""
    return sorted(matrices, key=lambda m: (-weights[m.name], m.name))


def spread_set(order: Sequence[Matrix], n: int) -> frozenset[str] | None:
    """The names spread picks at count n from `order` (most important first), or None when the
    walk cannot take n."""
    cap = math.ceil(n / len({m.layer for m in order}))
    base, extra = divmod(n, len({m.kind for m in order}))
    per_layer: dict[int, int] = {}
    per_type: dict[str, int] = {}
    above_base = 0
    taken: list[str] = []
    for m in order:
        if len(taken) == n:
            break
        held = per_type.get(m.kind, 0)
        if per_layer.get(m.layer, 0) >= cap or held > base or (held == base and above_base >= extra):
            continue
        above_base += held == base
        per_type[m.kind] = held + 1
        per_layer[m.layer] = per_layer.get(m.layer, 0) + 1
        taken.append(m.name)
    return frozenset(taken) if len(taken) == n else None


def spread_sets(matrices: Sequence[Matrix], weights: dict[str, float]) -> dict[int, frozenset[str]]:
    """Every count spread offers (0 included) and its set."""
    order = importance_order(matrices, weights)
    sets = {n: spread_set(order, n) for n in range(1, len(order) + 1)}
    return {0: frozenset(), **{n: s for n, s in sets.items() if s is not None}}
