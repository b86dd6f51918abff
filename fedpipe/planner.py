r"""The planner: which matrices each server adapts, at what rank, on how many bits, with what batch.

Identical servers (a profile entry with ``count``, or entries with the same hardware and data)
form a class k with c_k members and n_k samples each; they share one configuration, which is
optimal because servers couple only through the round time T. Per class k, configurations
j = (bits q_j, batch b_j, communication density d_j) from its allowed set J_k; candidate
matrices m with normalised importance w_m (sum 1); rank ladder R (0 = not adapted); gain
g(r) = log2(1+r)/log2(1+r_max).

Matrices of one type t (q_proj, ...) have one shape, so they cost the same at a given rank: an
optimal plan gives more important matrices of a type at least the rank of less important ones
(swapping two ranks never lowers the gain when gains are sorted). So per type only *how many*
matrices reach each rank level matters: n_kjtl = number of type-t matrices at rank >= r_l, and
those are the n_kjtl most important ones. With w_t(1) >= w_t(2) >= ... the sorted importances and
S_t(a) their prefix sums, the gain of level l is dg_l * S_t(n_kjtl), a concave piecewise-linear
function of the integer n_kjtl, bounded by its chords. This is exact, and it leaves
|configs| x |types| x |levels| integers per class instead of one binary per matrix and rank.

Variables: z_kj in {0,1}; n_kjtl integer in [0, N_t]; G_kjtl >= 0; round time T >= 0.

    maximise   sum_k omega_k sum_j f_j sum_tl dg_l G_kjtl  -  lambda T / T_ref
    subject to
    (1) sum_j z_kj = 1                                           one configuration per class
    (2) n_kjt1 <= N_t z_kj,  n_kjtl <= n_kjt(l-1)                ranks nest; nothing unless chosen
    (3) G_kjtl <= S_t(a) + w_t(a+1) (n_kjtl - a), a = 0..N_t-1   chords of the concave gain
    (4) sum_j [F_kj z_kj + sum_tl dL_tl(b_j) n_kjtl] <= M_k                     memory (GiB)
    (5) sum_j [C_kj z_kj + sum_tl (dtau_ktl(b_j) + dU_ktl + dD_ktl) n_kjtl] [+ D / down_k] <= T
    (6) T <= deadline                                            when the profile sets one
    (7) D = sum_k' c_k' sum_jtl dbytes_tl n_k'jtl                flora only: everyone downloads the stack

omega_k = c_k n_k / sum c n (sample share); f_j = bits_quality[q_j] (b_j / b_max)^(1/4)
density_quality[d_j] (quality per round grows sublinearly with the samples seen; top-k
communication keeps most, not all, of a dense round's progress); dg_l = g(r_l) - g(r_(l-1)) with
g(r) = log2(1+r) / log2(1+r_max); d* are the increments of each cost from r_(l-1) to r_l.
F, L: fixed and per-adapter memory; C, tau: base and LoRA compute time; U, D: transfer times,
at v(d_j) bytes per value (cost.bytes_per_value: 4 dense, about 16 d + 1/8 sparse; flora's stack
is broadcast dense). So a sparse density is chosen exactly when a server's link makes the time
it saves worth more than the quality it costs. T_ref is the homogeneous baseline's makespan, so lambda is
"quality given up per baseline-round of time".

Methods (``plan_problem(method=...)``, ``fedpipe plan --method``): "milp" builds and solves the
model above (``solve_milp``, the reference); "decomposed" (``fedpipe.decompose``) searches over T
with independent per-hardware subproblems and proves its own gap; "auto" takes the MILP while it
is tiny (at most AUTO_MILP_ROWS chord rows (3), where it proves optimality in well under a
second) and the decomposed search above (measured: at 2160 rows 0.9 s vs 0.6 s, at 6480 rows
37 s vs 1.2 s, Llama-2-7B's five hospitals 60 s with a 1.3% gap vs 0.3 s proven optimal).

Everything is in GiB and seconds: byte-sized coefficients made CBC return wrong optima.
The status is reported as proven by the solver (pulp's ``sol_status``, not ``LpStatus``, which
says "Optimal" when a time limit stopped the search), with the relative gap when known.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import pulp

from fedpipe.cost import WIRE_BYTES_PER_VALUE, CostModel, ServerCost, bytes_per_value, server_cost
from fedpipe.errors import FedpipeError
from fedpipe.importance import ImportanceReport, depth_prior
from fedpipe.plan import (
    Baseline,
    ImportanceRef,
    Plan,
    Prediction,
    ProfileRef,
    ServerPlan,
    SolverReport,
    Summary,
)
from fedpipe.profile import ClusterProfile, Server, load_profile, profile_hash
from fedpipe.shapes import Matrix, ModelShapes, load_shapes

BATCH_EXPONENT = 0.25
BINDING_TOLERANCE = 0.01
OBJECTIVE_SCALE = 1000.0
SOLVERS = ("highs", "cbc")
METHODS = ("auto", "milp", "decomposed")
AUTO_MILP_ROWS = 2000  # chord rows up to which "auto" uses the MILP (see choose_method)


@dataclass(frozen=True)
class Choice:
    """One class's configuration."""

    bits: int
    batch: int
    ranks: dict[str, int] = field(hash=False)  # only adapted matrices (rank > 0)
    density: float = 1.0  # communication density of the upload (and non-flora download)


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
    _memo: dict = field(default_factory=dict, repr=False, compare=False)

    def fixed_memory_gib(self, bits: int, batch: int, device: str) -> float:
        """cost.fixed_memory_gib, memoised: thousands of servers share a few configurations."""
        key = ("fixed", bits, batch, device)
        if key not in self._memo:
            self._memo[key] = self.cost.fixed_memory_gib(bits, batch, device)
        return self._memo[key]

    def base_compute_s(self, bits: int, batch: int, server: Server) -> float:
        """cost.base_compute_s, memoised per hardware."""
        key = ("base", bits, batch, server.tflops, server.memory_gib, server.uplink_mbps,
               server.downlink_mbps, server.device)
        if key not in self._memo:
            self._memo[key] = self.cost.base_compute_s(bits, batch, server)
        return self._memo[key]

    @property
    def ranks(self) -> list[int]:
        return self.profile.candidates.ranks

    def configs(self, k: int) -> list[tuple[int, int, float]]:
        """Class k's (bits, batch, density) choices."""
        return self.configs_for(self.classes[k].rep)

    def configs_for(self, server: Server) -> list[tuple[int, int, float]]:
        c = self.profile.candidates
        return [(q, b, d) for q in self.profile.allowed_bits(server) for b in c.batch_sizes
                for d in c.densities]

    def gain(self, r: int) -> float:
        return math.log2(1 + r) / math.log2(1 + max(self.ranks))

    def config_factor(self, bits: int, batch: int, density: float = 1.0) -> float:
        o = self.profile.objective
        b_max = max(self.profile.candidates.batch_sizes)
        return (o.bits_quality.get(bits, 1.0) * (batch / b_max) ** BATCH_EXPONENT
                * o.density_quality.get(density, 1.0))

    def down_density(self, density: float) -> float:
        """The download's density for an upload density: flora broadcasts its stack dense."""
        return 1.0 if self.flora else density

    @property
    def densest(self) -> float:
        """The homogeneous baseline's density: it maximises quality, so the densest allowed."""
        return self.profile.candidates.densities[0]

    @property
    def flora(self) -> bool:
        return self.profile.aggregation == "flora"


def group_servers(servers: list[Server]) -> list[ServerClass]:
    """Group entries whose hardware, data and allowed bits are identical."""
    groups: dict[tuple, ServerClass] = {}
    for s in servers:
        key = (s.memory_gib, s.tflops, s.uplink_mbps, s.downlink_mbps, s.samples, s.device,
               tuple(s.bits or ()))
        groups.setdefault(key, ServerClass([])).servers.append(s)
    return list(groups.values())


def build_problem(profile: ClusterProfile, shapes: ModelShapes,
                  importance: ImportanceReport | None = None, memo: dict | None = None) -> Problem:
    """The instance with its tables. `memo` may be shared by problems that differ only in their
    servers and deadline (a sweep's points): its entries depend on the model, task, calibration,
    candidates and importance, and on a server's hardware only through their keys."""
    importance = importance or depth_prior(shapes)
    matrices = list(shapes.candidates(profile.candidates.targets))
    classes = group_servers(profile.servers)
    total = sum(c.count * c.rep.samples for c in classes)
    return Problem(
        profile=profile, shapes=shapes, cost=CostModel.for_profile(profile, shapes),
        importance=importance, weights=importance.normalised([m.name for m in matrices]),
        matrices=matrices, classes=classes,
        omega=[c.count * c.rep.samples / total for c in classes],
        _memo={} if memo is None else memo,
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
             if problem.flora else None)
    gain = {r: problem.gain(r) for r in problem.ranks}
    costs, covered, memo = [], [], {}
    for cls, ch in zip(problem.classes, choices, strict=True):
        rep = cls.rep
        key = (id(ch), rep.memory_gib, rep.tflops, rep.uplink_mbps, rep.downlink_mbps, rep.device)
        if key not in memo:
            down = bytes_per_value(ch.density) * own[id(ch)] if stack is None else stack
            memo[key] = (server_cost(problem.cost, rep, ch.bits, ch.batch, ch.ranks, by_name, down,
                                     ch.density),
                         sum(problem.weights[n] * gain[r] for n, r in ch.ranks.items()))
        costs.append(memo[key][0])
        covered.append(memo[key][1])
    quality = sum(o * problem.config_factor(ch.bits, ch.batch, ch.density) * cov
                  for o, ch, cov in zip(problem.omega, choices, covered, strict=True))
    makespan = max(c.round_s for c in costs)
    objective = quality - problem.profile.objective.time_weight * makespan / problem.t_ref
    return Evaluation(costs, covered, quality, makespan, objective)


def is_feasible(problem: Problem, choices: list[Choice], evaluation: Evaluation) -> bool:
    deadline = problem.profile.objective.deadline_s
    mem_ok = all(c.memory_gib <= cls.rep.memory_gib * (1 + 1e-9)
                 for c, cls in zip(evaluation.costs, problem.classes, strict=True))
    return mem_ok and (deadline is None or evaluation.makespan <= deadline * (1 + 1e-9))


# ---------------------------------------------------------------- diagnosis
def diagnose_infeasible(problem: Problem) -> list[str]:
    """Servers that cannot fit even the smallest configuration, and by how much."""
    problems = []
    deadline = problem.profile.objective.deadline_s
    for k, cls in enumerate(problem.classes):
        rep = cls.rep
        fixed = {(q, b): problem.fixed_memory_gib(q, b, rep.device) for q, b, _ in problem.configs(k)}
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
    return problems


# ---------------------------------------------------------------- the MILP
def check_solver(name: str) -> None:
    """An unknown --solver is an error whichever method runs (the decomposed one uses none)."""
    if name not in SOLVERS:
        raise FedpipeError(f"--solver: unknown solver {name!r}", [f"valid: {', '.join(SOLVERS)}"])


def _solver(name: str, time_limit: float | None) -> pulp.LpSolver:
    check_solver(name)
    if name == "highs":
        if not pulp.HiGHS().available():
            raise FedpipeError("solver 'highs' is not available: pip install highspy (or --solver cbc)")
        return pulp.HiGHS(msg=False, timeLimit=time_limit, gapRel=1e-4)
    return pulp.PULP_CBC_CMD(msg=False, timeLimit=time_limit, gapRel=1e-4)


def default_solver() -> str:
    return "highs" if pulp.HiGHS().available() else "cbc"


def _status(prob: pulp.LpProblem) -> str:
    """What was proven. pulp's HiGHS interface reports a time-limited incumbent as optimal, so
    HiGHS's own model status decides there."""
    status = {1: "optimal", 2: "feasible", -1: "infeasible", -2: "infeasible"}.get(prob.sol_status,
                                                                                   "not_solved")
    model = getattr(prob, "solverModel", None)  # set by pulp's HiGHS interface
    if status == "optimal" and model is not None:
        import highspy

        if model.getModelStatus() != highspy.HighsModelStatus.kOptimal:
            status = "feasible"
    return status


def _mip_gap(prob: pulp.LpProblem, status: str) -> float | None:
    """The relative gap HiGHS reports; None where the solver does not say (CBC through pulp)."""
    model = getattr(prob, "solverModel", None)
    if model is None:
        return 0.0 if status == "optimal" else None
    try:
        return float(model.getInfo().mip_gap)
    except Exception:  # the solver did not expose a gap: say we do not know
        return None


@dataclass
class _TypeGroup:
    """The candidate matrices of one type, most important first."""

    shape: Matrix
    names: list[str]
    weights: list[float]

    @property
    def prefix(self) -> list[float]:
        out = [0.0]
        for w in self.weights:
            out.append(out[-1] + w)
        return out


def _type_groups(problem: Problem) -> list[_TypeGroup]:
    groups: dict[str, _TypeGroup] = {}
    for m in problem.matrices:
        groups.setdefault(m.kind, _TypeGroup(m, [], []))
    for g in groups.values():
        members = sorted((m for m in problem.matrices if m.kind == g.shape.kind),
                         key=lambda m: -problem.weights[m.name])
        g.names = [m.name for m in members]
        g.weights = [problem.weights[m.name] for m in members]
    return list(groups.values())


@dataclass
class _Block:
    """One configuration's count variables n[t, l] and its (unscaled) gain expression."""

    z: pulp.LpVariable | None
    n: dict[tuple[int, int], pulp.LpVariable]
    gain: pulp.LpAffineExpression


def _block(prob: pulp.LpProblem, tag: str, problem: Problem, groups: list[_TypeGroup],
           z: pulp.LpVariable | None) -> _Block:
    """Constraints (2) and (3) for one configuration."""
    levels = [r for r in problem.ranks if r > 0]
    gains = [problem.gain(r) for r in [0] + levels]
    n, gain_terms = {}, []
    for t, g in enumerate(groups):
        size, prefix = len(g.names), g.prefix
        for lv in range(len(levels)):
            n[t, lv] = v = pulp.LpVariable(f"n_{tag}_{t}_{lv}", 0, size, cat="Integer")
            upper = size * z if z is not None else size
            prob += v <= (n[t, lv - 1] if lv else upper), f"c2_{tag}_{t}_{lv}"
            G = pulp.LpVariable(f"G_{tag}_{t}_{lv}", 0)
            for a in range(size):
                prob += G - g.weights[a] * v <= prefix[a] - g.weights[a] * a, f"c3_{tag}_{t}_{lv}_{a}"
            gain_terms.append((G, gains[lv + 1] - gains[lv]))
    return _Block(z, n, pulp.LpAffineExpression(gain_terms))


def _increments(groups: list[_TypeGroup], ranks: list[int], cost_of) -> dict[tuple[int, int], float]:
    """Cost of moving one matrix of type t from the previous rank level to level l."""
    levels = [0] + [r for r in ranks if r > 0]
    return {(t, lv - 1): cost_of(g.shape, levels[lv]) - cost_of(g.shape, levels[lv - 1])
            for t, g in enumerate(groups) for lv in range(1, len(levels))}


def _ranks_from_counts(block: _Block, groups: list[_TypeGroup], ranks: list[int]) -> dict[str, int]:
    levels = [r for r in ranks if r > 0]
    out = {}
    for t, g in enumerate(groups):
        counts = [round(block.n[t, lv].value() or 0) for lv in range(len(levels))]
        for a, name in enumerate(g.names):
            reached = [levels[lv] for lv in range(len(levels)) if a < counts[lv]]
            if reached:
                out[name] = reached[-1]
    return out


def _affine(terms: list[tuple[pulp.LpVariable, float]]) -> pulp.LpAffineExpression:
    """Sum of coef * var, adding repeated variables (LpAffineExpression keeps only the last)."""
    acc: dict[pulp.LpVariable, float] = {}
    for v, c in terms:
        acc[v] = acc.get(v, 0.0) + c
    return pulp.LpAffineExpression(list(acc.items()))


def _solve(prob: pulp.LpProblem, solver: str, time_limit: float | None) -> SolverReport:
    start = time.perf_counter()
    slv = _solver(solver, time_limit)
    prob.solve(slv)
    elapsed = time.perf_counter() - start
    status = _status(prob)
    objective = pulp.value(prob.objective) if status in ("optimal", "feasible") else None
    return SolverReport(solver=solver, status=status, gap=_mip_gap(prob, status),
                        solve_time_s=round(elapsed, 3), time_limit_s=time_limit,
                        objective=None if objective is None else objective / OBJECTIVE_SCALE)


def solve_milp(problem: Problem, solver: str,
               time_limit: float | None) -> tuple[list[Choice] | None, SolverReport]:
    """Build and solve (1)-(7) of the module docstring."""
    p, cost = problem.profile, problem.cost
    groups = _type_groups(problem)
    prob = pulp.LpProblem("fedpipe_plan", pulp.LpMaximize)
    T = pulp.LpVariable("T", lowBound=0, upBound=p.objective.deadline_s)  # (6)
    blocks: dict[tuple[int, int], _Block] = {}
    quality, timing = [], {}
    wire = _increments(groups, problem.ranks, lambda m, r: cost.wire_bytes(m, r))
    for k, cls in enumerate(problem.classes):
        rep = cls.rep
        memory, timing[k] = [], []
        for j, (q, b, d) in enumerate(problem.configs(k)):
            fixed = problem.fixed_memory_gib(q, b, rep.device)
            if fixed > rep.memory_gib:
                continue  # this configuration cannot fit whatever the ranks
            z = pulp.LpVariable(f"z_{k}_{j}", cat="Binary")
            blocks[k, j] = blk = _block(prob, f"{k}_{j}", problem, groups, z)
            quality.append(problem.omega[k] * problem.config_factor(q, b, d) * blk.gain)
            mem = _increments(groups, problem.ranks,
                              lambda m, r, b=b, d=rep.device: cost.lora_memory_gib(m, r, b, d))
            tau = _increments(groups, problem.ranks, lambda m, r, b=b, s=rep: cost.lora_compute_s(m, r, b, s))
            up = bytes_per_value(d) / WIRE_BYTES_PER_VALUE
            down = 0.0 if problem.flora else up  # flora's download is the stack, (7)
            memory += [(z, fixed)] + [(blk.n[key], c) for key, c in mem.items()]
            timing[k] += [(z, problem.base_compute_s(q, b, rep))] + [
                (blk.n[key], tau[key] + cost.transfer_s(up * wire[key], rep.uplink_mbps)
                 + cost.transfer_s(down * wire[key], rep.downlink_mbps)) for key in tau]
        prob += pulp.lpSum(blk.z for (kk, _), blk in blocks.items() if kk == k) == 1, f"c1_{k}"
        prob += _affine(memory) <= rep.memory_gib, f"c4_{k}"
    if problem.flora:  # (7) every server downloads the stack of all servers' adapters
        stack = [(blk.n[key], problem.classes[k].count * wire[key])
                 for (k, _), blk in blocks.items() for key in blk.n]
        for k, cls in enumerate(problem.classes):
            timing[k] += [(v, cost.transfer_s(n, cls.rep.downlink_mbps)) for v, n in stack]
    for k in range(len(problem.classes)):
        prob += _affine(timing[k]) - T <= 0, f"c5_{k}"  # flora repeats own n: summed
    # scaled: per-matrix gains near 1e-5 made HiGHS stall on "excessively small costs"
    prob += OBJECTIVE_SCALE * (pulp.lpSum(quality) - p.objective.time_weight / problem.t_ref * T)

    report = _solve(prob, solver, time_limit)
    if report.status not in ("optimal", "feasible"):
        return None, report
    choices = []
    for k in range(len(problem.classes)):
        (_, j), blk = max(((key, b) for key, b in blocks.items() if key[0] == k),
                          key=lambda kb: kb[1].z.value() or 0)
        q, b, d = problem.configs(k)[j]
        choices.append(Choice(q, b, _ranks_from_counts(blk, groups, problem.ranks), d))
    return choices, report


# ---------------------------------------------------------------- homogeneous baseline
def solve_baseline(problem: Problem, solver: str,
                   time_limit: float | None) -> tuple[list[Choice], list[str]] | None:
    """Every server on one common configuration: the best one the weakest can run (quality only,
    so dense communication)."""
    p, cost = problem.profile, problem.cost
    common_bits = [q for q in p.candidates.bits
                   if all(q in p.allowed_bits(c.rep) for c in problem.classes)]
    configs = [(q, b) for q in common_bits for b in p.candidates.batch_sizes]
    configs = [(q, b) for q, b in configs
               if all(problem.fixed_memory_gib(q, b, c.rep.device) <= c.rep.memory_gib
                      for c in problem.classes)]
    if not configs:
        return None
    groups = _type_groups(problem)
    prob = pulp.LpProblem("fedpipe_baseline", pulp.LpMaximize)
    blocks = [_block(prob, f"b{j}", problem, groups, pulp.LpVariable(f"z_{j}", cat="Binary"))
              for j in range(len(configs))]
    prob += pulp.lpSum(blk.z for blk in blocks) == 1
    for k, cls in enumerate(problem.classes):
        memory = []
        for (q, b), blk in zip(configs, blocks, strict=True):
            mem = _increments(groups, problem.ranks,
                              lambda m, r, b=b, d=cls.rep.device: cost.lora_memory_gib(m, r, b, d))
            memory += [(blk.z, problem.fixed_memory_gib(q, b, cls.rep.device))]
            memory += [(blk.n[key], c) for key, c in mem.items()]
        prob += _affine(memory) <= cls.rep.memory_gib, f"mem_{k}"
    prob += OBJECTIVE_SCALE * pulp.lpSum(problem.config_factor(q, b, problem.densest) * blk.gain
                                         for (q, b), blk in zip(configs, blocks, strict=True))
    if _solve(prob, solver, time_limit).status not in ("optimal", "feasible"):
        return None
    j = max(range(len(configs)), key=lambda j: blocks[j].z.value() or 0)
    choice = Choice(*configs[j], _ranks_from_counts(blocks[j], groups, problem.ranks), problem.densest)
    choices = [choice] * len(problem.classes)
    return choices, _memory_limited(problem, choices)


def _memory_limited(problem: Problem, choices: list[Choice]) -> list[str]:
    """Servers whose memory decides the common configuration."""
    ev = evaluate(problem, choices)
    return [s.name for c, cls in zip(ev.costs, problem.classes, strict=True)
            if c.memory_gib >= cls.rep.memory_gib * (1 - BINDING_TOLERANCE) for s in cls.servers]


# ---------------------------------------------------------------- assembling the plan
def _summary(problem: Problem, ev: Evaluation) -> Summary:
    counts = [c.count for c in problem.classes]
    return Summary(
        makespan_s=ev.makespan, quality=ev.quality,
        upload_bytes=sum(n * c.upload_bytes for n, c in zip(counts, ev.costs, strict=True)),
        download_bytes=sum(n * c.download_bytes for n, c in zip(counts, ev.costs, strict=True)),
    )


def _binding(problem: Problem, cls: ServerClass, c: ServerCost, makespan: float) -> list[str]:
    out = []
    if c.memory_gib >= cls.rep.memory_gib * (1 - BINDING_TOLERANCE):
        out.append("memory")
    if c.round_s >= makespan * (1 - BINDING_TOLERANCE):
        out.append("round_time")
    deadline = problem.profile.objective.deadline_s
    if deadline is not None and c.round_s >= deadline * (1 - BINDING_TOLERANCE):
        out.append("deadline")
    return out


def _server_plans(problem: Problem, choices: list[Choice], ev: Evaluation) -> list[ServerPlan]:
    entries = {}
    order = {m.name: i for i, m in enumerate(problem.matrices)}
    for cls, ch, c, cov in zip(problem.classes, choices, ev.costs, ev.covered, strict=True):
        for s in cls.servers:
            entries[s.name] = ServerPlan(
                name=s.name, count=s.count, members=s.member_names(), samples=s.samples,
                device=s.device, bits=ch.bits, batch_size=ch.batch,
                rank_pattern=dict(sorted(ch.ranks.items(), key=lambda kv: order[kv[0]])),
                upload_density=ch.density, download_density=problem.down_density(ch.density),
                lora_alpha_ratio=problem.profile.candidates.lora_alpha_ratio,
                importance_covered=round(cov, 6),
                predicted=Prediction(
                    memory_gib=c.memory_gib, memory_budget_gib=s.memory_gib, compute_s=c.compute_s,
                    upload_s=c.upload_s, download_s=c.download_s, round_s=c.round_s,
                    upload_bytes=c.upload_bytes, download_bytes=c.download_bytes,
                    lora_params=c.lora_params),
                binding=_binding(problem, cls, c, ev.makespan),
            )
    return [entries[s.name] for s in problem.profile.servers]


def milp_size(problem: Problem) -> int:
    """Chord rows (3) of the MILP: what its build and solve time grow with."""
    sizes = [len(g.names) for g in _type_groups(problem)]
    levels = len([r for r in problem.ranks if r > 0])
    return sum(len(problem.configs(k)) for k in range(len(problem.classes))) * levels * sum(sizes)


def choose_method(problem: Problem, method: str) -> str:
    """'auto': the MILP while it is tiny (it then proves optimality in well under a second),
    the decomposed search above (measured: benchmarks/bench_planner.py)."""
    if method not in METHODS:
        raise FedpipeError(f"--method: unknown method {method!r}", [f"valid: {', '.join(METHODS)}"])
    if method != "auto":
        return method
    return "milp" if milp_size(problem) <= AUTO_MILP_ROWS else "decomposed"


def plan_problem(problem: Problem, *, solver: str | None = None, time_limit: float | None = 60.0,
                 method: str = "auto") -> tuple[list[Choice], Evaluation, SolverReport, Baseline | None]:
    """Baseline first (it sets the time scale), then the heterogeneous plan by `method`:
    "milp" (one model, `solver`), "decomposed" (search over T, fedpipe.decompose) or "auto"."""
    from fedpipe.decompose import solve_baseline_decomposed, solve_decomposed

    solver = solver or default_solver()
    check_solver(solver)
    method = choose_method(problem, method)
    infeasible = diagnose_infeasible(problem)
    if infeasible:
        raise FedpipeError("no plan fits: some servers cannot run even the smallest configuration",
                           infeasible)
    if method == "milp":
        baseline = solve_baseline(problem, solver, time_limit)
    else:
        b_choices = solve_baseline_decomposed(problem)
        baseline = None if b_choices is None else (b_choices, _memory_limited(problem, b_choices))
    baseline_report = None
    if baseline is not None:
        b_choices, limited = baseline
        b_ev = evaluate(problem, b_choices)
        problem.t_ref = max(b_ev.makespan, 1e-9)
        ch = b_choices[0]
        baseline_report = Baseline(
            bits=ch.bits, batch_size=ch.batch, adapted_matrices=len(ch.ranks),
            lora_params=b_ev.costs[0].lora_params, summary=_summary(problem, b_ev), limited_by=limited)
    else:  # no common configuration: the slowest no-adapter round sets the time scale
        problem.t_ref = max(min(problem.base_compute_s(q, b, c.rep) for q, b, _ in problem.configs(k))
                            for k, c in enumerate(problem.classes))
    if method == "milp":
        choices, report = solve_milp(problem, solver, time_limit)
    else:
        choices, report = solve_decomposed(problem, time_limit)
    if choices is None:
        if report.status == "infeasible":
            raise FedpipeError("no plan fits the profile's constraints (the deadline is likely too "
                               "tight for the round's compute and transfers)",
                               [f"solver {report.solver}: status {report.status}"])
        raise FedpipeError(f"the solver found no plan within the time limit ({time_limit} s)",
                           ["raise --time-limit or simplify the candidate space"])
    ev = evaluate(problem, choices)
    if not is_feasible(problem, choices, ev):
        raise FedpipeError("internal check failed: the solver's plan breaks a budget",
                           [f"solver {report.solver} ({report.method}); try --method milp --solver cbc"])
    return choices, ev, report, baseline_report


def assemble_plan(problem: Problem, choices: list[Choice], report: SolverReport,
                  baseline: Baseline | None, profile_ref: ProfileRef, importance_source: str,
                  ev: Evaluation | None = None) -> Plan:
    """The Plan for solved choices: what ``fedpipe plan`` and every sweep point write."""
    p, ev = problem.profile, ev or evaluate(problem, choices)
    return Plan(
        profile=profile_ref, model=p.model, task=p.task, aggregation=p.aggregation,
        importance=ImportanceRef(scorer=problem.importance.scorer, digest=problem.importance.digest(),
                                 source=importance_source),
        objective_time_weight=p.objective.time_weight, reference_time_s=problem.t_ref,
        deadline_s=p.objective.deadline_s, solver=report, summary=_summary(problem, ev),
        baseline=baseline, servers=_server_plans(problem, choices, ev),
    )


def make_plan(profile_path: str | Path, *, solver: str | None = None, time_limit: float | None = 60.0,
              importance: ImportanceReport | None = None, importance_source: str | None = None,
              method: str = "auto") -> Plan:
    """Load a profile, solve, and return the plan (the one call behind ``fedpipe plan``)."""
    profile_path = Path(profile_path)
    profile = load_profile(profile_path)
    shapes = load_shapes(profile.model, profile_path.parent)
    problem = build_problem(profile, shapes, importance)
    choices, ev, report, baseline = plan_problem(problem, solver=solver, time_limit=time_limit,
                                                 method=method)
    ref = ProfileRef(path=os.path.abspath(profile_path), sha256=profile_hash(profile_path),
                     name=profile.name or profile_path.stem.removesuffix(".profile"))
    return assemble_plan(problem, choices, report, baseline, ref,
                         importance_source or "builtin prior", ev)
