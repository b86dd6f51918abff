"""Budget sweeps: one plan per point of a grid of 'what if' budgets, with the shared work done once.

Axes (each a comma-separated list; the grid is their product, in the order given below):
  memory     multiplier on every server's ``memory_gib``
  bandwidth  multiplier on every server's ``uplink_mbps`` and ``downlink_mbps``
  deadline   round-time bound: seconds (``60``), a multiple of the point's unconstrained makespan
             (``0.8x``: the plan without a deadline at the same memory/bandwidth/servers), or ``none``
  servers    multiplier on every profile entry's ``count`` (rounded, at least 1; members are named
             ``NAME-1``, ``NAME-2``, ... as for any entry with a count)

What does not change between points is built once: the model shapes, the importance report (so
the normalised weights), and a cache of the tables every point shares (``TableCache``:
the decomposed planner's gain tables per cost group, and each configuration's fixed memory and
base compute per hardware). Each point's profile is the base profile with scaled fields
(validated again), and only its search is run per point, except:
  - points whose scaled profiles are identical are solved once, and so are points that differ
    only in memory once no server's memory can bind (each fits its largest configuration);
  - a deadline point reuses the plan of a looser deadline (or of no deadline) at the same
    memory/bandwidth/servers when that plan's makespan already meets it: adding a constraint
    that an optimum satisfies leaves it optimal. Deadlines are therefore solved loosest first.
Points that cannot be planned are recorded with the planner's reason; the sweep goes on.

Written under ``out_dir`` (default ``plans/sweeps/NAME/``): ``POINT.profile.yaml`` and
``POINT.plan.yaml`` per point (the plan names its point profile, so ``fedpipe plan`` on it
reproduces the plan and ``fedpipe explain`` finds it), and ``sweep.yaml``, the table's data.
"""

from __future__ import annotations

import itertools
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, Field

from fedpipe.atomic import write_atomic
from fedpipe.digest import file_sha256
from fedpipe.errors import FedpipeError
from fedpipe.importance import ImportanceReport, depth_prior
from fedpipe.plan import (
    BUILTIN_PRIOR_SOURCE,
    Baseline,
    Plan,
    ProfileRef,
    SolverReport,
    load_plan,
    save_plan,
    to_yaml,
)
from fedpipe.planning.cost import server_cost
from fedpipe.planning.planner import assemble_plan, plan_problem
from fedpipe.planning.problem import Choice, Problem, TableCache, build_problem
from fedpipe.profile import ClusterProfile, load_profile, parse_profile
from fedpipe.shapes import CARDS_DIR, ModelShapes, load_shapes

AXES = ("memory", "bandwidth", "servers", "deadline")
AXIS_LETTER = {"memory": "m", "bandwidth": "b", "deadline": "d", "servers": "n"}


# ---------------------------------------------------------------- axes
def parse_axis(axis: str, text: str) -> list[str]:
    """Validate one axis' comma-separated values; returns them normalised as labels."""
    values = [v.strip().lower() for v in text.split(",") if v.strip()]
    if not values:
        raise FedpipeError(f"--{axis}: no values given", ["example: --memory 0.5,1,2"])
    out = []
    for v in values:
        try:
            if axis == "deadline":
                if v != "none":
                    x = float(v[:-1] if v.endswith(("x", "s")) else v)
                    if not x > 0:
                        raise ValueError
                    v = f"{x:g}x" if v.endswith("x") else f"{x:g}"
            else:
                x = float(v)
                if not x > 0:
                    raise ValueError
                v = f"{x:g}"
        except ValueError:
            valid = ("seconds (60), a multiple of the unconstrained makespan (0.8x) or none"
                     if axis == "deadline" else "positive multipliers (0.5,1,2)")
            raise FedpipeError(f"--{axis}: {v!r} is not a valid value", [f"valid: {valid}"]) from None
        if v in out:
            raise FedpipeError(f"--{axis}: {v!r} is given twice")
        out.append(v)
    return out


def point_name(budget: dict[str, str]) -> str:
    """'m0.5-b1-d0.8x' from the axis labels of one point (only the swept axes)."""
    return "-".join(f"{AXIS_LETTER[a]}{budget[a]}" for a in AXES if a in budget)


def scale_profile(profile: ClusterProfile, *, memory: float = 1.0, bandwidth: float = 1.0,
                  servers: float = 1.0, deadline_s: float | None | Literal["keep"] = "keep",
                  source: str = "sweep point") -> ClusterProfile:
    """The profile with every server's budgets scaled, validated like a file would be."""
    raw = profile.model_dump()
    for s in raw["servers"]:
        s["memory_gib"] = round(s["memory_gib"] * memory, 9)
        s["uplink_mbps"] = round(s["uplink_mbps"] * bandwidth, 9)
        s["downlink_mbps"] = round(s["downlink_mbps"] * bandwidth, 9)
        s["count"] = max(1, round(s["count"] * servers))
    if deadline_s != "keep":
        raw["objective"]["deadline_s"] = deadline_s
    return parse_profile(raw, source)


# ---------------------------------------------------------------- results
class SweepPoint(BaseModel):
    """One budget point: what was asked, whether it planned, and the plan's headline numbers."""

    name: str
    budget: dict[str, str] = Field(description="Axis -> value as given (multipliers, seconds, 0.8x).")
    deadline_s: float | None = Field(None, description="The deadline in seconds at this point.")
    status: Literal["ok", "infeasible"]
    reason: str | None = Field(None, description="Why the point has no plan.")
    plan: str | None = None
    profile: str | None = None
    makespan_s: float | None = None
    quality: float | None = None
    importance_covered: float | None = Field(None, description="Sample-weighted mean over servers.")
    upload_bytes: int | None = None
    download_bytes: int | None = None
    servers_per_bits: dict[int, int] = Field(default_factory=dict)
    solver_status: str | None = None
    solve_s: float = Field(0.0, description="Wall time spent on this point (small when reused).")
    reused_from: str | None = Field(None, description="The point whose solution this one reuses.")


class SweepResult(BaseModel):
    profile: str
    name: str
    out_dir: str
    axes: dict[str, list[str]]
    points: list[SweepPoint]
    setup_s: float = Field(description="Loading profile, shapes, importance (shared by every point).")
    total_s: float
    plans: dict[str, Plan] = Field(default_factory=dict, exclude=True,
                                   description="The points' plans while in memory (not in sweep.yaml).")

    def plan(self, point: SweepPoint) -> Plan:
        """The point's plan: from memory after `run_sweep`, else from its file."""
        return self.plans.get(point.name) or load_plan(point.plan)

    def neighbours(self) -> list[tuple[SweepPoint, SweepPoint]]:
        """Consecutive points that differ in one axis only and both have plans (for diffs)."""
        pairs = []
        for a, b in itertools.pairwise(self.points):
            differ = [x for x in a.budget if a.budget[x] != b.budget[x]]
            if len(differ) == 1 and a.plan and b.plan:
                pairs.append((a, b))
        return pairs


def _headline(point: SweepPoint, plan: Plan) -> None:
    weight = sum(s.count * s.samples for s in plan.servers)
    point.makespan_s = plan.summary.makespan_s
    point.quality = plan.summary.quality
    point.importance_covered = sum(s.count * s.samples * s.importance_covered for s in plan.servers) / weight
    point.upload_bytes, point.download_bytes = plan.summary.upload_bytes, plan.summary.download_bytes
    bits: dict[int, int] = {}
    for s in plan.servers:
        bits[s.bits] = bits.get(s.bits, 0) + s.count
    point.servers_per_bits = dict(sorted(bits.items()))
    point.solver_status = plan.solver.status


def _portable_model(profile: ClusterProfile, base_dir: Path) -> ClusterProfile:
    """A model folder named relative to the profile still resolves from the sweep's folder."""
    folder = base_dir / profile.model
    if (CARDS_DIR / f"{profile.model.lower()}.json").is_file() or not (folder / "config.json").is_file():
        return profile
    return profile.model_copy(update={"model": str(folder.resolve())})


def _dump_profile(profile: ClusterProfile, path: Path, note: str) -> Path:
    text = f"# {note}\n" + to_yaml(profile.model_dump(mode="python"))
    return write_atomic(path, text)


@dataclass
class _Solved:
    """A solved profile: kept so that identical points and tighter deadlines can reuse it."""

    source: str
    choices: list[Choice]
    report: SolverReport
    baseline: Baseline | None
    t_ref: float
    makespan: float


@dataclass
class _Outcome:
    """One point as its group left it: the profile planned, the solution or why there is none."""

    name: str
    profile: ClusterProfile | None
    solved: _Solved | None
    reason: str | None
    seconds: float


class _Planner:
    """Solves profiles with the shared shapes and importance; remembers every solution (and every
    failure), so equal profiles anywhere in the grid are solved once."""

    def __init__(self, shapes: ModelShapes, importance: ImportanceReport, solver: str | None,
                 time_limit: float | None, method: str) -> None:
        self.shapes, self.importance = shapes, importance
        self.solver, self.time_limit, self.method = solver, time_limit, method
        self.done: dict[str, _Solved | FedpipeError] = {}
        self.tables = TableCache()  # cost and gain tables every point shares

    def solve(self, profile: ClusterProfile, source: str, looser: list[_Solved] | None = None) -> _Solved:
        """The solution for `profile`, solved or reused; raises the planner's FedpipeError."""
        problem = build_problem(profile, self.shapes, self.importance, self.tables)
        keys = [profile.model_dump_json()] + _memory_free_key(profile, problem)
        known = next((self.done[k] for k in keys if k in self.done), None)
        if isinstance(known, FedpipeError):
            raise known
        deadline = profile.objective.deadline_s
        known = known or next((s for s in looser or [] if deadline is None
                               or s.makespan <= deadline * (1 + 1e-9)), None)
        if known is not None:
            return known
        try:
            choices, ev, report, baseline = plan_problem(problem, solver=self.solver,
                                                         time_limit=self.time_limit, method=self.method)
        except FedpipeError as e:
            self.done.update(dict.fromkeys(keys, e))
            raise
        solved = _Solved(source, choices, report, baseline, problem.t_ref, ev.makespan)
        self.done.update(dict.fromkeys(keys, solved))
        return solved


def _memory_free_key(profile: ClusterProfile, problem: Problem) -> list[str]:
    """[the profile's key without memory budgets] when no memory budget can bind: every server
    fits its largest configuration (every candidate matrix at the top rank, on any allowed bits
    and batch). Memory then constrains nothing, the baseline included, so every point that
    differs only by more memory is the same problem and reuses this solution. [] otherwise."""
    by_name = {m.name: m for m in problem.matrices}
    everything = dict.fromkeys(by_name, max(problem.ranks))
    for cls in problem.classes:
        rep = cls.rep
        need = max(server_cost(problem.cost, rep, q, b, everything, by_name, 0).memory_gib
                   for q, b in problem.base_configs(rep))
        if need > rep.memory_gib:
            return []
    raw = profile.model_dump(mode="json")
    for server in raw["servers"]:
        server["memory_gib"] = None
    return [json.dumps(raw, sort_keys=True)]


def _reason(e: FedpipeError) -> str:
    """The planner's lines naming servers when it has them, else its message and details."""
    if e.problems and all(p.startswith("server ") for p in e.problems):
        return "; ".join(e.problems)
    return "; ".join([str(e.args[0])] + e.problems)


def _scaled(base: ClusterProfile, budgets: list[dict[str, str]]) -> ClusterProfile:
    """The group's profile without a deadline of its own when deadlines are swept."""
    scale = {a: float(budgets[0].get(a, 1)) for a in ("memory", "bandwidth", "servers")}
    return scale_profile(base, **scale, deadline_s=None if "deadline" in budgets[0] else "keep",
                         source=f"sweep point {point_name(budgets[0])}")


def _deadline_order(free: ClusterProfile, budgets: list[dict[str, str]],
                    planner: _Planner) -> list[tuple[str, ClusterProfile]]:
    """The group's points with their profiles, loosest deadline first. A relative deadline is a
    multiple of the unconstrained makespan, so the unconstrained profile is solved first then."""
    makespan = None
    if any(b["deadline"].endswith("x") for b in budgets):
        source = next((point_name(b) for b in budgets if b["deadline"] == "none"),
                      "the plan without a deadline")
        makespan = planner.solve(free, source).makespan
    out = []
    for b in budgets:
        label = b["deadline"]
        if label == "none":
            out.append((point_name(b), free))
            continue
        seconds = float(label[:-1]) * makespan if label.endswith("x") else float(label)
        objective = free.objective.model_copy(update={"deadline_s": seconds})
        out.append((point_name(b), free.model_copy(update={"objective": objective})))
    return sorted(out, key=lambda np: -(np[1].objective.deadline_s or float("inf")))


def _plan_group(base: ClusterProfile, budgets: list[dict[str, str]], planner: _Planner) -> list[_Outcome]:
    """Plan one memory/bandwidth/servers point and its deadlines."""
    tick = time.perf_counter()
    try:
        free = _scaled(base, budgets)
        todo = _deadline_order(free, budgets, planner) if "deadline" in budgets[0] else \
            [(point_name(budgets[0]), free)]
    except FedpipeError as e:  # the scaled profile is invalid, or the plan without a deadline fails
        return [_Outcome(point_name(b), None, None, _reason(e), time.perf_counter() - tick) for b in budgets]
    out, looser = [], []
    for name, profile in todo:
        try:
            solved = planner.solve(profile, name, looser)
        except FedpipeError as e:
            out.append(_Outcome(name, profile, None, _reason(e), time.perf_counter() - tick))
        else:
            looser.append(solved)
            out.append(_Outcome(name, profile, solved, None, time.perf_counter() - tick))
        tick = time.perf_counter()
    return out


def run_sweep(profile_path: str | Path, axes: dict[str, list[str]], *, out_dir: str | Path | None = None,
              solver: str | None = None, time_limit: float | None = 60.0, method: str = "auto",
              importance: ImportanceReport | None = None, importance_source: str | None = None,
              on_point: Callable[[SweepPoint], None] | None = None) -> SweepResult:
    """Plan every point of the grid spanned by `axes` (values from `parse_axis`) and write the files."""
    start = time.perf_counter()
    axes = {a: axes[a] for a in AXES if axes.get(a)}
    if not axes:
        raise FedpipeError("sweep: give at least one axis",
                           ["--memory 0.5,1,2 · --bandwidth 0.25,1 · --servers 1,2 · --deadline 30,0.8x"])
    profile_path = Path(profile_path)
    base = load_profile(profile_path)
    name = base.name or profile_path.stem.removesuffix(".profile")
    base = _portable_model(base, profile_path.parent)
    shapes = load_shapes(base.model, profile_path.parent)
    importance = importance or depth_prior(shapes)
    source = importance_source or BUILTIN_PRIOR_SOURCE
    planner = _Planner(shapes, importance, solver, time_limit, method)
    out = Path(out_dir) if out_dir is not None else Path("plans") / "sweeps" / name
    setup_s = time.perf_counter() - start

    grid = [dict(zip(axes, values, strict=True)) for values in itertools.product(*axes.values())]
    points = {point_name(b): SweepPoint(name=point_name(b), budget=b, status="infeasible") for b in grid}
    plans: dict[str, Plan] = {}
    for _, budgets in itertools.groupby(grid, key=lambda b: [b.get(a) for a in AXES[:3]]):
        for o in _plan_group(base, list(budgets), planner):
            point = points[o.name]
            point.solve_s, point.reason = o.seconds, o.reason
            if o.profile is not None:
                point.deadline_s = o.profile.objective.deadline_s
            if o.solved is not None:
                plans[point.name] = _write_point(point, o.profile, o.solved, planner, out,
                                                 profile_path, f"{name}-{point.name}", source)
            if on_point is not None:
                on_point(point)

    result = SweepResult(profile=str(profile_path), name=name, out_dir=str(out), axes=axes,
                         points=list(points.values()), setup_s=setup_s, total_s=time.perf_counter() - start,
                         plans=plans)
    write_atomic(out / "sweep.yaml", to_yaml(result.model_dump(mode="json")))
    return result


def _write_point(point: SweepPoint, profile: ClusterProfile, solved: _Solved, planner: _Planner,
                 out: Path, origin: Path, plan_name: str, source: str) -> Plan:
    """The point's profile and plan files, and its row's numbers."""
    profile = profile.model_copy(update={"name": plan_name})  # `fedpipe plan` on it names it alike
    problem = build_problem(profile, planner.shapes, planner.importance, planner.tables)
    problem.t_ref = solved.t_ref
    prof_file = _dump_profile(profile, out / f"{point.name}.profile.yaml",
                              f"sweep point {point.name} of {origin}: {point.budget}")
    plan = assemble_plan(problem, solved.choices, solved.report, solved.baseline,
                         ProfileRef(path=str(prof_file), sha256=file_sha256(prof_file), name=plan_name),
                         source)
    point.plan = str(save_plan(plan, out / f"{point.name}.plan.yaml"))
    point.profile, point.status = str(prof_file), "ok"
    point.reused_from = solved.source if solved.source != point.name else None
    _headline(point, plan)
    return plan


def load_sweep(path: str | Path) -> SweepResult:
    """Read the sweep.yaml that `run_sweep` wrote (or the folder holding it)."""
    path = Path(path)
    if path.is_dir():
        path = path / "sweep.yaml"
    if not path.is_file():
        raise FedpipeError(f"sweep: no such file {path.absolute()}")
    return SweepResult.model_validate(yaml.safe_load(path.read_text()))
