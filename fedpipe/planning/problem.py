"""The planning instance: what may be chosen, what it costs, and how good concrete choices are.

Identical servers (a profile entry with ``count``, or entries with the same hardware and data)
form a class with its members and sample share omega_k; every solver (``fedpipe.planning.milp``,
``fedpipe.planning.decompose``) returns one ``Choice`` per class, and ``evaluate`` is the ground
truth both are checked against: costs from ``fedpipe.planning.cost``, quality = sample-weighted
importance covered (gain g(r) = log2(1+r)/log2(1+r_max) per matrix) times what the base
precision, batch, communication density and wire precision keep (``Problem.config_factor``).
Where the profile carries ``calibration.quality`` (`fedpipe calibrate --quality`), the measured
rank gains, per-type shares, batch exponent and bits quality replace those priors.

The objective of a plan with quality q and makespan T (``Problem.score``), by the profile's
``objective.kind``:
    weighted   q - lambda T / T_ref        quality traded against time at a fixed price
    rate       q / T                       progress per second of round time (the target soonest)
Under rate every server trains: each class adapts at least one matrix (constraint (8) of
``fedpipe.planning.milp``). Without it q / T would rather idle a slow server than wait for it,
silently dropping its data; q is already weighted by each server's sample share omega_k.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field, replace
from functools import cached_property
from typing import Any, TypeVar

from fedpipe.importance import ImportanceReport, depth_prior
from fedpipe.planning.cost import (
    WIRE_BYTES_PER_VALUE,
    CostModel,
    ServerCost,
    server_cost,
)
from fedpipe.planning.selection import importance_order, spread_set, spread_sets
from fedpipe.precision import bytes_per_value
from fedpipe.profile import ClusterProfile, Server
from fedpipe.rules import RuleTraits, rule_traits
from fedpipe.shapes import Matrix, ModelShapes

BATCH_EXPONENT = 0.25
BINDING_TOLERANCE = 0.01  # a constraint within 1% of its limit counts as binding

T = TypeVar("T")


def hardware_key(server: Server) -> tuple:
    """What makes two servers the same hardware for planning: every cost and every allowed
    configuration depends on these fields alone (not on the name, count or samples)."""
    return (server.memory_gib, server.tflops, server.uplink_mbps, server.downlink_mbps,
            server.device, tuple(server.bits or ()))


class TableCache:
    """Tables built once and shared: per configuration (fixed memory, base compute per hardware)
    and per rank ladder (the decomposed planner's gain tables). Problems that differ only in
    their servers and deadline (a sweep's points) may share one: its entries depend on the model,
    task, calibration, candidates and importance, and on a server only through their keys."""

    def __init__(self) -> None:
        self._tables: dict[Hashable, Any] = {}

    def get(self, key: Hashable, build: Callable[[], T]) -> T:
        """The table under `key`, built by `build` on first use."""
        if key not in self._tables:
            self._tables[key] = build()
        return self._tables[key]


@dataclass(frozen=True)
class Choice:
    """One class's configuration."""

    bits: int
    batch: int
    ranks: dict[str, int] = field(hash=False)  # only adapted matrices (rank > 0)
    density: float = 1.0  # communication density of the upload (and download, where lossy may be)
    precision: str = "fp32"  # wire precision of the upload's values (likewise)


@dataclass
class ServerClass:
    """Profile entries with identical hardware and data, planned as one."""

    servers: list[Server]

    @property
    def rep(self) -> Server:
        return self.servers[0]

    @property
    def count(self) -> int:
        return sum(s.count for s in self.servers)


@dataclass
class Problem:
    """The planning instance with its cost tables precomputed."""

    profile: ClusterProfile
    shapes: ModelShapes
    cost: CostModel
    importance: ImportanceReport
    weights: dict[str, float]  # normalised importance per candidate matrix
    matrices: list[Matrix]
    classes: list[ServerClass]
    omega: list[float]
    t_ref: float = 1.0
    cache: TableCache = field(default_factory=TableCache, repr=False, compare=False)

    def score(self, quality: Any, makespan: Any) -> Any:
        """The objective for a quality and makespan (floats or numpy arrays alike): see the
        module docstring."""
        o = self.profile.objective
        if o.kind == "rate":
            return quality / makespan
        return quality - o.time_weight * makespan / self.t_ref

    @property
    def restricted(self) -> bool:
        """Whether the selection rule limits the sets a class may adapt (spread)."""
        return self.profile.candidates.selection != "importance"

    @cached_property
    def adaptable_sets(self) -> dict[int, frozenset[str]]:
        """Under ``candidates.selection: spread`` the one set a class may adapt per count offered
        (fedpipe.planning.selection); every count is walked, so only the solvers that search
        over counts ask for all of them."""
        return spread_sets(self.matrices, self.weights)

    def selection_allows(self, ranks: dict[str, int]) -> bool:
        """Whether a class may adapt exactly the matrices of `ranks` (its keys)."""
        if not self.restricted:
            return True
        n = len(ranks)
        if n not in self._spread_walks:  # thousands of classes share a few counts
            self._spread_walks[n] = spread_set(importance_order(self.matrices, self.weights), n)
        return ranks.keys() == self._spread_walks[n]

    def selection_holds(self, choices: list[Choice]) -> bool:
        """selection_allows for every class (classes sharing a Choice object checked once)."""
        return all(self.selection_allows(ch.ranks) for ch in {id(ch): ch for ch in choices}.values())

    @cached_property
    def _spread_walks(self) -> dict[int, frozenset[str] | None]:
        return {}

    def relaxed(self) -> Problem:
        """The same instance with any set allowed: its optimum bounds this one's, and is this
        one's when its choices happen to obey the selection (solvers try it first: cheap, and
        exact whenever the selection does not bind, e.g. every candidate adapted)."""
        c = self.profile.candidates
        profile = self.profile.model_copy(
            update={"candidates": c.model_copy(update={"selection": "importance"})})
        return replace(self, profile=profile)

    @property
    def every_server_trains(self) -> bool:
        """Constraint (8): each class adapts at least one matrix (the rate objective)."""
        return self.profile.objective.kind == "rate"

    def fixed_memory_gib(self, bits: int, batch: int, device: str) -> float:
        """cost.fixed_memory_gib, cached: thousands of servers share a few configurations."""
        return self.cache.get(("fixed memory", bits, batch, device),
                              lambda: self.cost.fixed_memory_gib(bits, batch, device))

    def base_compute_s(self, bits: int, batch: int, server: Server) -> float:
        """cost.base_compute_s, cached per hardware."""
        return self.cache.get(("base compute", bits, batch, hardware_key(server)),
                              lambda: self.cost.base_compute_s(bits, batch, server))

    @property
    def ranks(self) -> list[int]:
        return self.profile.candidates.ranks

    def configs(self, k: int) -> list[tuple[int, int, float, str]]:
        """Class k's (bits, batch, density, precision) choices."""
        return self.configs_for(self.classes[k].rep)

    def configs_for(self, server: Server) -> list[tuple[int, int, float, str]]:
        return [(q, b, d, p) for q, b in self.base_configs(server) for d, p in self.wire_options]

    def base_configs(self, server: Server) -> list[tuple[int, int]]:
        """The server's (bits, batch) choices: what fixed memory and base compute depend on."""
        return [(q, b) for q in self.profile.allowed_bits(server)
                for b in self.profile.candidates.batch_sizes]

    @cached_property
    def wire_options(self) -> list[tuple[float, str]]:
        """The (density, precision) pairs worth choosing from the two ladders. Memory and compute
        do not depend on them, so a pair that sends at least as many bytes up and down as another
        and keeps no more quality is never needed (ties keep the earlier, wider one): left out,
        it leaves every solver's optimum unchanged and shrinks the search."""
        c = self.profile.candidates
        every = [(d, p) for d in c.densities for p in c.precisions]
        cost = [(bytes_per_value(d, p), bytes_per_value(self.down_density(d), self.down_precision(p)),
                 -self.wire_factor(d, p)) for d, p in every]

        def dominated(i: int) -> bool:
            return any(all(x <= y for x, y in zip(cost[j], cost[i], strict=True))
                       and (cost[j] != cost[i] or j < i) for j in range(len(every)) if j != i)

        return [pair for i, pair in enumerate(every) if not dominated(i)]

    def gain(self, r: int) -> float:
        """g(r), the share of the top rank's progress a matrix at rank r gives: measured where the
        profile carries ``calibration.quality``, else the prior log2(1+r)/log2(1+r_max)."""
        measured = self.profile.calibration.quality
        if measured is not None and r > 0:
            return measured.rank_gain[r]
        return math.log2(1 + r) / math.log2(1 + max(self.ranks))

    def wire_factor(self, density: float, precision: str) -> float:
        """Quality a round keeps at this communication density and wire precision (the profile's
        priors, one factor each)."""
        o = self.profile.objective
        return o.density_quality.get(density, 1.0) * o.precision_quality.get(precision, 1.0)

    def config_factor(self, bits: int, batch: int, density: float = 1.0,
                      precision: str = "fp32") -> float:
        o, measured = self.profile.objective, self.profile.calibration.quality
        bits_quality = o.bits_quality if measured is None else measured.bits_quality
        exponent = BATCH_EXPONENT if measured is None else measured.batch_exponent
        b_max = max(self.profile.candidates.batch_sizes)
        return (bits_quality.get(bits, 1.0) * (batch / b_max) ** exponent
                * self.wire_factor(density, precision))

    def down_density(self, density: float) -> float:
        """The download's density for an upload density: dense where the rule allows no lossy
        download (flora merges its stack into the base)."""
        return density if self.rule.sparse_download else 1.0

    def down_precision(self, precision: str) -> str:
        """The download's precision for an upload precision: fp32 where the rule allows no lossy
        download (`fedpipe.plan.check_densities`)."""
        return precision if self.rule.sparse_download else "fp32"

    @property
    def densest(self) -> float:
        """The homogeneous baseline's density: it maximises quality, so the densest allowed."""
        return self.profile.candidates.densities[0]

    @property
    def widest(self) -> str:
        """The homogeneous baseline's wire precision: the most bytes per value allowed."""
        return self.profile.candidates.precisions[0]

    @property
    def rule(self) -> RuleTraits:
        """The aggregation rule's traits: its broadcast decides what every server downloads."""
        return rule_traits(self.profile.aggregation)


def group_servers(servers: list[Server]) -> list[ServerClass]:
    """Group entries whose hardware (allowed bits included) and data are identical."""
    groups: dict[tuple, ServerClass] = {}
    for s in servers:
        groups.setdefault((hardware_key(s), s.samples), ServerClass([])).servers.append(s)
    return list(groups.values())


def with_type_shares(weights: dict[str, float], matrices: list[Matrix],
                     shares: dict[str, float]) -> dict[str, float]:
    """Importance rescaled so that each matrix type carries its measured share of the quality
    (normalised over the candidate types) and importance only ranks matrices within a type: the
    probes found the type, not the per-matrix score, to predict what adapting a matrix is worth."""
    kinds = {m.name: m.kind for m in matrices}
    members = {t: [n for n, k in kinds.items() if k == t] for t in set(kinds.values())}
    total = sum(shares[t] for t in members)
    out = {}
    for t, names in members.items():
        held = sum(weights[n] for n in names)
        for n in names:
            within = weights[n] / held if held > 0 else 1 / len(names)
            out[n] = within * shares[t] / total
    return out


def build_problem(profile: ClusterProfile, shapes: ModelShapes,
                  importance: ImportanceReport | None = None, cache: TableCache | None = None) -> Problem:
    """The instance; `cache` may be shared by problems that differ only in their servers and
    deadline (see TableCache)."""
    importance = importance or depth_prior(shapes)
    matrices = list(shapes.candidates(profile.candidates.targets))
    classes = group_servers(profile.servers)
    total = sum(c.count * c.rep.samples for c in classes)
    weights = importance.normalised([m.name for m in matrices])
    if profile.calibration.quality is not None:
        weights = with_type_shares(weights, matrices, profile.calibration.quality.type_share)
    return Problem(
        profile=profile, shapes=shapes, cost=CostModel.for_profile(profile, shapes),
        importance=importance, weights=weights,
        matrices=matrices, classes=classes,
        omega=[c.count * c.rep.samples / total for c in classes],
        cache=TableCache() if cache is None else cache,
    )



# ---------------------------------------------------------------- evaluation (the ground truth)
@dataclass
class Evaluation:
    """Costs and quality of concrete choices, computed from the formulas, not from the solver."""

    costs: list[ServerCost]
    covered: list[float]
    quality: float
    makespan: float
    objective: float


def _adapter_values(choice: Choice, by_name: dict[str, Matrix]) -> int:
    """P(r): the adapter's parameter count, what travels (times bytes per value)."""
    return sum(by_name[n].lora_params(r) for n, r in choice.ranks.items())


def evaluate(problem: Problem, choices: list[Choice]) -> Evaluation:
    """Costs, quality and objective of concrete choices. Classes sharing hardware and a Choice
    object (as the decomposed planner returns them) are costed once."""
    by_name = {m.name: m for m in problem.matrices}
    own: dict[int, int] = {}
    for ch in choices:
        if id(ch) not in own:
            own[id(ch)] = _adapter_values(ch, by_name)
    stack = (WIRE_BYTES_PER_VALUE * sum(c.count * own[id(ch)]
                                        for c, ch in zip(problem.classes, choices, strict=True))
             if problem.rule.broadcasts_stack else None)
    gain = {r: problem.gain(r) for r in problem.ranks}
    costs, covered, memo = [], [], {}
    for cls, ch in zip(problem.classes, choices, strict=True):
        rep = cls.rep
        key = (id(ch), hardware_key(rep))
        if key not in memo:
            down = (bytes_per_value(problem.down_density(ch.density),
                                    problem.down_precision(ch.precision)) * own[id(ch)]
                    if stack is None else stack)
            memo[key] = (server_cost(problem.cost, rep, ch.bits, ch.batch, ch.ranks, by_name, down,
                                     ch.density, ch.precision),
                         sum(problem.weights[n] * gain[r] for n, r in ch.ranks.items()))
        costs.append(memo[key][0])
        covered.append(memo[key][1])
    quality = sum(o * problem.config_factor(ch.bits, ch.batch, ch.density, ch.precision) * cov
                  for o, ch, cov in zip(problem.omega, choices, covered, strict=True))
    makespan = max(c.round_s for c in costs)
    objective = problem.score(quality, makespan)
    return Evaluation(costs, covered, quality, makespan, objective)


def is_feasible(problem: Problem, choices: list[Choice], evaluation: Evaluation) -> bool:
    """Memory, the deadline, the selection rule (spread: each class adapts the spread set of its
    count) and, under the rate objective, (8): every class adapts something."""
    deadline = problem.profile.objective.deadline_s
    if problem.every_server_trains and not all(ch.ranks for ch in choices):
        return False
    if not problem.selection_holds(choices):
        return False
    mem_ok = all(c.memory_gib <= cls.rep.memory_gib * (1 + 1e-9)
                 for c, cls in zip(evaluation.costs, problem.classes, strict=True))
    return mem_ok and (deadline is None or evaluation.makespan <= deadline * (1 + 1e-9))


# ---------------------------------------------------------------- diagnosis
def diagnose_infeasible(problem: Problem) -> list[str]:
    """Servers that cannot fit even the smallest configuration, and by how much."""
    problems = []
    deadline = problem.profile.objective.deadline_s
    for cls in problem.classes:
        rep = cls.rep
        fixed = {(q, b): problem.fixed_memory_gib(q, b, rep.device) for q, b in problem.base_configs(rep)}
        (q, b), need = min(fixed.items(), key=lambda kv: kv[1])
        names = ", ".join(s.name for s in cls.servers)
        if need > rep.memory_gib:
            problems.append(f"server {names}: needs at least {need:.2f} GiB ({q}-bit, batch {b}, "
                            f"no adapters) but has {rep.memory_gib:g} GiB: short by "
                            f"{need - rep.memory_gib:.2f} GiB")
        elif deadline is not None:
            fastest = min(problem.base_compute_s(q, b, rep) for q, b in fixed
                          if fixed[(q, b)] <= rep.memory_gib)
            if fastest > deadline:
                problems.append(f"server {names}: the fastest configuration takes {fastest:.1f} s "
                                f"per round, over the deadline of {deadline:g} s by "
                                f"{fastest - deadline:.1f} s")
    return problems or (_cannot_train(problem) if problem.every_server_trains else [])


def _cannot_train(problem: Problem) -> list[str]:
    """(8) under the rate objective: servers that cannot adapt even one matrix at the smallest
    rank within memory (and, with a deadline, in time; own download only, a lower bound)."""
    problems, deadline = [], problem.profile.objective.deadline_s
    by_name = {m.name: m for m in problem.matrices}
    # a matrix's cost depends on its kind and shape alone, a class's on its hardware alone
    shapes = list({(m.kind, m.d_out, m.d_in): m for m in problem.matrices}.values())
    r1 = min(r for r in problem.ranks if r > 0)
    trials_of: dict[tuple, list] = {}
    for k, cls in enumerate(problem.classes):
        rep, names = cls.rep, ", ".join(s.name for s in cls.servers)
        trials = trials_of.get(hardware_key(rep))
        if trials is None:
            trials = trials_of[hardware_key(rep)] = [
                server_cost(problem.cost, rep, q, b, {m.name: r1}, by_name,
                            bytes_per_value(problem.down_density(d), problem.down_precision(p))
                            * m.lora_params(r1), d, p)
                for q, b, d, p in problem.configs(k) for m in shapes]
        fitting = [c for c in trials if c.memory_gib <= rep.memory_gib]
        if not fitting:
            need = min(c.memory_gib for c in trials)
            problems.append(f"server {names}: training one matrix at rank {r1} (objective rate: every "
                            f"server trains) needs at least {need:.2f} GiB but it has "
                            f"{rep.memory_gib:g} GiB: short by {need - rep.memory_gib:.2f} GiB")
        elif deadline is not None and min(c.round_s for c in fitting) > deadline:
            fastest = min(c.round_s for c in fitting)
            problems.append(f"server {names}: training one matrix at rank {r1} (objective rate: "
                            f"every server trains) takes at least {fastest:.1f} s per round, over "
                            f"the deadline of {deadline:g} s by {fastest - deadline:.1f} s")
    return problems


def memory_limited(problem: Problem, choices: list[Choice]) -> list[str]:
    """Servers whose memory decides the common configuration."""
    ev = evaluate(problem, choices)
    return [s.name for c, cls in zip(ev.costs, problem.classes, strict=True)
            if c.memory_gib >= cls.rep.memory_gib * (1 - BINDING_TOLERANCE) for s in cls.servers]


