"""How an importance report is shown: a ranked table, a layers x matrix-types heat map (PNG),
a progress bar and a line per server while servers score. Formatting only; the numbers come from
the report."""

from __future__ import annotations

import contextlib
import math
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from rich.console import Group
from rich.table import Table
from rich.text import Text

from fedpipe.atomic import write_atomic_with
from fedpipe.importance import ImportanceReport, ScoringProgress
from fedpipe.shapes import MATRIX_TYPES

_SITE = re.compile(r"layers\.(\d+)\.(?:self_attn|mlp)\.(\w+)$")


def _site(name: str) -> tuple[int, str] | None:
    """(layer, matrix type) of a full module name, None for other modules."""
    match = _SITE.search(name)
    return (int(match.group(1)), match.group(2)) if match else None


def _shares(report: ImportanceReport) -> dict[str, float]:
    total = sum(max(0.0, v) for v in report.scores.values())
    return {n: (max(0.0, v) / total if total > 0 else 0.0) for n, v in report.scores.items()}


def ranked_table(report: ImportanceReport, top: int = 20) -> Group:
    """The `top` most important matrices (share of the total score, cumulative share), the
    `top // 4` least important, and the share per matrix type."""
    shares = _shares(report)
    ranked = report.ranked()
    t = Table(title=f"importance · {report.scorer} · {report.model}", title_justify="left")
    for col in ("rank", "module", "layer", "type", "score", "share", "cumulative"):
        t.add_column(col, justify="left" if col in ("module", "type") else "right")
    cumulative = 0.0
    bottom = max(1, top // 4)
    for i, (name, score) in enumerate(ranked):
        cumulative += shares[name]
        if i == top and len(ranked) > top + bottom:
            t.add_row("…", f"{len(ranked) - top - bottom} more", "", "", "", "", "")
        if i < top or i >= len(ranked) - bottom:
            layer, kind = _site(name) or ("", "")
            t.add_row(str(i + 1), name, str(layer), kind, f"{score:.4g}", f"{shares[name]:.2%}",
                      f"{cumulative:.1%}")
    per_type: dict[str, float] = {}
    for name, share in shares.items():
        kind = (_site(name) or (0, "other"))[1]
        per_type[kind] = per_type.get(kind, 0.0) + share
    by_type = " · ".join(f"{k} {v:.1%}" for k, v in sorted(per_type.items(), key=lambda kv: -kv[1]))
    lines = [Text(f"share per type: {by_type}")]
    if report.data:
        lines.append(Text(f"data: {report.data}"))
    return Group(t, *lines)


def save_heatmap(report: ImportanceReport, path: str | Path) -> Path:
    """A PNG heat map, layers (rows) x matrix types (columns), colour = log10 of the share of
    the total score (scores span orders of magnitude); unscored cells are blank."""
    from matplotlib.figure import Figure

    shares = _shares(report)
    sites = {name: site for name in shares if (site := _site(name))}
    layers = 1 + max((layer for layer, _ in sites.values()), default=0)
    kinds = [k for k in MATRIX_TYPES if any(kind == k for _, kind in sites.values())]
    kinds += sorted({kind for _, kind in sites.values()} - set(kinds))
    grid = [[math.nan] * len(kinds) for _ in range(layers)]
    for name, (layer, kind) in sites.items():
        grid[layer][kinds.index(kind)] = math.log10(shares[name]) if shares[name] > 0 else math.nan

    fig = Figure(figsize=(2.0 + 0.9 * max(1, len(kinds)), 2.0 + 0.22 * layers), dpi=110,
                 layout="constrained")
    ax = fig.add_subplot()
    image = ax.imshow(grid, aspect="auto", cmap="viridis", interpolation="nearest")
    ax.set_xticks(range(len(kinds)), kinds, rotation=45, ha="right")
    ax.set_yticks(range(layers))
    ax.tick_params(axis="y", labelsize=7)
    ax.set_ylabel("layer")
    ax.set_title(f"{report.scorer} · {report.model}", fontsize=10)
    fig.colorbar(image, ax=ax, label="log10 share of total score")
    return write_atomic_with(path, lambda tmp: fig.savefig(tmp, format="png"))


class _ScoringBar:
    """A `ScoringProgress` on stderr: a bar over every server's calibration batches, and a line
    per server as it finishes (server, batches, seconds), which stays when the bar goes."""

    def __init__(self, bar: Any, task: Any) -> None:
        self.bar, self.task = bar, task

    def batch_done(self, server: str) -> None:
        self.bar.update(self.task, advance=1, description=f"scoring on {server}")

    def server_done(self, server: str, batches: int, seconds: float) -> None:
        self.bar.console.print(f"scored {server}: {batches} batches in {seconds:.1f} s",
                               highlight=False)


@contextlib.contextmanager
def scoring_progress(servers: dict[str, int], batches: int) -> Iterator[ScoringProgress]:
    """Progress of `compute_report` on stderr (`_ScoringBar`)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from fedpipe.render import console

    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), console=console(stderr=True), transient=True) as bar:
        yield _ScoringBar(bar, bar.add_task("scoring", total=len(servers) * batches))
