"""importance-topk: the most important matrices at one rank, on every server (FedPipe's first stage alone).

FedPipe (arXiv 2404.06448) first selects the important weights to fine-tune by an importance
score, then configures each server by optimisation. This is the first stage without the second:
the fewest top-scored candidate matrices that hold IMPORTANCE_SHARE of the total importance (the
profile's importance report, as the optimiser sees it), all at one rank, the largest ladder rank
every server can hold; each server at the most bits and batch that fit, dense.
"""

from __future__ import annotations

from fedpipe.planning.problem import Choice, Problem

from .base import SolveOptions, heuristic
from .fit import one_rank

NAME = "importance-topk"
IMPORTANCE_SHARE = 0.5


def top_matrices(problem: Problem, share: float = IMPORTANCE_SHARE) -> list[str]:
    """The fewest most-important candidates whose normalised importance sums to `share`."""
    ranked = sorted(problem.matrices, key=lambda m: -problem.weights[m.name])
    chosen, held = [], 0.0
    for m in ranked:
        if held >= share - 1e-12:
            break
        chosen.append(m.name)
        held += problem.weights[m.name]
    return chosen


def _rule(problem: Problem, options: SolveOptions) -> list[Choice]:
    return one_rank(problem, top_matrices(problem), NAME)


STRATEGY = heuristic(NAME, "the top matrices by importance at one rank (FedPipe's first stage "
                     "alone)", _rule)
