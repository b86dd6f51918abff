"""homogeneous: every server on what the weakest can run (the "bucket effect" baseline).

Exactly the optimiser's own homogeneous baseline (``solve_baseline`` / its decomposed twin): one
bits, batch and rank pattern for all, the best the tightest memory allows, dense communication,
with its own predictions.
"""

from __future__ import annotations

from fedpipe.errors import FedpipeError
from fedpipe.planning.problem import Choice, Problem

from .base import SolveOptions, baseline_choices, heuristic
from .fit import shortfall

NAME = "homogeneous"


def _rule(problem: Problem, options: SolveOptions) -> list[Choice]:
    choices = baseline_choices(problem, options)
    if choices is None:
        raise FedpipeError(f"strategy {NAME!r}: no configuration fits every server",
                           [shortfall(problem, cls, {}, "the common configuration (no adapters)")
                            for cls in problem.classes])
    return choices


STRATEGY = heuristic(NAME, "every server at what the weakest can run (the bucket effect)", _rule)
