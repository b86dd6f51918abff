"""Allocation strategies by name: the optimiser and the peer rules it is judged against (design §10).

``fedpipe plan PROFILE --strategy NAME`` writes the plan NAME makes for the profile; every
strategy's plan is costed and written by the planner's own ``evaluate`` and ``assemble_plan``.
"""

from __future__ import annotations

import os
from pathlib import Path

from fedpipe.digest import file_sha256
from fedpipe.errors import FedpipeError
from fedpipe.importance import ImportanceReport
from fedpipe.plan import BUILTIN_PRIOR_SOURCE, Plan, ProfileRef
from fedpipe.planning.planner import assemble_plan
from fedpipe.planning.problem import build_problem
from fedpipe.profile import load_profile_and_shapes, with_objective

from . import hetlora, homogeneous, importance_topk, legend, optimiser, uniform
from .base import SolveOptions, Strategy

DEFAULT = "fedpipe"
REGISTRY: dict[str, Strategy] = {m.STRATEGY.name: m.STRATEGY for m in (
    optimiser, homogeneous, uniform, hetlora, legend, importance_topk)}


def strategy_names() -> list[str]:
    """The valid names, the default first."""
    return list(REGISTRY)


def get_strategy(name: str) -> Strategy:
    """The strategy called `name` (case-insensitive)."""
    found = REGISTRY.get(name.strip().lower())
    if found is None:
        raise FedpipeError(f"--strategy: unknown strategy {name!r}",
                           [f"valid: {', '.join(strategy_names())}"])
    return found


def make_plan(profile_path: str | Path, strategy: str = DEFAULT, *, solver: str | None = None,
              time_limit: float | None = 60.0, method: str = "auto",
              importance: ImportanceReport | None = None, importance_source: str | None = None,
              objective: str | None = None) -> Plan:
    """Load a profile and return the plan `strategy` makes for it (the call behind ``fedpipe plan``);
    the solver options tune the optimiser and the homogeneous baseline every plan reports;
    `objective` (weighted or rate) replaces the profile's objective.kind, and the plan records it."""
    chosen = get_strategy(strategy)
    profile_path = Path(profile_path)
    profile, shapes = load_profile_and_shapes(profile_path)
    profile = with_objective(profile, objective)
    problem = build_problem(profile, shapes, importance)
    choices, ev, report, baseline = chosen.solve(problem, SolveOptions(solver, time_limit, method))
    ref = ProfileRef(path=os.path.abspath(profile_path), sha256=file_sha256(profile_path),
                     name=profile.name or profile_path.stem.removesuffix(".profile"))
    plan = assemble_plan(problem, choices, report, baseline, ref, importance_source or BUILTIN_PRIOR_SOURCE,
                         ev)
    return plan.model_copy(update={"strategy": chosen.name})


__all__ = ["DEFAULT", "REGISTRY", "SolveOptions", "Strategy", "get_strategy", "make_plan",
           "strategy_names"]
