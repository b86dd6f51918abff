"""Tables for people: plans and diffs rendered with rich. No logic beyond formatting."""

from __future__ import annotations

from rich.console import Console, Group
from rich.table import Table
from rich.text import Text

from fedpipe.diff import PlanDiff
from fedpipe.plan import Plan


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"


def seconds(s: float) -> str:
    return f"{s:.2f} s" if s < 100 else f"{s:.0f} s"


def plan_table(plan: Plan) -> Group:
    """Per server: configuration, predictions against budgets; then totals and the baseline."""
    t = Table(title=f"plan {plan.profile.name} · {plan.model} · {plan.aggregation}", title_justify="left")
    for col in ("server", "n", "bits", "batch", "matrices", "LoRA params", "memory / budget",
                "compute", "upload", "download", "round", "binding"):
        t.add_column(col, justify="left" if col in ("server", "binding") else "right")
    for s in plan.servers:
        p = s.predicted
        t.add_row(s.name, str(s.count), str(s.bits), str(s.batch_size), str(len(s.rank_pattern)),
                  f"{p.lora_params:,}", f"{p.memory_gib:.2f} / {p.memory_budget_gib:g} GiB",
                  seconds(p.compute_s), seconds(p.upload_s), seconds(p.download_s), seconds(p.round_s),
                  ", ".join(s.binding) or "-")
    sv = plan.solver
    gap = "unknown" if sv.gap is None else f"{sv.gap:.2%}"
    lines = [
        Text(f"makespan {seconds(plan.summary.makespan_s)} · quality (importance covered) "
             f"{plan.summary.quality:.3f} · bytes/round up {human_bytes(plan.summary.upload_bytes)} "
             f"down {human_bytes(plan.summary.download_bytes)}"),
        Text(f"solver {sv.solver} ({sv.method}) · status {sv.status} · gap {gap} · "
             f"solve time {sv.solve_time_s:.2f} s · importance: {plan.importance.scorer} "
             f"({plan.importance.source})"),
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


def _pair(pair, fmt: str = "{}") -> str:
    a, b = pair
    return fmt.format(a) if a == b else f"{fmt.format(a)} → {fmt.format(b)}"


def diff_table(d: PlanDiff) -> Group:
    t = Table(title=f"diff {d.a} → {d.b}", title_justify="left")
    for col in ("server", "status", "bits", "batch", "+matrices", "-matrices", "rank changes",
                "memory GiB", "round s", "LoRA params"):
        t.add_column(col, justify="left" if col in ("server", "status") else "right")
    for s in d.servers:
        if s.status in ("added", "removed"):
            t.add_row(s.name, s.status, *[""] * 8)
            continue
        ups = sum(1 for a, b in s.rank_changes.values() if b > a)
        t.add_row(s.name, s.status, _pair(s.bits), _pair(s.batch_size), str(len(s.matrices_added)),
                  str(len(s.matrices_removed)),
                  f"{ups}↑ {len(s.rank_changes) - ups}↓" if s.rank_changes else "-",
                  _pair(s.memory_gib, "{:.2f}"), _pair(s.round_s, "{:.2f}"),
                  _pair(s.lora_params, "{:,}"))
    totals = Text(
        f"makespan {_pair(d.makespan_s, '{:.2f}')} s · quality {_pair(d.quality, '{:.3f}')} · "
        f"upload/round {_pair(tuple(human_bytes(x) for x in d.upload_bytes))} · download/round "
        f"{_pair(tuple(human_bytes(x) for x in d.download_bytes))} · solver {_pair(d.solver_status)}")
    return Group(t, totals)


def console(stderr: bool = False) -> Console:
    return Console(stderr=stderr, width=200 if not stderr else None)
