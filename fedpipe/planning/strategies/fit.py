"""Fitting a rule's adapter to a server's memory by the planner's cost model.

A rule proposes rank patterns from its ideal down to its smallest; a server takes the first
pattern that fits at some (bits, batch), preferring the most bits, then the largest batch
(quality first, as an operator would), and communicates dense in fp32 (no rule here trades
bytes for quality). A server that fits none is named with its shortfall.
"""

from __future__ import annotations

from collections.abc import Iterable

from fedpipe.errors import FedpipeError
from fedpipe.planning.cost import server_cost
from fedpipe.planning.problem import Choice, Problem, ServerClass

DENSE = 1.0


def nonzero_ranks(problem: Problem) -> list[int]:
    """The rank ladder without 0, ascending."""
    return [r for r in problem.ranks if r > 0]


def ladder_rank(problem: Problem, share: float) -> int:
    """The largest ladder rank at most `share` x the top rank, never below the smallest one."""
    levels = nonzero_ranks(problem)
    fitting = [r for r in levels if r <= share * levels[-1] + 1e-9]
    return fitting[-1] if fitting else levels[0]


def memory_gib(problem: Problem, cls: ServerClass, bits: int, batch: int, ranks: dict[str, int]) -> float:
    """Predicted training memory of one configuration (cost.server_cost, the planner's formula)."""
    by_name = problem.cache.get(("matrices by name",), lambda: {m.name: m for m in problem.matrices})
    return server_cost(problem.cost, cls.rep, bits, batch, ranks, by_name, 0.0).memory_gib


def best_config(problem: Problem, cls: ServerClass, ranks: dict[str, int]) -> Choice | None:
    """The most bits, then the largest batch, at which `ranks` fit the class's memory."""
    batches = sorted(problem.profile.candidates.batch_sizes, reverse=True)
    for bits in sorted(problem.profile.allowed_bits(cls.rep), reverse=True):
        for batch in batches:
            if memory_gib(problem, cls, bits, batch, ranks) <= cls.rep.memory_gib:
                return Choice(bits, batch, dict(ranks), DENSE)
    return None


def shortfall(problem: Problem, cls: ServerClass, ranks: dict[str, int], what: str) -> str:
    """'server X: needs at least A GiB (q-bit, batch b) for WHAT but has M GiB: short by S GiB'."""
    bits = min(problem.profile.allowed_bits(cls.rep))
    batch = min(problem.profile.candidates.batch_sizes)
    need = memory_gib(problem, cls, bits, batch, ranks)
    have = cls.rep.memory_gib
    return (f"server {', '.join(s.name for s in cls.servers)}: needs at least {need:.2f} GiB "
            f"({bits}-bit, batch {batch}) for {what} but has {have:g} GiB: short by "
            f"{need - have:.2f} GiB")


def fit_each(problem: Problem, strategy: str,
             patterns: Iterable[Iterable[tuple[dict[str, int], str]]]) -> list[Choice]:
    """Per class, the first (ranks, description) pattern that fits; every class that fits none
    is named in one FedpipeError."""
    choices, problems = [], []
    for cls, options in zip(problem.classes, patterns, strict=True):
        last = None
        for ranks, what in options:
            last = (ranks, what)
            choice = best_config(problem, cls, ranks)
            if choice is not None:
                choices.append(choice)
                break
        else:
            problems.append(shortfall(problem, cls, *last))
    if problems:
        raise FedpipeError(f"strategy {strategy!r} cannot fit every server", problems)
    return choices


def one_rank(problem: Problem, names: list[str], strategy: str) -> list[Choice]:
    """`names` at one rank on every server: the largest ladder rank that every server fits."""
    levels = nonzero_ranks(problem)
    for r in reversed(levels):
        ranks = {n: r for n in names}
        fitted = [best_config(problem, cls, ranks) for cls in problem.classes]
        if all(fitted):
            return fitted
    ranks = {n: levels[0] for n in names}
    raise FedpipeError(f"strategy {strategy!r} cannot fit every server",
                       [shortfall(problem, cls, ranks, f"{len(names)} matrices at rank {levels[0]}")
                        for cls in problem.classes if best_config(problem, cls, ranks) is None])
