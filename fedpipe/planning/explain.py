"""Why a server got its configuration: what binds, what the next-better option would take, what is given up.

The plan is re-evaluated with the planner's own formulas (``build_problem`` + ``evaluate`` on the
plan's profile and importance, time scale = the plan's reference time), so every number here is
the objective the solver maximised: quality − time_weight × makespan / reference time
(weighted), or quality / makespan (rate), as the plan records.

Next-better options for one server, each with every other server kept as planned:
  - the next higher base precision, same batch and ranks;
  - the next larger batch size, same precision and ranks;
  - the next denser communication density, and the next wider wire precision (more bytes per
    value), the rest unchanged;
  - per matrix type, its most important matrix below the top rank, raised one step on the
    rank ladder (0 -> the lowest rank = adapting it).
Each option is priced against the budgets: memory over the server's budget ("+1.30 GiB would
allow 8-bit"), round time over the deadline, or, when it fits, the change in the objective: an
option that fits but lowers the objective costs more time than its quality is worth at this
time_weight; the time_weight at which it would break even is reported (weighted), or the rate
it would leave (rate).

Forgone importance = 1 − importance covered, split into matrices left unadapted (their whole
normalised importance) and matrices at a rank below the top of the ladder (importance × (1 − gain)).
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from pydantic import BaseModel, Field

from fedpipe.digest import file_sha256
from fedpipe.errors import FedpipeError
from fedpipe.importance import depth_prior, load_report
from fedpipe.plan import BUILTIN_PRIOR_SOURCE, Plan
from fedpipe.planning.problem import Choice, Evaluation, Problem, build_problem, evaluate
from fedpipe.precision import bytes_per_value
from fedpipe.profile import ObjectiveKind, load_profile_and_shapes, with_objective

RELATIVE_TOLERANCE = 1e-6


class Option(BaseModel):
    """One step up from the server's configuration and what it would cost."""

    kind: str = Field(description="bits, batch, density, precision or rank")
    label: str
    memory_gib: float
    memory_budget_gib: float
    round_s: float = Field(description="This server's round time with the option.")
    makespan_s: float = Field(description="The federation's makespan with the option.")
    d_quality: float
    d_objective: float
    blocked_by: list[str] = Field(description="memory, deadline, or objective (fits but not worth it).")
    break_even_time_weight: float | None = Field(
        None, description="The time_weight at which an option that fits would pay for its time.")
    needs: str = Field(description="What would make the option possible or worthwhile.")


class TypeCoverage(BaseModel):
    """How one matrix type is adapted on the server."""

    kind: str
    adapted: int
    total: int
    at_top_rank: int
    unadapted_layers: str
    forgone: float


class ServerExplanation(BaseModel):
    server: str
    count: int
    bits: int
    batch_size: int
    density: float = Field(1.0, description="Communication density of the upload.")
    precision: str = Field("fp32", description="Wire precision of the upload's values.")
    config_factor: float = Field(description="Quality kept by the base precision, batch size, "
                                 "density and wire precision.")
    binding: list[str]
    constraints: list[str] = Field(description="Each budget and how close the plan is to it.")
    covered: float
    forgone: float
    forgone_unadapted: float
    forgone_lower_rank: float
    by_type: list[TypeCoverage]
    options: list[Option]


class Explanation(BaseModel):
    plan: str
    makespan_s: float
    deadline_s: float | None
    objective_kind: ObjectiveKind = "weighted"
    time_weight: float
    reference_time_s: float
    objective: float
    warnings: list[str]
    servers: list[ServerExplanation]


def gib(x: float) -> str:
    """GiB for people: MiB below a tenth of a GiB, where two decimals of GiB would read 0.00."""
    return f"{x:.2f} GiB" if abs(x) >= 0.1 else f"{x * 1024:.1f} MiB"


def layer_ranges(layers: list[int]) -> str:
    """[0, 1, 2, 5] -> '0-2, 5'."""
    runs: list[list[int]] = []
    for n in sorted(layers):
        if runs and runs[-1][1] == n - 1:
            runs[-1][1] = n
        else:
            runs.append([n, n])
    return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in runs) or "-"


def plan_problem_context(plan: Plan, profile_path: str | Path | None = None,
                         importance_path: str | Path | None = None
                         ) -> tuple[Problem, list[Choice], list[str]]:
    """The plan's problem (its profile and importance, reference time) and its choices per class."""
    warnings = []
    path = Path(profile_path or plan.profile.path)
    if not path.is_file():
        raise FedpipeError(f"explain: the plan's profile {path.absolute()} is not there",
                           ["pass the profile it was planned from with --profile"])
    if profile_path is None and file_sha256(path) != plan.profile.sha256:
        warnings.append(f"{path} changed since the plan was made: numbers are recomputed from it")
    profile, shapes = load_profile_and_shapes(path)
    profile = with_objective(profile, plan.objective_kind)  # what the plan was solved for
    source = importance_path
    if source is None and plan.importance.source != BUILTIN_PRIOR_SOURCE:
        source = plan.importance.source
    importance = depth_prior(shapes) if source is None else load_report(source)
    if importance.digest() != plan.importance.digest:
        warnings.append("the importance scores differ from the ones the plan was made with")
    problem = build_problem(profile, shapes, importance)
    problem.t_ref = plan.reference_time_s
    choices = []
    for cls in problem.classes:
        s = plan.server(cls.servers[0].name)
        choices.append(Choice(s.bits, s.batch_size, dict(s.rank_pattern), s.upload_density,
                              s.upload_precision))
    return problem, choices, warnings


def _constraints(problem: Problem, k: int, ev: Evaluation, binding: list[str]) -> list[str]:
    c, budget = ev.costs[k], problem.classes[k].rep.memory_gib
    mark = {True: " (binding)", False: ""}
    others = [x.round_s for i, x in enumerate(ev.costs) if i != k]
    runner_up = max(others, default=0.0)
    lines = [f"memory: {c.memory_gib:.2f} of {budget:g} GiB, {gib(budget - c.memory_gib)} free"
             f"{mark['memory' in binding]}"]
    if "round_time" in binding:
        lines.append(f"round time: {c.round_s:.2f} s sets the makespan (compute {c.compute_s:.2f} s, upload "
                     f"{c.upload_s:.2f} s, download {c.download_s:.2f} s); the next slowest server takes "
                     f"{runner_up:.2f} s (binding)")
    else:
        lines.append(f"round time: {c.round_s:.2f} s of the {ev.makespan:.2f} s makespan: "
                     f"{ev.makespan - c.round_s:.2f} s idle per round")
    deadline = problem.profile.objective.deadline_s
    if deadline is not None:
        lines.append(f"deadline: {c.round_s:.2f} of {deadline:g} s{mark['deadline' in binding]}")
    return lines


def _options(problem: Problem, choices: list[Choice], k: int, ev: Evaluation) -> list[Option]:
    p, ch = problem.profile, choices[k]
    rep = problem.classes[k].rep
    candidates: list[tuple[str, str, Choice]] = []
    higher = [q for q in p.allowed_bits(rep) if q > ch.bits]
    if higher:
        candidates.append(("bits", f"{higher[0]}-bit base (now {ch.bits}-bit), same batch and ranks",
                           replace(ch, bits=higher[0])))
    larger = [b for b in p.candidates.batch_sizes if b > ch.batch]
    if larger:
        candidates.append(("batch", f"batch {larger[0]} (now {ch.batch}), same precision and ranks",
                           replace(ch, batch=larger[0])))
    denser = [d for d in p.candidates.densities if d > ch.density]
    if denser:
        candidates.append(("density", f"communication density {denser[-1]:g} (now {ch.density:g}), "
                           "same configuration otherwise", replace(ch, density=denser[-1])))
    wider = [q for q in p.candidates.precisions
             if bytes_per_value(1.0, q) > bytes_per_value(1.0, ch.precision)]
    if wider:
        candidates.append(("precision", f"wire precision {wider[-1]} (now {ch.precision}), same "
                           "configuration otherwise", replace(ch, precision=wider[-1])))
    ladder = problem.ranks
    seen: set[str] = set()
    for m in sorted(problem.matrices, key=lambda m: -problem.weights[m.name]):
        r = ch.ranks.get(m.name, 0)
        if m.kind in seen or r >= ladder[-1]:
            continue
        seen.add(m.kind)
        up = ladder[ladder.index(r) + 1]
        what = f"adapt {m.name} at rank {up}" if r == 0 else f"{m.name}: rank {r} -> {up}"
        candidates.append(("rank", what, replace(ch, ranks={**ch.ranks, m.name: up})))

    deadline = p.objective.deadline_s
    out = []
    for kind, label, alt in candidates:
        trial = evaluate(problem, [alt if i == k else c for i, c in enumerate(choices)])
        c = trial.costs[k]
        d_q, d_obj = trial.quality - ev.quality, trial.objective - ev.objective
        blocked, needs, break_even = [], [], None
        if c.memory_gib > rep.memory_gib * (1 + 1e-9):
            blocked.append("memory")
            needs.append(f"+{gib(c.memory_gib - rep.memory_gib)} memory would allow it")
        if deadline is not None and trial.makespan > deadline * (1 + 1e-9):
            blocked.append("deadline")
            needs.append(f"a deadline of {trial.makespan:.3g} s (now {deadline:.3g} s)")
        tie = RELATIVE_TOLERANCE * max(1.0, abs(ev.objective))
        if not blocked and d_obj < -tie:
            blocked.append("objective")
            d_t = trial.makespan - ev.makespan
            if p.objective.kind == "rate":
                needs.append(f"fits, but the rate falls from {ev.objective:.4g} to "
                             f"{trial.objective:.4g} per s (makespan {d_t:+.2g} s, quality {d_q:+.2g})")
            elif d_t > 0 and d_q > 0:
                break_even = d_q * problem.t_ref / d_t
                needs.append(f"fits, but +{d_t:.2g} s makespan outweighs +{d_q:.2g} quality; worth it "
                             f"at time_weight <= {break_even:.3g} (now {p.objective.time_weight:g})")
            else:
                needs.append(f"fits, but lowers the objective by {-d_obj:.2g}")
        elif not blocked and d_obj <= tie:
            needs.append(f"fits and leaves the objective as it is (within {tie:.0e}): an equal choice")
        elif not blocked:
            needs.append(f"fits and raises the objective by {d_obj:.2g}: within the solver's gap")
        out.append(Option(kind=kind, label=label, memory_gib=c.memory_gib, memory_budget_gib=rep.memory_gib,
                          round_s=c.round_s, makespan_s=trial.makespan, d_quality=d_q, d_objective=d_obj,
                          blocked_by=blocked, break_even_time_weight=break_even, needs="; ".join(needs)))
    return out


def _coverage(problem: Problem, ch: Choice) -> tuple[list[TypeCoverage], float, float]:
    top = problem.ranks[-1]
    rows, unadapted, lower = [], 0.0, 0.0
    for kind in problem.profile.candidates.targets:
        mats = [m for m in problem.matrices if m.kind == kind]
        missing = [m for m in mats if m.name not in ch.ranks]
        lost_u = sum(problem.weights[m.name] for m in missing)
        lost_r = sum(problem.weights[m.name] * (1 - problem.gain(ch.ranks[m.name]))
                     for m in mats if m.name in ch.ranks)
        unadapted, lower = unadapted + lost_u, lower + lost_r
        rows.append(TypeCoverage(kind=kind, adapted=len(mats) - len(missing), total=len(mats),
                                 at_top_rank=sum(1 for m in mats if ch.ranks.get(m.name) == top),
                                 unadapted_layers=layer_ranges([m.layer for m in missing]),
                                 forgone=max(0.0, lost_u + lost_r)))
    return rows, unadapted, lower


def explain_plan(plan: Plan, plan_name: str = "plan", server: str | None = None,
                 profile_path: str | Path | None = None,
                 importance_path: str | Path | None = None) -> Explanation:
    """Explain every server entry of the plan, or the one serving `server`."""
    problem, choices, warnings = plan_problem_context(plan, profile_path, importance_path)
    ev = evaluate(problem, choices)
    if abs(ev.makespan - plan.summary.makespan_s) > 1e-6 * max(1.0, plan.summary.makespan_s):
        warnings.append(f"recomputed makespan {ev.makespan:.2f} s differs from the plan's "
                        f"{plan.summary.makespan_s:.2f} s (profile or cost model changed)")
    wanted = plan.server(server).name if server else None
    entries = []
    for k, cls in enumerate(problem.classes):
        for s in cls.servers:
            if wanted and s.name != wanted:
                continue
            sp, ch = plan.server(s.name), choices[k]
            rows, unadapted, lower = _coverage(problem, ch)
            entries.append(ServerExplanation(
                server=s.name, count=s.count, bits=ch.bits, batch_size=ch.batch, density=ch.density,
                precision=ch.precision,
                config_factor=problem.config_factor(ch.bits, ch.batch, ch.density, ch.precision),
                binding=list(sp.binding),
                constraints=_constraints(problem, k, ev, sp.binding), covered=ev.covered[k],
                forgone=max(0.0, 1 - ev.covered[k]), forgone_unadapted=max(0.0, unadapted),
                forgone_lower_rank=max(0.0, lower),  # no "-0.000" from rounding
                by_type=rows, options=_options(problem, choices, k, ev)))
    order = {s.name: i for i, s in enumerate(plan.servers)}
    entries.sort(key=lambda e: order.get(e.server, 0))
    p = problem.profile
    return Explanation(plan=plan_name, makespan_s=ev.makespan, deadline_s=p.objective.deadline_s,
                       objective_kind=p.objective.kind, time_weight=p.objective.time_weight,
                       reference_time_s=problem.t_ref, objective=ev.objective, warnings=warnings,
                       servers=entries)
