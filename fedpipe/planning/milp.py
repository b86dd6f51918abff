r"""The MILP: which matrices each server adapts, at what rank, on how many bits, with what batch,
at what communication density and wire precision.

Identical servers (a profile entry with ``count``, or entries with the same hardware and data)
form a class k with c_k members and n_k samples each; they share one configuration, which is
optimal because servers couple only through the round time T. Per class k, configurations
j = (bits q_j, batch b_j, communication density d_j, wire precision p_j) from its allowed set J_k
(the (density, precision) pairs of ``Problem.wire_options``: a pair that sends no fewer bytes
either way and keeps no more quality than another is left out, which never changes the optimum,
since memory and compute do not depend on it); candidate matrices m with normalised importance
w_m (sum 1); rank ladder R (0 = not adapted); gain g(r) non-decreasing in r (``Problem.gain``:
log2(1+r)/log2(1+r_max), or measured by ``fedpipe calibrate --quality``).

Matrices of one type t (q_proj, ...) have one shape, so they cost the same at a given rank: an
optimal plan gives more important matrices of a type at least the rank of less important ones
(swapping two ranks never lowers the gain when gains are sorted). So per type only *how many*
matrices reach each rank level matters: n_kjtl = number of type-t matrices at rank >= r_l, and
those are the n_kjtl most important ones. With w_t(1) >= w_t(2) >= ... the sorted importances and
S_t(a) their prefix sums, the gain of level l is dg_l * S_t(n_kjtl), a concave piecewise-linear
function of the integer n_kjtl, bounded by its chords. This is exact, and it leaves
|configs| x |types| x |levels| integers per class instead of one binary per matrix and rank.

This is the reference model (``fedpipe plan --method milp``); ``fedpipe.planning.decompose`` solves
the same model by its structure.

Variables: z_kj in {0,1}; n_kjtl integer in [0, N_t]; G_kjtl >= 0; round time T >= 0.

    maximise   sum_k omega_k sum_j f_j sum_tl dg_l G_kjtl  -  lambda T / T_ref
    subject to
    (1) sum_j z_kj = 1                                           one configuration per class
    (2) n_kjt1 <= N_t z_kj,  n_kjtl <= n_kjt(l-1)                ranks nest; nothing unless chosen
    (3) G_kjtl <= S_t(a) + w_t(a+1) (n_kjtl - a), a = 0..N_t-1   chords of the concave gain
    (4) sum_j [F_kj z_kj + sum_tl dL_tl(b_j) n_kjtl] <= M_k                     memory (GiB)
    (5) sum_j [C_kj z_kj + sum_tl (dtau_ktl(b_j) + dU_kjtl + dD_kjtl) n_kjtl] [+ D / down_k] <= T
    (6) T <= deadline                                            when the profile sets one
    (7) D = sum_k' c_k' sum_jtl dbytes_tl n_k'jtl    flora only: everyone downloads the stack (fp32)
    (8) sum_t n_kjt1 >= z_kj                                     rate only: every class trains
    (9) spread only (candidates.selection; S_s is the one set a class adapting s matrices may
        adapt, s over the counts the rule offers, 0 included: fedpipe.planning.selection), with
        binaries y_kjs (the count) and x_kjml (matrix m at rank >= r_l):
            sum_s y_kjs = z_kj,   x_kjm1 = sum_{s: m in S_s} y_kjs,   x_kjml <= x_kjm(l-1),
            n_kjtl = sum_{m of type t} x_kjml,
        and the gain sum_l dg_l sum_m w_m x_kjml in place of the chords (3): the per-type counts
        alone no longer say which matrices are adapted.

omega_k = c_k n_k / sum c n (sample share); f_j = bits_quality[q_j] (b_j / b_max)^beta (beta 1/4, or measured)
density_quality[d_j] precision_quality[p_j] (quality per round grows sublinearly with the
samples seen; top-k and lossy values keep most, not all, of an exact round's progress);
dg_l = g(r_l) - g(r_(l-1)) >= 0; d* are the increments of each
cost from r_(l-1) to r_l. F, L: fixed and per-adapter memory; C, tau: base and LoRA compute time;
U, D: transfer times, at v(d_j, p_j) bytes per value up (fedpipe.precision.bytes_per_value: 4
at fp32 dense, 0.5625 at nf4 dense, d v + min(1/8, 4d) sparse) and the same down, except where
the rule allows no lossy download (flora: its stack is (7), dense fp32). So a sparse density or
a lower precision is chosen exactly when a server's link makes the time it saves worth more than
the quality it costs. T_ref is the homogeneous baseline's makespan, so lambda is
"quality given up per baseline-round of time" (the weighted objective).

(R) The rate objective (``objective.kind: rate``, ``fedpipe.planning.problem``) maximises
q / T with q = sum_k omega_k sum_j f_j sum_tl dg_l G_kjtl, subject to (1)-(8). (8) keeps every
class training at least one matrix at the smallest rank: q / T would otherwise idle a slow
server (its adapters are what lengthen the round) and drop its data share omega_k silently.
Dinkelbach: lambda_0 = 0; solve F(lambda_i) = max q - lambda_i T (the model above with lambda_i
for lambda / T_ref); lambda_(i+1) = q / T of its plan (evaluated by the formulas); stop when
F(lambda_i) <= DINKELBACH_TOLERANCE q. F(lambda) >= 0 (the previous plan attains 0) and
F(lambda) > 0 exactly when a better rate exists, so the rates rise strictly and end at the
optimum. Every plan has q - lambda T <= F(lambda), so q / T <= lambda + F(lambda) / T_low with
T_low the slowest class's fastest no-adapter round: the least such bound over the solves proven
optimal, with the solver's tolerance on F added, gives the reported gap (none when no solve was
proven: a time limit). The report carries the number of solves (``dinkelbach_iterations``).

Everything is in GiB and seconds: byte-sized coefficients made CBC return wrong optima.
The status is reported as proven by the solver (pulp's ``sol_status``, not ``LpStatus``, which
says "Optimal" when a time limit stopped the search), with the relative gap when known.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import pulp

from fedpipe.errors import FedpipeError
from fedpipe.plan import SolverReport
from fedpipe.planning.cost import WIRE_BYTES_PER_VALUE
from fedpipe.planning.problem import Choice, Problem, evaluate, memory_limited
from fedpipe.precision import bytes_per_value
from fedpipe.shapes import Matrix

OBJECTIVE_SCALE = 1000.0
DINKELBACH_ITERATIONS = 30
DINKELBACH_TOLERANCE = 1e-7  # stop once F(lambda) is below this share of the plan's quality
MIP_GAP = 1e-4  # gapRel of both solvers
DINKELBACH_GAP = MIP_GAP  # the proven relative gap below which the rate is "optimal"
SOLVERS = ("highs", "cbc")


def check_solver(name: str) -> None:
    """An unknown --solver is an error whichever method runs (the decomposed one uses none)."""
    if name not in SOLVERS:
        raise FedpipeError(f"--solver: unknown solver {name!r}", [f"valid: {', '.join(SOLVERS)}"])


def _solver(name: str, time_limit: float | None) -> pulp.LpSolver:
    check_solver(name)
    if name == "highs":
        if not pulp.HiGHS().available():
            raise FedpipeError("solver 'highs' is not available: pip install highspy (or --solver cbc)")
        return pulp.HiGHS(msg=False, timeLimit=time_limit, gapRel=MIP_GAP)
    return pulp.PULP_CBC_CMD(msg=False, timeLimit=time_limit, gapRel=MIP_GAP)


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
    x: dict[tuple[str, int], pulp.LpVariable] | None = None  # (9): per matrix and level, spread only


def _block(prob: pulp.LpProblem, tag: str, problem: Problem, groups: list[_TypeGroup],
           z: pulp.LpVariable) -> _Block:
    """Constraints (2) and (3) for one configuration, or (2) and (9) under spread."""
    levels = [r for r in problem.ranks if r > 0]
    gains = [problem.gain(r) for r in [0] + levels]
    n, gain_terms, x = {}, [], None
    for t, g in enumerate(groups):
        size, prefix = len(g.names), g.prefix
        for lv in range(len(levels)):
            n[t, lv] = v = pulp.LpVariable(f"n_{tag}_{t}_{lv}", 0, size, cat="Integer")
            prob += v <= (n[t, lv - 1] if lv else size * z), f"c2_{tag}_{t}_{lv}"
            if problem.restricted:
                continue
            G = pulp.LpVariable(f"G_{tag}_{t}_{lv}", 0)
            for a in range(size):
                prob += G - g.weights[a] * v <= prefix[a] - g.weights[a] * a, f"c3_{tag}_{t}_{lv}_{a}"
            gain_terms.append((G, gains[lv + 1] - gains[lv]))
    if problem.restricted:
        gain_terms, x = _spread(prob, tag, problem, groups, z, n, gains)
    return _Block(z, n, pulp.LpAffineExpression(gain_terms), x)


def _spread(prob: pulp.LpProblem, tag: str, problem: Problem, groups: list[_TypeGroup],
            z: pulp.LpVariable, n: dict[tuple[int, int], pulp.LpVariable],
            gains: list[float]) -> tuple[list[tuple[pulp.LpVariable, float]],
                                         dict[tuple[str, int], pulp.LpVariable]]:
    """(9) for one configuration; returns its gain terms and the x variables."""
    sets = problem.adaptable_sets
    y = {s: pulp.LpVariable(f"y_{tag}_{s}", cat="Binary") for s in sets}
    prob += pulp.lpSum(y.values()) == z, f"c9_{tag}_count"
    gain_terms, every_x = [], {}
    for t, g in enumerate(groups):
        x_prev = {}
        for lv in range(len(gains) - 1):
            x = {name: pulp.LpVariable(f"x_{tag}_{t}_{a}_{lv}", cat="Binary")
                 for a, name in enumerate(g.names)}
            for a, name in enumerate(g.names):
                if lv:
                    prob += x[name] <= x_prev[name], f"c9_{tag}_{t}_{a}_{lv}"
                else:
                    prob += x[name] == pulp.lpSum(y[s] for s, members in sets.items()
                                                  if name in members), f"c9_{tag}_{t}_{a}_set"
            prob += n[t, lv] == pulp.lpSum(x.values()), f"c9_{tag}_{t}_{lv}_count"
            gain_terms += [(x[name], w * (gains[lv + 1] - gains[lv]))
                           for name, w in zip(g.names, g.weights, strict=True)]
            x_prev = x
            every_x.update({(name, lv): v for name, v in x.items()})
    return gain_terms, every_x


def _increments(groups: list[_TypeGroup], ranks: list[int], cost_of) -> dict[tuple[int, int], float]:
    """Cost of moving one matrix of type t from the previous rank level to level l."""
    levels = [0] + [r for r in ranks if r > 0]
    return {(t, lv - 1): cost_of(g.shape, levels[lv]) - cost_of(g.shape, levels[lv - 1])
            for t, g in enumerate(groups) for lv in range(1, len(levels))}


def _ranks_from_counts(block: _Block, groups: list[_TypeGroup], ranks: list[int]) -> dict[str, int]:
    levels = [r for r in ranks if r > 0]
    if block.x is not None:  # (9): the matrices themselves
        reached: dict[str, int] = {}
        for (name, lv), v in block.x.items():
            if (v.value() or 0) > 0.5:
                reached[name] = max(reached.get(name, 0), levels[lv])
        return reached
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


@dataclass
class _Model:
    """(1)-(8) built once; the objective is set per solve (Dinkelbach re-prices T)."""

    prob: pulp.LpProblem
    T: pulp.LpVariable
    quality: pulp.LpAffineExpression
    blocks: dict[tuple[int, int], _Block]
    groups: list[_TypeGroup]

    def solve(self, price: float, solver: str, time_limit: float | None) -> SolverReport:
        """max quality - price T (price in quality per second)."""
        # scaled: per-matrix gains near 1e-5 made HiGHS stall on "excessively small costs"
        self.prob.setObjective(OBJECTIVE_SCALE * (self.quality - price * self.T))
        return _solve(self.prob, solver, time_limit)

    def choices(self, problem: Problem) -> list[Choice]:
        out = []
        for k in range(len(problem.classes)):
            (_, j), blk = max(((key, b) for key, b in self.blocks.items() if key[0] == k),
                              key=lambda kb: kb[1].z.value() or 0)
            q, b, d, p = problem.configs(k)[j]
            out.append(Choice(q, b, _ranks_from_counts(blk, self.groups, problem.ranks), d, p))
        return out


def _build(problem: Problem) -> _Model:
    """Constraints (1)-(7) of the module docstring, and (8) under the rate objective."""
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
        for j, (q, b, d, pr) in enumerate(problem.configs(k)):
            fixed = problem.fixed_memory_gib(q, b, rep.device)
            if fixed > rep.memory_gib:
                continue  # this configuration cannot fit whatever the ranks
            z = pulp.LpVariable(f"z_{k}_{j}", cat="Binary")
            blocks[k, j] = blk = _block(prob, f"{k}_{j}", problem, groups, z)
            if problem.every_server_trains:  # (8) at least one matrix at rank >= r_1
                prob += pulp.lpSum(blk.n[t, 0] for t in range(len(groups))) >= z, f"c8_{k}_{j}"
            quality.append(problem.omega[k] * problem.config_factor(q, b, d, pr) * blk.gain)
            mem = _increments(groups, problem.ranks,
                              lambda m, r, b=b, d=rep.device: cost.lora_memory_gib(m, r, b, d))
            tau = _increments(groups, problem.ranks, lambda m, r, b=b, s=rep: cost.lora_compute_s(m, r, b, s))
            up = bytes_per_value(d, pr) / WIRE_BYTES_PER_VALUE  # `wire` is at fp32, dense
            down = (0.0 if problem.rule.broadcasts_stack  # the stack's download is (7)
                    else bytes_per_value(problem.down_density(d), problem.down_precision(pr))
                    / WIRE_BYTES_PER_VALUE)
            memory += [(z, fixed)] + [(blk.n[key], c) for key, c in mem.items()]
            timing[k] += [(z, problem.base_compute_s(q, b, rep))] + [
                (blk.n[key], tau[key] + cost.transfer_s(up * wire[key], rep.uplink_mbps)
                 + cost.transfer_s(down * wire[key], rep.downlink_mbps)) for key in tau]
        prob += pulp.lpSum(blk.z for (kk, _), blk in blocks.items() if kk == k) == 1, f"c1_{k}"
        prob += _affine(memory) <= rep.memory_gib, f"c4_{k}"
    if problem.rule.broadcasts_stack:  # (7) every server downloads all servers' adapters
        stack = [(blk.n[key], problem.classes[k].count * wire[key])
                 for (k, _), blk in blocks.items() for key in blk.n]
        for k, cls in enumerate(problem.classes):
            timing[k] += [(v, cost.transfer_s(n, cls.rep.downlink_mbps)) for v, n in stack]
    for k in range(len(problem.classes)):
        prob += _affine(timing[k]) - T <= 0, f"c5_{k}"  # flora repeats own n: summed
    return _Model(prob, T, pulp.lpSum(quality), blocks, groups)


def solve_milp(problem: Problem, solver: str,
               time_limit: float | None) -> tuple[list[Choice] | None, SolverReport]:
    """Build and solve (1)-(9) of the module docstring for the profile's objective: one solve
    (weighted) or Dinkelbach's sequence (rate). Under spread the model without (9) first: its
    optimum is the answer where it obeys the selection (Problem.relaxed)."""
    if problem.restricted:
        start = time.perf_counter()
        choices, report = _solve_milp(problem.relaxed(), solver, time_limit)
        if choices is not None and problem.selection_holds(choices):
            return choices, report
        if time_limit is not None:
            time_limit = max(1.0, time_limit - (time.perf_counter() - start))
    return _solve_milp(problem, solver, time_limit)


def _solve_milp(problem: Problem, solver: str,
                time_limit: float | None) -> tuple[list[Choice] | None, SolverReport]:
    model = _build(problem)
    if problem.profile.objective.kind == "rate":
        return _dinkelbach(problem, model, solver, time_limit)
    report = model.solve(problem.profile.objective.time_weight / problem.t_ref, solver, time_limit)
    if report.status not in ("optimal", "feasible"):
        return None, report
    return model.choices(problem), report


def _dinkelbach(problem: Problem, model: _Model, solver: str,
                time_limit: float | None) -> tuple[list[Choice] | None, SolverReport]:
    """(R) of the module docstring: max q / T by a sequence of max q - lambda T."""
    start = time.perf_counter()
    floor = _makespan_floor(problem)
    lam, best, best_rate, bound, iterations = 0.0, None, 0.0, float("inf"), 0
    while iterations < DINKELBACH_ITERATIONS:
        left = None if time_limit is None else time_limit - (time.perf_counter() - start)
        if left is not None and left <= 0:
            break
        report = model.solve(lam, solver, left)
        iterations += 1
        if report.status not in ("optimal", "feasible"):
            if best is None:
                return None, report.model_copy(update={"dinkelbach_iterations": iterations})
            break
        choices = model.choices(problem)
        ev = evaluate(problem, choices)
        excess = max(0.0, ev.quality - lam * ev.makespan)  # F(lambda) as found
        if report.status == "optimal":  # every plan has q - lambda T <= F(lambda) + the solver's
            # tolerance (gapRel, an absolute 1e-6 on the scaled objective): q / T <= that / T_low
            slack = MIP_GAP * excess + 1e-6 / OBJECTIVE_SCALE
            bound = min(bound, lam + (excess + slack) / floor)
        if ev.objective > best_rate:
            best, best_rate = choices, ev.objective
        if excess <= DINKELBACH_TOLERANCE * max(ev.quality, 1e-12):
            break  # F(lambda) ~ 0: no plan beats the rate lambda
        lam = ev.objective
    gap = max(0.0, bound - best_rate) / bound if bound < float("inf") else None
    status = "optimal" if gap is not None and gap <= DINKELBACH_GAP else "feasible"
    return best, SolverReport(solver=solver, status=status, gap=gap,
                              solve_time_s=round(time.perf_counter() - start, 3),
                              time_limit_s=time_limit, objective=best_rate,
                              dinkelbach_iterations=iterations)


def _makespan_floor(problem: Problem) -> float:
    """No plan's round is shorter than the slowest class's fastest no-adapter round."""
    return max(min(problem.base_compute_s(q, b, c.rep) for q, b in problem.base_configs(c.rep))
               for c in problem.classes)


# ---------------------------------------------------------------- homogeneous baseline
def solve_baseline(problem: Problem, solver: str,
                   time_limit: float | None) -> tuple[list[Choice], list[str]] | None:
    """Every server on one common configuration: the best one the weakest can run (quality only,
    so the densest density and the widest precision); under spread as in solve_milp."""
    if problem.restricted:
        found = _baseline(problem.relaxed(), solver, time_limit)
        if found is not None and problem.selection_allows(found[0][0].ranks):
            return found
    return _baseline(problem, solver, time_limit)


def _baseline(problem: Problem, solver: str,
              time_limit: float | None) -> tuple[list[Choice], list[str]] | None:
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
    prob += OBJECTIVE_SCALE * pulp.lpSum(problem.config_factor(q, b, problem.densest, problem.widest)
                                         * blk.gain
                                         for (q, b), blk in zip(configs, blocks, strict=True))
    if _solve(prob, solver, time_limit).status not in ("optimal", "feasible"):
        return None
    j = max(range(len(configs)), key=lambda j: blocks[j].z.value() or 0)
    choice = Choice(*configs[j], _ranks_from_counts(blocks[j], groups, problem.ranks), problem.densest,
                    problem.widest)
    choices = [choice] * len(problem.classes)
    return choices, memory_limited(problem, choices)


def milp_size(problem: Problem) -> int:
    """Chord rows (3) of the MILP (under spread the rows of (9) in their place): what its build
    and solve time grow with."""
    sizes = [len(g.names) for g in _type_groups(problem)]
    levels = len([r for r in problem.ranks if r > 0]) + int(problem.restricted)
    return sum(len(problem.configs(k)) for k in range(len(problem.classes))) * levels * sum(sizes)
