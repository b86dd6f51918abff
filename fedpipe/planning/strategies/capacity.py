"""A server's capacity: one number in (0, 1] that the capacity-driven rules (HetLoRA, LEGEND) scale by.

Neither paper fixes a formula: HetLoRA (Cho et al. 2024) gives each client a rank "according to
its system capability", LEGEND (arXiv 2412.20004) sizes LoRA depth by a device's compute and
communication. Here capacity is the geometric mean of the server's memory, throughput and
uplink, each as a share of the fleet's largest: every resource counts equally, and a server
twice as strong in all three has twice the capacity.
"""

from __future__ import annotations

import math

from fedpipe.planning.problem import Problem

RESOURCES = ("memory_gib", "tflops", "uplink_mbps")


def capacities(problem: Problem) -> list[float]:
    """Capacity of each server class, in the order of ``problem.classes``."""
    reps = [c.rep for c in problem.classes]
    top = {f: max(getattr(r, f) for r in reps) for f in RESOURCES}
    return [math.prod(getattr(r, f) / top[f] for f in RESOURCES) ** (1 / len(RESOURCES)) for r in reps]
