"""Tables for people: plans and diffs rendered with rich. No logic beyond formatting."""

from __future__ import annotations

from collections.abc import Callable

from rich.console import Console, Group
from rich.table import Table
from rich.text import Text

from fedpipe.plan import Plan, Summary
from fedpipe.planning.diff import PlanDiff


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"


def cohort_line(summary: Summary) -> list[Text]:
    """The round time of a sampled cohort, when the plan's task samples one."""
    if summary.cohort is None or summary.cohort_makespan_s is None:
        return []
    return [Text(f"cohort of {summary.cohort} per round: round time {seconds(summary.cohort_makespan_s)} "
                 f"expected, {seconds(summary.cohort_makespan_p90_s or 0.0)} p90 over cohorts "
                 f"(all servers: {seconds(summary.makespan_s)})")]


def seconds(s: float) -> str:
    return f"{s:.2f} s" if s < 100 else f"{s:.0f} s"


def fraction(d: float) -> str:
    """A density for people: 1, 1/4, 1/16 (or the decimal where it is not 1/n)."""
    inverse = 1 / d
    return "1" if d == 1 else f"1/{round(inverse)}" if abs(inverse - round(inverse)) < 1e-9 else f"{d:g}"


def objective_text(kind: str, time_weight: float, reference_time_s: float, value: float) -> str:
    """What the planner maximised and its value for this plan."""
    if kind == "rate":
        return f"objective rate: quality / makespan = {value:.4g} per s (every server trains)"
    return (f"objective weighted: quality − {time_weight:g} × makespan / {reference_time_s:.2f} s "
            f"(baseline makespan) = {value:.4f}")


def plan_objective(plan: Plan) -> float:
    """The plan's objective from its summary, by its objective kind."""
    q, t = plan.summary.quality, plan.summary.makespan_s
    if plan.objective_kind == "rate":
        return q / t
    return q - plan.objective_time_weight * t / plan.reference_time_s


def plan_table(plan: Plan) -> Group:
    """Per server: configuration, predictions against budgets; then totals and the baseline."""
    t = Table(title=f"plan {plan.profile.name} · {plan.model} · {plan.aggregation} · strategy "
              f"{plan.strategy}", title_justify="left")
    for col in ("server", "n", "bits", "batch", "density", "precision", "matrices", "LoRA params",
                "memory / budget", "compute", "upload", "download", "round", "binding"):
        t.add_column(col, justify="left" if col in ("server", "binding") else "right")
    for s in plan.servers:
        p = s.predicted
        density = fraction(s.upload_density) + ("" if s.download_density == s.upload_density
                                               else f" up, {fraction(s.download_density)} down")
        precision = s.upload_precision + ("" if s.download_precision == s.upload_precision
                                          else f" up, {s.download_precision} down")
        t.add_row(s.name, str(s.count), str(s.bits), str(s.batch_size), density, precision,
                  str(len(s.rank_pattern)), f"{p.lora_params:,}",
                  f"{p.memory_gib:.2f} / {p.memory_budget_gib:g} GiB", seconds(p.compute_s),
                  f"{seconds(p.upload_s)} ({human_bytes(p.upload_bytes)})",
                  f"{seconds(p.download_s)} ({human_bytes(p.download_bytes)})", seconds(p.round_s),
                  ", ".join(s.binding) or "-")
    sv = plan.solver
    gap = "unknown" if sv.gap is None else f"{sv.gap:.2g}"
    solves = "" if sv.dinkelbach_iterations is None else f" · {sv.dinkelbach_iterations} Dinkelbach solves"
    lines = [
        Text(f"makespan {seconds(plan.summary.makespan_s)} · quality (importance covered) "
             f"{plan.summary.quality:.3f} · bytes/round up {human_bytes(plan.summary.upload_bytes)} "
             f"down {human_bytes(plan.summary.download_bytes)}"),
        *cohort_line(plan.summary),
        Text(objective_text(plan.objective_kind, plan.objective_time_weight, plan.reference_time_s,
                            plan_objective(plan))),
        Text(f"solver {sv.solver} ({sv.method}) · status {sv.status} · gap {gap}{solves} · "
             f"solve time {sv.solve_time_s:.2f} s · importance: {plan.importance.scorer} "
             f"({plan.importance.source}) · selection {plan.selection}"),
    ]
    if plan.baseline:
        b = plan.baseline
        speedup = b.summary.makespan_s / max(plan.summary.makespan_s, 1e-12)
        lines.append(Text(
            f"homogeneous baseline (all servers at what {', '.join(b.limited_by) or 'the weakest'} "
            f"can run): {b.bits}-bit, batch {b.batch_size}, {b.adapted_matrices} matrices, "
            f"{b.lora_params:,} LoRA params · makespan {seconds(b.summary.makespan_s)} · quality "
            f"{b.summary.quality:.3f} → heterogeneous plan is {speedup:.2f}x faster per round at "
            f"{plan.summary.quality / max(b.summary.quality, 1e-12):.2f}x the quality"))
    else:
        lines.append(Text("homogeneous baseline: no configuration fits every server"))
    return Group(t, *lines)


def _pair(pair, fmt: str | Callable[[object], str] = "{}") -> str:
    """'a', or 'a → b' where they differ; a side that is not there (None) shows as '-'."""
    a, b = pair
    format_ = fmt if callable(fmt) else fmt.format

    def show(x: object) -> str:
        return "-" if x is None else format_(x)

    return show(a) if a == b else f"{show(a)} → {show(b)}"


def diff_table(d: PlanDiff) -> Group:
    t = Table(title=f"diff {d.a} → {d.b} · strategy {_pair(d.strategy)}", title_justify="left")
    for col in ("server", "status", "bits", "batch", "+matrices", "-matrices", "rank changes",
                "memory GiB", "round s", "LoRA params", "density up", "density down", "precision up",
                "precision down"):
        t.add_column(col, justify="left" if col in ("server", "status") else "right")
    for s in d.servers:
        ups = sum(1 for a, b in s.rank_changes.values() if b > a)
        t.add_row(s.name, s.status, _pair(s.bits), _pair(s.batch_size), str(len(s.matrices_added)),
                  str(len(s.matrices_removed)),
                  f"{ups}↑ {len(s.rank_changes) - ups}↓" if s.rank_changes else "-",
                  _pair(s.memory_gib, "{:.2f}"), _pair(s.round_s, "{:.2f}"),
                  _pair(s.lora_params, "{:,}"), _pair(s.upload_density, fraction),
                  _pair(s.download_density, fraction), _pair(s.upload_precision),
                  _pair(s.download_precision))
    totals = Text(
        f"makespan {_pair(d.makespan_s, '{:.2f}')} s · quality {_pair(d.quality, '{:.3f}')} · "
        f"upload/round {_pair(tuple(human_bytes(x) for x in d.upload_bytes))} · download/round "
        f"{_pair(tuple(human_bytes(x) for x in d.download_bytes))} · solver {_pair(d.solver_status)}")
    return Group(t, totals)


def console(stderr: bool = False) -> Console:
    return Console(stderr=stderr, width=200 if not stderr else None)


def run_table(result) -> Group:
    """Per server, measured against predicted (last round); then the global model per round."""
    rows = result.rows
    if not rows:
        return Group(Text(f"nothing to run: {result.run_dir} already holds every round"))
    t = Table(title=f"run {result.run_dir} · {rows[-1]['rule']} · round {rows[-1]['round']}",
              title_justify="left")
    for col in ("server", "bits", "batch", "train loss", "memory GiB (measured peak / predicted)",
                "up bytes (measured / predicted)", "down bytes (measured / predicted)", "train s"):
        t.add_column(col, justify="left" if col == "server" else "right")
    for s in rows[-1]["servers"]:
        t.add_row(s["server"], str(s["bits"]), str(s["batch_size"]), f"{s['train_loss']:.3f}",
                  f"{s['memory_gib']:.2f} / {s['predicted_memory_gib']:.2f}",
                  f"{human_bytes(s['upload_bytes'])} / {human_bytes(s['predicted_upload_bytes'])}",
                  f"{human_bytes(s['download_bytes'])} / {human_bytes(s['predicted_download_bytes'])}",
                  f"{s['train_s']:.1f}")
    curve = Table(title="global model on the held-out split", title_justify="left")
    decays = len({r.get("learning_rate") for r in rows}) > 1  # a schedule: show what each round trained at
    for col in ("round", *(["learning rate"] if decays else []), "eval loss", "exact match (95% interval)",
                "round s", "of which training"):
        curve.add_column(col, justify="right")
    for r in rows:
        e, lr = r["eval"], r.get("learning_rate")
        curve.add_row(str(r["round"]), *([f"{lr:.3g}" if lr is not None else "-"] if decays else []),
                      f"{e['loss']:.3f}" if e else "-", _exact_match(e),
                      f"{r['round_s']:.1f}", f"{r['train_s'] / max(r['round_s'], 1e-9):.0%}")

    d = result.run_dir
    return Group(t, curve, Text(f"adapter (peft format): {d / 'adapter'} · metrics: "
                                f"{d / 'metrics.jsonl'} · curves: {d / 'curves.png'}"))


def _exact_match(e: dict | None) -> str:
    """'0.412 (0.35-0.48)'; '-' on rounds not evaluated or scored on the loss only."""
    if e is None or e["accuracy"] is None:
        return "-"
    lo, hi = e["accuracy_ci95"]
    return f"{e['accuracy']:.3f} ({lo:.2f}-{hi:.2f})"


def export_view(result) -> Text:
    """What `fedpipe export` wrote: ranks and size before and after, the truncation error, how to load."""
    ranks_before = max(m.rank_before for m in result.modules)
    ranks_after = max(m.rank_after for m in result.modules)
    worst = result.worst
    lines = [f"global adapter: {len(result.modules)} modules, rank <= {ranks_before}, "
             f"{human_bytes(result.bytes_before)}"]
    if ranks_after != ranks_before or result.rel_error > 0:
        lines.append(f"cut to rank <= {ranks_after}: relative error |ΔW - ΔW_k|_F / |ΔW|_F "
                     f"{result.rel_error:.3g} overall, at most {worst.rel_error:.3g} ({worst.name}); "
                     f"largest dropped singular value {max(m.sigma_dropped for m in result.modules):.3g}")
    if result.merged:
        lines.append(f"wrote {result.out_dir}: a full model (base + update, safetensors, tokenizer): "
                     f"AutoModelForCausalLM.from_pretrained({str(result.out_dir)!r})")
    else:
        lines.append(f"wrote {result.out_dir}: a peft adapter, {human_bytes(result.bytes_after)}, "
                     f"base {result.base_dir}: "
                     f"AutoPeftModelForCausalLM.from_pretrained({str(result.out_dir)!r})")
    return Text("\n".join(lines))


class run_progress:  # noqa: N801 - used as a context manager like rich's own helpers
    """A progress bar over (round, server) steps of a run, fed by the runner's callback.

    It starts on the first step, so an error found while setting up prints alone, with no empty
    bar line before it."""

    def __enter__(self):
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

        self._progress = Progress(TextColumn("{task.description}"), BarColumn(), TimeElapsedColumn(),
                                  console=console(stderr=True), transient=False)
        self._task = None

        def update(server: str, round_index: int, done: int, total: int) -> None:
            if self._task is None:
                self._progress.start()
                self._task = self._progress.add_task("", total=total, completed=done)
            self._progress.update(self._task, completed=done, description=f"round {round_index} · {server}")

        return update

    def __exit__(self, *exc) -> None:
        if self._task is not None:
            self._progress.stop()


# ---------------------------------------------------------------- sweeps, explanations, show
SHADES = " ▁▂▃▄▅▆▇█"


def rank_map_text(rm) -> Group:
    """A `plots.RankMap` as one row of shaded cells per server (one cell per layer)."""
    t = Table(title="rank map: mean LoRA rank per layer", title_justify="left", show_edge=False,
              box=None, pad_edge=False)
    t.add_column("server")
    t.add_column("layers 0 → " + str(rm.values.shape[1] - 1), no_wrap=True)
    t.add_column("mean", justify="right")
    top = max(rm.max_rank, 1)
    for name, row in zip(rm.servers, rm.values, strict=True):
        cells = "".join(SHADES[min(len(SHADES) - 1, round(v / top * (len(SHADES) - 1)))] for v in row)
        t.add_row(name, Text(cells, style="green on grey15"), f"{row.mean():.1f}")
    legend = Text(f"' ' = not adapted … '█' = rank {top} on every type ({', '.join(rm.types)})",
                  style="dim")
    return Group(t, legend)


def _bar(used: float, budget: float, width: int = 20) -> Text:
    share = used / budget if budget > 0 else 0.0
    full = min(width, round(share * width))
    style = "red" if share > 1 + 1e-9 else "yellow" if share >= 0.99 else "green"
    return Text("█" * full + "░" * (width - full), style=style)


def show_view(plan: Plan, rm) -> Group:
    """A plan for a person: the plan table, each budget as a bar, the rank map."""
    budgets = Table(title="predictions against budgets", title_justify="left")
    for col in ("server", "memory", "", "round", "", "bits", "adapted", "importance covered"):
        budgets.add_column(col, justify="left" if col in ("server", "") else "right")
    limit = plan.deadline_s or plan.summary.makespan_s
    for s in plan.servers:
        p = s.predicted
        budgets.add_row(s.name, f"{p.memory_gib:.2f} / {p.memory_budget_gib:g} GiB",
                        _bar(p.memory_gib, p.memory_budget_gib), f"{p.round_s:.2f} / {limit:.2f} s",
                        _bar(p.round_s, limit), str(s.bits), str(len(s.rank_pattern)),
                        f"{s.importance_covered:.3f}")
    what = f"deadline {plan.deadline_s:g} s" if plan.deadline_s else "makespan (no deadline)"
    return Group(plan_table(plan), Text(""), budgets, Text(f"round bars: share of the {what}", style="dim"),
                 Text(""), rank_map_text(rm))


def _bits_mix(counts: dict[int, int]) -> str:
    return " ".join(f"{b}b:{n}" for b, n in sorted(counts.items())) or "-"


def sweep_table(result) -> Group:
    """One row per budget point of a `sweep.SweepResult`; infeasible points say why."""
    t = Table(title=f"sweep {result.name} ({result.profile})", title_justify="left")
    t.add_column("point")
    for axis in result.axes:
        t.add_column({"memory": "memory ×", "bandwidth": "bandwidth ×", "servers": "servers ×",
                      "deadline": "deadline"}[axis], justify="right")
    for col in ("status", "makespan", "quality", "importance", "bytes/round", "servers per bits", "time",
                "note"):
        t.add_column(col, justify="left" if col in ("status", "servers per bits", "note") else "right")
    for p in result.points:
        axes = []
        for axis in result.axes:
            v = p.budget[axis]
            if axis == "deadline" and v.endswith("x"):
                v = v if p.deadline_s is None else f"{v} = {p.deadline_s:.1f} s"
            elif axis == "deadline" and v != "none":
                v = f"{v} s"
            axes.append(v)
        if p.status == "ok":
            note = f"reuses {p.reused_from}" if p.reused_from else ""
            t.add_row(p.name, *axes, Text(p.solver_status or "ok", style="green"), seconds(p.makespan_s),
                      f"{p.quality:.3f}", f"{p.importance_covered:.3f}",
                      human_bytes(p.upload_bytes + p.download_bytes), _bits_mix(p.servers_per_bits),
                      f"{p.solve_s:.2f} s", note)
        else:
            reasons = (p.reason or "").split("; ")
            more = f" (+{len(reasons) - 1} more in sweep.yaml)" if len(reasons) > 1 else ""
            t.add_row(p.name, *axes, Text("infeasible", style="red"), "-", "-", "-", "-", "-",
                      f"{p.solve_s:.2f} s", Text(reasons[0] + more, style="red"))
    ok = sum(p.status == "ok" for p in result.points)
    reused = sum(bool(p.reused_from) for p in result.points)
    foot = Text(f"{len(result.points)} points: {ok} planned ({reused} reused), "
                f"{len(result.points) - ok} infeasible · setup {result.setup_s:.2f} s · "
                f"total {result.total_s:.1f} s · plans in {result.out_dir}/ · bytes/round = up + down, "
                f"all servers · importance = sample-weighted importance covered")
    return Group(t, foot)


def explain_view(e) -> Group:
    """An `explain.Explanation`: per server, what binds, the options one step up, what is forgone."""
    deadline = f", deadline {e.deadline_s:g} s" if e.deadline_s else ", no deadline"
    parts: list = [Text(f"{e.plan}: makespan {seconds(e.makespan_s)}{deadline} · "
                        + objective_text(e.objective_kind, e.time_weight, e.reference_time_s, e.objective),
                        style="bold")]
    parts += [Text(f"warning: {w}", style="yellow") for w in e.warnings]
    for s in e.servers:
        n = f" (×{s.count})" if s.count > 1 else ""
        parts.append(Text(""))
        parts.append(Text(f"{s.server}{n}: {s.bits}-bit, batch {s.batch_size}, density "
                          f"{fraction(s.density)}, wire {s.precision} · binding: "
                          f"{', '.join(s.binding) or 'nothing'}", style="bold cyan"))
        parts += [Text(f"  {line}") for line in s.constraints]
        if s.options:
            t = Table(title_justify="left", show_edge=False)
            for col in ("next-better option", "memory / budget", "round", "makespan", "Δ quality",
                        "verdict: what it would take"):
                t.add_column(col, justify="left" if col[0] in "nv" else "right")
            for o in s.options:
                style = "red" if o.blocked_by and o.blocked_by != ["objective"] else \
                    "yellow" if o.blocked_by else "green"
                t.add_row(o.label, f"{o.memory_gib:.2f} / {o.memory_budget_gib:g} GiB", seconds(o.round_s),
                          seconds(o.makespan_s), f"{o.d_quality:+.2g}", Text(o.needs, style=style))
            parts.append(t)
        else:
            parts.append(Text("  already at the top of every choice (bits, batch, density, wire "
                              "precision, rank)"))
        parts.append(Text(
            f"  importance covered {s.covered:.3f}, forgone {s.forgone:.3f}: {s.forgone_unadapted:.3f} on "
            f"unadapted matrices, {s.forgone_lower_rank:.3f} on ranks below the top; bits, batch, density "
            f"and wire precision keep {s.config_factor:.3f} of the quality"))
        lacking = [c for c in s.by_type if c.forgone > 1e-9]
        if lacking:
            t = Table(show_edge=False, box=None, padding=(0, 2))
            for col in ("  type", "adapted", "at top rank", "unadapted layers", "forgone"):
                t.add_column(col, justify="left" if col in ("  type", "unadapted layers") else "right")
            for c in lacking:
                t.add_row(f"  {c.kind}", f"{c.adapted}/{c.total}", f"{c.at_top_rank}/{c.total}",
                          c.unadapted_layers, f"{c.forgone:.3f}")
            parts.append(t)
    return Group(*parts)
