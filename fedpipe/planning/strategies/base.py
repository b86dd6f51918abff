"""What a strategy is: a named rule that turns a planning Problem into per-class Choices.

Every strategy's choices are costed, checked and written by the planner's own ``evaluate`` and
``assemble_plan``, so predictions, bytes and the schema are the same whichever rule chose them.
Heuristic rules (everything but the optimiser) get the homogeneous baseline and the time scale
the optimiser's plan would record, and an honest report: status "feasible", no gap, no
optimality claim.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from fedpipe.errors import FedpipeError
from fedpipe.plan import Baseline, SolverReport
from fedpipe.planning.milp import default_solver
from fedpipe.planning.planner import baseline_block, choose_method, homogeneous_choices
from fedpipe.planning.problem import (
    Choice,
    Evaluation,
    Problem,
    diagnose_infeasible,
    evaluate,
)

HEURISTIC = "heuristic"  # SolverReport.method of every rule that is not the optimiser


@dataclass(frozen=True)
class SolveOptions:
    """The optimiser's knobs (`fedpipe plan --solver/--time-limit/--method`); heuristic rules use
    them only for the homogeneous baseline, which they compute exactly as the optimiser does."""

    solver: str | None = None
    time_limit: float | None = 60.0
    method: str = "auto"


Solved = tuple[list[Choice], Evaluation, SolverReport, Baseline | None]


@dataclass(frozen=True)
class Strategy:
    """A named allocation rule; `solve` returns what ``assemble_plan`` needs."""

    name: str
    summary: str
    solve: Callable[[Problem, SolveOptions], Solved]


def baseline_choices(problem: Problem, options: SolveOptions) -> list[Choice] | None:
    """The optimiser's homogeneous baseline, by the method it would use."""
    return homogeneous_choices(problem, choose_method(problem, options.method),
                               options.solver or default_solver(), options.time_limit)


def heuristic(name: str, summary: str, rule: Callable[[Problem, SolveOptions], list[Choice]]) -> Strategy:
    """A Strategy from a rule that picks per-class Choices; the rule raises FedpipeError naming
    any server it cannot fit."""

    def solve(problem: Problem, options: SolveOptions) -> Solved:
        infeasible = diagnose_infeasible(problem)
        if infeasible:
            raise FedpipeError("no plan fits: some servers cannot run even the smallest "
                               "configuration", infeasible)
        baseline = baseline_block(problem, baseline_choices(problem, options))
        start = time.perf_counter()
        choices = rule(problem, options)
        elapsed = time.perf_counter() - start
        ev = evaluate(problem, choices)
        check_deadline(problem, ev, name)
        report = SolverReport(solver=name, status="feasible", gap=None, method=HEURISTIC,
                              solve_time_s=round(elapsed, 3), objective=ev.objective)
        return choices, ev, report, baseline

    return Strategy(name, summary, solve)


def check_deadline(problem: Problem, ev: Evaluation, name: str) -> None:
    """Heuristic rules fit memory, not time: a profile deadline they miss is an error."""
    deadline = problem.profile.objective.deadline_s
    if deadline is None or ev.makespan <= deadline * (1 + 1e-9):
        return
    late = [f"server {', '.join(s.name for s in cls.servers)}: round {c.round_s:.1f} s, over the "
            f"deadline of {deadline:g} s by {c.round_s - deadline:.1f} s"
            for cls, c in zip(problem.classes, ev.costs, strict=True) if c.round_s > deadline]
    raise FedpipeError(f"strategy {name!r}: its plan misses the profile's deadline", late)
