"""The planner: a profile in, a plan out. Chooses the method, solves the homogeneous baseline and
the heterogeneous plan, checks it against the formulas and assembles the Plan.

Methods (``plan_problem(method=...)``, ``fedpipe plan --method``): "milp" builds and solves the
model of ``fedpipe.planning.milp`` (``solve_milp``, the reference); "decomposed"
(``fedpipe.planning.decompose``) searches over T with independent per-hardware subproblems and
proves its own gap; "auto" takes the MILP while it is tiny (at most AUTO_MILP_ROWS chord rows
(3), where it proves optimality in well under a second) and the decomposed search above
(measured: at 2160 rows 0.9 s vs 0.6 s, at 6480 rows 37 s vs 1.2 s, Llama-2-7B's five hospitals
60 s with a 1.3% gap vs 0.3 s proven optimal).

Both methods solve either objective of the profile (``Problem.score``): weighted in one solve or
search; rate (quality per second) by Dinkelbach's sequence of MILPs, or by the same search over T
with q / T in its bounds.
"""

from __future__ import annotations

from fedpipe.errors import FedpipeError
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
from fedpipe.planning.cohorts import cohort_round_times
from fedpipe.planning.cost import ServerCost
from fedpipe.planning.decompose import solve_baseline_decomposed, solve_decomposed
from fedpipe.planning.milp import (
    check_solver,
    default_solver,
    milp_size,
    solve_baseline,
    solve_milp,
)
from fedpipe.planning.problem import (
    BINDING_TOLERANCE,
    Choice,
    Evaluation,
    Problem,
    ServerClass,
    diagnose_infeasible,
    evaluate,
    is_feasible,
    memory_limited,
)

METHODS = ("auto", "milp", "decomposed")
AUTO_MILP_ROWS = 2000  # chord rows up to which "auto" uses the MILP (see choose_method)


def summarise(problem: Problem, ev: Evaluation) -> Summary:
    counts = [c.count for c in problem.classes]
    task, sampled = problem.profile.task, {}
    training = [(c.round_s, n) for n, c in zip(counts, ev.costs, strict=True) if c.lora_params]
    if task.cohort is not None and training:
        size, mean, p90 = cohort_round_times(*zip(*training, strict=True), task.cohort, task.stratify,
                                             task.seed)
        sampled = dict(cohort=size, cohort_makespan_s=mean, cohort_makespan_p90_s=p90)
    return Summary(
        makespan_s=ev.makespan, quality=ev.quality,
        upload_bytes=sum(n * c.upload_bytes for n, c in zip(counts, ev.costs, strict=True)),
        download_bytes=sum(n * c.download_bytes for n, c in zip(counts, ev.costs, strict=True)),
        **sampled,
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
                upload_precision=ch.precision, download_precision=problem.down_precision(ch.precision),
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


def choose_method(problem: Problem, method: str) -> str:
    """'auto': the MILP while it is tiny (it then proves optimality in well under a second),
    the decomposed search above (measured: benchmarks/bench_planner.py)."""
    if method not in METHODS:
        raise FedpipeError(f"--method: unknown method {method!r}", [f"valid: {', '.join(METHODS)}"])
    if method != "auto":
        return method
    return "milp" if milp_size(problem) <= AUTO_MILP_ROWS else "decomposed"


def homogeneous_choices(problem: Problem, method: str, solver: str,
                        time_limit: float | None) -> list[Choice] | None:
    """The homogeneous baseline (what the weakest can run, for all) by `method` ("milp" or
    "decomposed"); None when no configuration fits every server."""
    if method == "milp":
        found = solve_baseline(problem, solver, time_limit)
        return None if found is None else found[0]
    return solve_baseline_decomposed(problem)


def baseline_block(problem: Problem, choices: list[Choice] | None) -> Baseline | None:
    """The plan's `baseline` block for the homogeneous `choices`; it sets the problem's time scale
    (their makespan, or with no common configuration the slowest no-adapter round), so every
    strategy's objective is on the optimiser's scale."""
    if choices is None:
        problem.t_ref = max(min(problem.base_compute_s(q, b, c.rep) for q, b in problem.base_configs(c.rep))
                            for c in problem.classes)
        return None
    ev = evaluate(problem, choices)
    problem.t_ref = max(ev.makespan, 1e-9)
    return Baseline(bits=choices[0].bits, batch_size=choices[0].batch, adapted_matrices=len(choices[0].ranks),
                    lora_params=ev.costs[0].lora_params, summary=summarise(problem, ev),
                    limited_by=memory_limited(problem, choices))


def plan_problem(problem: Problem, *, solver: str | None = None, time_limit: float | None = 60.0,
                 method: str = "auto") -> tuple[list[Choice], Evaluation, SolverReport, Baseline | None]:
    """Baseline first (it sets the time scale), then the heterogeneous plan by `method`:
    "milp" (one model, `solver`), "decomposed" (search over T, fedpipe.planning.decompose) or "auto"."""
    solver = solver or default_solver()
    check_solver(solver)
    method = choose_method(problem, method)
    infeasible = diagnose_infeasible(problem)
    if infeasible:
        raise FedpipeError("no plan fits: some servers cannot run even the smallest configuration",
                           infeasible)
    baseline_report = baseline_block(problem, homogeneous_choices(problem, method, solver, time_limit))
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
                                 source=importance_source), selection=p.candidates.selection,
        objective_kind=p.objective.kind, objective_time_weight=p.objective.time_weight,
        reference_time_s=problem.t_ref, deadline_s=p.objective.deadline_s, solver=report,
        summary=summarise(problem, ev), baseline=baseline, servers=_server_plans(problem, choices, ev),
    )
