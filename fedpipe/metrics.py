"""Run metrics: one JSON line per round in metrics.jsonl, and PNG curves drawn from it."""

from __future__ import annotations

import json
from pathlib import Path

from fedpipe.atomic import write_atomic, write_atomic_with


def read_metrics(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def write_metrics(path: Path, rows: list[dict]) -> None:
    """Rewrite the whole file atomically (it is small), so a killed run never leaves half a line."""
    write_atomic(path, "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows))


def plot_rounds(rows: list[dict], path: Path) -> Path | None:
    """Eval loss and exact-match accuracy of the global model per round, overall and per family:
    each curve over the rounds that measured it (the eval and accuracy cadences skip rounds)."""
    rows = [r for r in rows if r["eval"] is not None]
    if not rows:
        return None
    measured = [r for r in rows if r["eval"]["accuracy"] is not None]
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rounds, acc_rounds = [r["round"] for r in rows], [r["round"] for r in measured]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 4))
    ax_loss.plot(rounds, [r["eval"]["loss"] for r in rows], "o-", color="black", label="all")
    ax_acc.plot(acc_rounds, [r["eval"]["accuracy"] for r in measured], "o-", color="black", label="all")
    for family in rows[-1]["eval"]["per_family"]:
        ax_loss.plot(rounds, [r["eval"]["per_family"][family]["loss"] for r in rows], ".--", label=family)
        ax_acc.plot(acc_rounds, [r["eval"]["per_family"][family]["accuracy"] for r in measured], ".--",
                    label=family)
    ax_loss.set(xlabel="round", ylabel="answer loss", title="global model: eval loss")
    ax_acc.set(xlabel="round", ylabel="exact match", title="global model: accuracy", ylim=(-0.02, 1.02))
    ax_acc.legend(fontsize=7)
    fig.tight_layout()
    write_atomic_with(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    plt.close(fig)
    return path
