"""fedpipe: the optimiser itself (``fedpipe.planning.planner.plan_problem``), the default strategy."""

from __future__ import annotations

from fedpipe.planning.planner import plan_problem
from fedpipe.planning.problem import Problem

from .base import Solved, SolveOptions, Strategy


def _solve(problem: Problem, options: SolveOptions) -> Solved:
    return plan_problem(problem, solver=options.solver, time_limit=options.time_limit,
                        method=options.method)


STRATEGY = Strategy("fedpipe", "the optimiser: bits, batch, density, wire precision and a rank per "
                    "matrix per server, importance against round time (default)", _solve)
