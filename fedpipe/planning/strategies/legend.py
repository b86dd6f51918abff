"""legend: LoRA on the last L layers only, ranks growing with depth, both sized by capacity.

LEGEND (arXiv 2412.20004) observes that deeper layers matter more for fine-tuning and assigns
each device a LoRA depth (adapt only the last L layers) by its capability, with a rank
distribution that increases with depth. Here L = capacity x layers (at least 1), the top rank is
the largest ladder rank at most capacity x the ladder's top, and the adapted layers step up the
ladder evenly from its smallest rank at the shallowest to that top rank at the last layer; every
candidate matrix type of an adapted layer is adapted. A server whose memory cannot hold that
takes fewer layers, then a lower top rank. Bits and batch: the most that fit.
"""

from __future__ import annotations

from fedpipe.planning.problem import Choice, Problem

from .base import SolveOptions, heuristic
from .capacity import capacities
from .fit import fit_each, ladder_rank, nonzero_ranks

NAME = "legend"


def depth_ranks(problem: Problem, depth: int, top: int) -> dict[str, int]:
    """Ranks for the last `depth` layers, non-decreasing with depth up to `top`."""
    layers = problem.shapes.layers
    levels = [r for r in nonzero_ranks(problem) if r <= top]
    first = layers - depth
    return {m.name: levels[(m.layer - first) * len(levels) // depth]
            for m in problem.matrices if m.layer >= first}


def _rule(problem: Problem, options: SolveOptions) -> list[Choice]:
    layers = problem.shapes.layers
    patterns = []
    for c in capacities(problem):
        depth, top = max(1, round(c * layers)), ladder_rank(problem, c)
        patterns.append([(depth_ranks(problem, d, r), f"the last {d} layers up to rank {r}")
                         for r in reversed(nonzero_ranks(problem)) if r <= top
                         for d in range(depth, 0, -1)])
    return fit_each(problem, NAME, patterns)


STRATEGY = heuristic(NAME, "LoRA depth and depth-increasing ranks by capacity (LEGEND, "
                     "arXiv 2412.20004)", _rule)
