"""Pictures of plans and sweeps: the per-server x per-layer rank map and budget curves (PNG).

The rank map's cell (server, layer) is the mean LoRA rank over the layer's candidate matrix types
(a type not adapted counts as rank 0), so a full row at the top rank is a server adapting every
candidate at the highest rank. matplotlib is imported only when a picture is drawn (Agg backend:
no display needed); the rank data itself is plain numpy and also feeds the text rendering.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fedpipe.atomic import write_atomic_with
from fedpipe.errors import FedpipeError
from fedpipe.plan import Plan
from fedpipe.profile import load_profile_and_shapes
from fedpipe.shapes import load_shapes

_LAYER = re.compile(r"\.layers\.(\d+)\.")
_KIND = re.compile(r"\.([a-z_]+_proj)$")


@dataclass
class RankMap:
    """Mean rank per server entry (rows) and layer (columns)."""

    servers: list[str]
    values: np.ndarray
    max_rank: int
    types: list[str]


def plan_layout(plan: Plan) -> tuple[int, list[str]]:
    """Layers and candidate matrix types of a plan: from its profile when that file is there,
    else from the model's shape card and the types the plan adapts."""
    path = Path(plan.profile.path)
    try:
        profile, shapes = load_profile_and_shapes(path)
        return shapes.layers, list(profile.candidates.targets)
    except FedpipeError:
        pass
    names = [n for s in plan.servers for n in s.rank_pattern]
    types = sorted({m.group(1) for n in names if (m := _KIND.search(n))})
    try:
        layers = load_shapes(plan.model).layers
    except FedpipeError:
        layers = 1 + max((int(m.group(1)) for n in names if (m := _LAYER.search(n))), default=0)
    return layers, types or ["q_proj"]


def rank_map(plan: Plan, layers: int, types: Sequence[str]) -> RankMap:
    values = np.zeros((len(plan.servers), layers))
    for i, s in enumerate(plan.servers):
        for name, r in s.rank_pattern.items():
            layer, kind = _LAYER.search(name), _KIND.search(name)
            if layer and kind and kind.group(1) in types and int(layer.group(1)) < layers:
                values[i, int(layer.group(1))] += r
    top = max((r for s in plan.servers for r in s.rank_pattern.values()), default=0)
    labels = [s.name if s.count == 1 else f"{s.name} ×{s.count}" for s in plan.servers]
    return RankMap(labels, values / max(1, len(types)), top, list(types))


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: str | Path) -> Path:
    plt = _pyplot()
    try:
        return write_atomic_with(path, lambda tmp: fig.savefig(tmp, format="png", dpi=130,
                                                                 bbox_inches="tight"))
    finally:
        plt.close(fig)


def rank_map_png(panels: Sequence[tuple[str, RankMap]], path: str | Path, columns: int = 2) -> Path:
    """One heat map per (title, rank map), sharing one colour scale."""
    plt = _pyplot()
    if not panels:
        raise FedpipeError("rank map: no plans to draw")
    columns = min(columns, len(panels))
    rows = -(-len(panels) // columns)
    vmax = max(max(rm.max_rank, 1) for _, rm in panels)
    height = max(len(rm.servers) for _, rm in panels) * 0.32 + 1.1
    total = height * rows + 0.6  # inches, with room for the title above the panels' own titles
    fig, axes = plt.subplots(rows, columns, figsize=(6.2 * columns + 1.2, total), squeeze=False)
    fig.subplots_adjust(left=0.1, right=0.9, top=1 - 0.8 / total, hspace=0.7 if rows > 1 else 0.2,
                        wspace=0.3)
    image = None
    for ax, (title, rm) in zip(axes.flat, panels, strict=False):
        image = ax.imshow(rm.values, aspect="auto", cmap="viridis", vmin=0, vmax=vmax,
                          interpolation="nearest")
        ax.set_yticks(range(len(rm.servers)), rm.servers, fontsize=8)
        ax.set_xlabel("layer", fontsize=8)
        ax.tick_params(axis="x", labelsize=7)
        ax.set_title(title, fontsize=9)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.colorbar(image, ax=list(axes.flat), fraction=0.03 if rows > 1 else 0.04, pad=0.02,
                 label="mean LoRA rank")
    fig.suptitle(f"mean LoRA rank per layer over {', '.join(panels[0][1].types)} (0 = not adapted)",
                 fontsize=10, y=1 - 0.15 / total)
    return _save(fig, path)


def sweep_png(result, path: str | Path) -> Path:
    """Makespan, quality and servers per bits level against the swept budget (a `SweepResult`).

    The x axis is the first axis with more than one value; every combination of the other axes
    is one line. Infeasible points are red crosses on the x axis."""
    plt = _pyplot()
    from matplotlib.ticker import NullLocator

    axes = result.axes
    x_axis = next((a for a, v in axes.items() if len(v) > 1), next(iter(axes)))
    series: dict[str, list] = {}
    for p in result.points:
        label = ", ".join(f"{a} {v}" for a, v in p.budget.items() if a != x_axis)
        series.setdefault(label, []).append(p)
    fig, (ax_t, ax_q, ax_b) = plt.subplots(1, 3, figsize=(15, 4.4))
    fig.subplots_adjust(left=0.05, right=0.98, bottom=0.14, top=0.88, wspace=0.25)

    def x_of(p) -> float | None:
        return p.deadline_s if x_axis == "deadline" else float(p.budget[x_axis])

    for label, pts in series.items():
        ok = [(x_of(p), p) for p in pts if p.status == "ok" and x_of(p) is not None]
        xs = [x for x, _ in ok]
        kw = {"marker": "o", "label": label or None}
        line = ax_t.plot(xs, [p.makespan_s for _, p in ok], **kw)[0]
        ax_q.plot(xs, [p.quality for _, p in ok], **kw, color=line.get_color())
        ax_q.plot(xs, [p.importance_covered for _, p in ok], linestyle="--", marker=".",
                  color=line.get_color(), alpha=0.6)
        free = [p for p in pts if p.status == "ok" and x_of(p) is None]
        for p in free:  # a 'none' deadline: a horizontal reference
            ax_t.axhline(p.makespan_s, color=line.get_color(), linestyle=":", linewidth=1)
            ax_q.axhline(p.quality, color=line.get_color(), linestyle=":", linewidth=1)
        bad = [x_of(p) for p in pts if p.status != "ok" and x_of(p) is not None]
        for ax in (ax_t, ax_q):
            ax.plot(bad, [0] * len(bad), "x", color="red", markersize=9, clip_on=False)
    first = next(iter(series.values()))
    ok = [(x_of(p), p) for p in first if p.status == "ok" and x_of(p) is not None]
    levels = sorted({b for _, p in ok for b in p.servers_per_bits})
    positions = np.arange(len(ok))
    bottom = np.zeros(len(ok))
    for bits, colour in zip(levels, ("#4c72b0", "#dd8452", "#55a868"), strict=False):
        counts = np.array([p.servers_per_bits.get(bits, 0) for _, p in ok], dtype=float)
        ax_b.bar(positions, counts, bottom=bottom, label=f"{bits}-bit", color=colour)
        bottom += counts
    ax_b.set_xticks(positions, [f"{x:g}" for x, _ in ok])
    x_label = {"memory": "memory × profile", "bandwidth": "uplink and downlink × profile",
               "servers": "server count × profile", "deadline": "deadline (s)"}[x_axis]
    values = [x for pts in series.values() for p in pts if (x := x_of(p)) is not None]
    for ax in (ax_t, ax_q):
        ax.set_xlabel(x_label)
        ax.grid(alpha=0.3)
        if values and min(values) > 0 and max(values) / min(values) >= 4:
            ax.set_xscale("log", base=2)
            ax.xaxis.set_minor_locator(NullLocator())
        ax.set_xticks(sorted(set(values)), [f"{v:g}" for v in sorted(set(values))])
    ax_t.set_ylabel("makespan (s per round)")
    ax_t.set_ylim(bottom=0)
    ax_q.set_ylabel("quality (solid) · importance covered (dashed)")
    ax_q.set_ylim(top=1.02)
    ax_b.set_xlabel(x_label + (f" at {next(iter(series))}" if len(series) > 1 else ""))
    ax_b.set_ylabel("servers")
    ax_b.set_ylim(0, max(bottom, default=1) * 1.35)  # room for the legend above the bars
    ax_b.yaxis.get_major_locator().set_params(integer=True)
    ax_b.legend(fontsize=8, title="base precision")
    if len(series) > 1:
        ax_t.legend(fontsize=8)
    fig.suptitle(f"sweep of {result.name}: what the budget buys", fontsize=11)
    return _save(fig, path)


def sweep_pictures(result) -> list[Path]:
    """sweep.png (curves) and rankmap.png (one panel per planned point) in the sweep's folder."""
    out = Path(result.out_dir)
    paths = [sweep_png(result, out / "sweep.png")]
    plans = [(p.name, result.plan(p)) for p in result.points if p.plan]
    layout = plan_layout(plans[0][1]) if plans else None  # every point has the same model and targets
    panels = [(name, rank_map(plan, *layout)) for name, plan in plans]
    if panels:
        paths.append(rank_map_png(panels, out / "rankmap.png", columns=2 if len(panels) <= 4 else 3))
    return paths
