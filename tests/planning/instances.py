"""Small random planning instances and exhaustive optima, shared by the MILP and decomposed tests."""

import itertools
import random

import numpy as np

from fedpipe.importance import ImportanceReport
from fedpipe.planning.cost import server_cost
from fedpipe.planning.problem import Choice, build_problem, evaluate
from fedpipe.precision import bytes_per_value
from fedpipe.profile import parse_profile
from fedpipe.shapes import shapes_from_config

# Llama-7B-wide, two layers: realistic GiB-sized coefficients, few matrices.
SHAPES = shapes_from_config({"hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 2,
                             "num_attention_heads": 32, "vocab_size": 32000}, "tiny-wide")


# each narrower precision costs quality (the measured defaults price int8 like fp32, which would
# leave fp32 and bf16 dominated and the brute-force comparisons without a precision trade-off)
PRICED_PRECISIONS = {"fp32": 1.0, "fp16": 0.999, "bf16": 0.998, "int8": 0.99, "nf4": 0.9, "fp4": 0.85}


def random_instance(seed: int, n_servers: int, ranks: list[int], aggregation: str = "hetlora",
                    kind: str = "weighted", precisions: list[str] | None = None,
                    selection: str = "importance"):
    """`precisions`: the wire precision ladder (default fp32 only, the instances' original size);
    `selection`: candidates.selection."""
    rng = random.Random(seed)
    servers = [{"name": f"s{i}", "memory_gib": rng.choice([2.0, 2.6, 3.0, 4.0, 8.0]),
                "tflops": rng.choice([0.5, 2.0, 10.0]), "uplink_mbps": rng.choice([5, 50, 500]),
                "downlink_mbps": rng.choice([20, 200]), "samples": rng.randint(50, 500)}
               for i in range(n_servers)]
    profile = parse_profile({
        "model": "tiny-wide", "aggregation": aggregation,
        "task": {"seq_len": 256, "local_steps": 2},
        "candidates": {"targets": ["q_proj", "down_proj"], "ranks": ranks, "bits": [4, 16],
                       "batch_sizes": [1, 2], "densities": [1.0, 0.25],
                       "precisions": precisions or ["fp32"], "selection": selection},
        "objective": {"kind": kind, "time_weight": rng.choice([0.05, 0.3, 1.0]),
                      "precision_quality": PRICED_PRECISIONS},
        "servers": servers,
    })
    scores = {m.name: rng.random() for m in SHAPES.matrices}
    return build_problem(profile, SHAPES, ImportanceReport(scorer="test", model="tiny-wide", scores=scores))


def selection_allows(problem, adapted) -> bool:
    """candidates.selection, from its definition rather than the planner's walk: under spread a
    set of n matrices is allowed when it has at most ceil(n / L) per layer, per-type counts
    within one of each other over the candidate types, and among all such sets of n it comes
    first in importance order (lexicographically by the ranks of its members)."""
    if problem.profile.candidates.selection == "importance":
        return True
    order = sorted(problem.matrices, key=lambda m: (-problem.weights[m.name], m.name))
    layers, kinds = {m.layer for m in order}, sorted({m.kind for m in order})

    def limits_hold(subset) -> bool:
        n = len(subset)
        per_type = [sum(m.kind == t for m in subset) for t in kinds]
        return (all(sum(m.layer == la for m in subset) <= -(-n // len(layers)) for la in layers)
                and max(per_type) - min(per_type) <= 1)

    allowed = [sub for sub in itertools.combinations(order, len(adapted)) if limits_hold(sub)]
    return bool(allowed) and {m.name for m in allowed[0]} == set(adapted)


def all_configs(problem, k):
    """Every (bits, batch, density, precision) of the profile's ladders for class k, including the
    (density, precision) pairs `Problem.wire_options` leaves out as dominated."""
    c = problem.profile.candidates
    return list(itertools.product(problem.profile.allowed_bits(problem.classes[k].rep), c.batch_sizes,
                                  c.densities, c.precisions))


def per_server_options(problem, k, allow_idle=False):
    """Every (quality term, round time) a server can run within its memory (adapting something
    where the objective requires every server to train, unless `allow_idle`)."""
    cls, names = problem.classes[k], [m.name for m in problem.matrices]
    by_name = {m.name: m for m in problem.matrices}
    out = []
    for q, b, d, p in all_configs(problem, k):
        v_down = bytes_per_value(problem.down_density(d), problem.down_precision(p))
        for ranks in itertools.product(problem.ranks, repeat=len(names)):
            pattern = {n: r for n, r in zip(names, ranks, strict=True) if r > 0}
            down = sum(v_down * by_name[n].lora_params(r) for n, r in pattern.items())
            c = server_cost(problem.cost, cls.rep, q, b, pattern, by_name, down, d, p)
            if c.memory_gib <= cls.rep.memory_gib and selection_allows(problem, pattern) and (
                    pattern or allow_idle or not problem.every_server_trains):
                cov = sum(problem.weights[n] * problem.gain(r) for n, r in pattern.items())
                out.append((problem.omega[k] * problem.config_factor(q, b, d, p) * cov, c.round_s))
    return np.array(out)


def brute_force_objective(problem, allow_idle=False) -> float:
    """The best objective over every combination of per-server options; `allow_idle` drops
    constraint (8) of the rate objective (to show where it binds)."""
    options = [per_server_options(problem, k, allow_idle) for k in range(len(problem.classes))]
    grids = np.meshgrid(*[o[:, 0] for o in options], indexing="ij")
    times = np.meshgrid(*[o[:, 1] for o in options], indexing="ij")
    quality = sum(grids)
    makespan = np.maximum.reduce(times)
    return float(problem.score(quality, makespan).max())


def enumerated_optimum(problem) -> float:
    """The best objective (weighted or rate, as the profile says) over every combination of every
    server's choices, by `evaluate` (so couplings such as flora's stacked download are exact)."""
    names = [m.name for m in problem.matrices]
    options = [[Choice(q, b, {n: r for n, r in zip(names, rs, strict=True) if r > 0}, d, p)
                for q, b, d, p in all_configs(problem, k)
                for rs in itertools.product(problem.ranks, repeat=len(names))
                if (any(rs) or not problem.every_server_trains)
                and selection_allows(problem, [n for n, r in zip(names, rs, strict=True) if r > 0])]
               for k in range(len(problem.classes))]
    return max(e.objective for combo in itertools.product(*options)
               for e in [evaluate(problem, list(combo))]
               if all(c.memory_gib <= cls.rep.memory_gib for c, cls in zip(e.costs, problem.classes, strict=True)))
