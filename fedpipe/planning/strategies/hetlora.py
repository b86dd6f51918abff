"""hetlora: a rank per server proportional to its capacity, on every candidate matrix.

HetLoRA (Cho et al., "Heterogeneous LoRA for Federated Fine-tuning of On-Device Foundation
Models", 2024) gives each client one LoRA rank sized to its system capability, on all adapted
matrices, and aggregates by zero-padding. Here the rank is the largest ladder rank at most
capacity x the ladder's top (``capacity.capacities``), never below the smallest; a server whose
memory cannot hold it steps down the ladder. Bits and batch: the most that fit.
"""

from __future__ import annotations

from fedpipe.planning.problem import Choice, Problem

from .base import SolveOptions, heuristic
from .capacity import capacities
from .fit import fit_each, ladder_rank, nonzero_ranks

NAME = "hetlora"


def _rule(problem: Problem, options: SolveOptions) -> list[Choice]:
    names = [m.name for m in problem.matrices]
    patterns = []
    for c in capacities(problem):
        top = ladder_rank(problem, c)
        patterns.append([({n: r for n in names}, f"{len(names)} matrices at rank {r}")
                         for r in reversed(nonzero_ranks(problem)) if r <= top])
    return fit_each(problem, NAME, patterns)


STRATEGY = heuristic(NAME, "rank per server proportional to its capacity, all matrices "
                     "(HetLoRA, Cho et al. 2024)", _rule)
