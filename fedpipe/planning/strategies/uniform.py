"""uniform: one rank on every candidate matrix, every server at the most bits that fit.

What an operator does by hand: pick one LoRA rank for the whole model (the largest ladder rank
that every server can hold), then give each server the highest precision and batch its memory
allows. Nothing depends on importance, links or compute.
"""

from __future__ import annotations

from fedpipe.planning.problem import Choice, Problem

from .base import SolveOptions, heuristic
from .fit import one_rank

NAME = "uniform"


def _rule(problem: Problem, options: SolveOptions) -> list[Choice]:
    return one_rank(problem, [m.name for m in problem.matrices], NAME)


STRATEGY = heuristic(NAME, "one rank on every candidate matrix, each server at the most bits "
                     "that fit", _rule)
