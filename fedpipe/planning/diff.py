"""What changed between two plans: per server and in total, as plain data for tables and JSON."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from pydantic import BaseModel

from fedpipe.plan import Plan, ServerPlan


class ServerDiff(BaseModel):
    """One server's changes from plan A to plan B; a server in only one plan ("added" or
    "removed") has None on the other side of each pair and all its matrices added or removed."""

    name: str
    status: str  # "changed", "unchanged", "added", "removed"
    bits: tuple[int | None, int | None]
    batch_size: tuple[int | None, int | None]
    matrices_added: list[str] = []
    matrices_removed: list[str] = []
    rank_changes: dict[str, tuple[int, int]] = {}
    memory_gib: tuple[float | None, float | None]
    round_s: tuple[float | None, float | None]
    lora_params: tuple[int | None, int | None]
    upload_density: tuple[float | None, float | None]
    download_density: tuple[float | None, float | None]
    upload_precision: tuple[str | None, str | None]
    download_precision: tuple[str | None, str | None]


class PlanDiff(BaseModel):
    a: str
    b: str
    servers: list[ServerDiff]
    makespan_s: tuple[float, float]
    quality: tuple[float, float]
    upload_bytes: tuple[int, int]
    download_bytes: tuple[int, int]
    solver_status: tuple[str, str]
    strategy: tuple[str, str]


def _server_diff(a: ServerPlan | None, b: ServerPlan | None) -> ServerDiff:
    ra, rb = (a.rank_pattern if a else {}), (b.rank_pattern if b else {})

    def pair(get: Callable[[ServerPlan], Any]) -> tuple:
        return (get(a) if a else None, get(b) if b else None)

    same = a is not None and b is not None and (
        a.bits == b.bits and a.batch_size == b.batch_size and ra == rb
        and a.upload_density == b.upload_density and a.download_density == b.download_density
        and a.upload_precision == b.upload_precision and a.download_precision == b.download_precision)
    return ServerDiff(
        name=(a or b).name,
        status="added" if a is None else "removed" if b is None else "unchanged" if same else "changed",
        bits=pair(lambda s: s.bits), batch_size=pair(lambda s: s.batch_size),
        matrices_added=sorted(set(rb) - set(ra)), matrices_removed=sorted(set(ra) - set(rb)),
        rank_changes={n: (ra[n], rb[n]) for n in sorted(set(ra) & set(rb)) if ra[n] != rb[n]},
        memory_gib=pair(lambda s: s.predicted.memory_gib), round_s=pair(lambda s: s.predicted.round_s),
        lora_params=pair(lambda s: s.predicted.lora_params),
        upload_density=pair(lambda s: s.upload_density),
        download_density=pair(lambda s: s.download_density),
        upload_precision=pair(lambda s: s.upload_precision),
        download_precision=pair(lambda s: s.download_precision),
    )


def diff_plans(a: Plan, b: Plan, a_name: str = "A", b_name: str = "B") -> PlanDiff:
    """Compare two plans server by server (matched by name)."""
    by_a = {s.name: s for s in a.servers}
    by_b = {s.name: s for s in b.servers}
    servers = []
    for name in list(by_a) + [n for n in by_b if n not in by_a]:
        servers.append(_server_diff(by_a.get(name), by_b.get(name)))
    return PlanDiff(
        a=a_name, b=b_name, servers=servers,
        makespan_s=(a.summary.makespan_s, b.summary.makespan_s),
        quality=(a.summary.quality, b.summary.quality),
        upload_bytes=(a.summary.upload_bytes, b.summary.upload_bytes),
        download_bytes=(a.summary.download_bytes, b.summary.download_bytes),
        solver_status=(a.solver.status, b.solver.status),
        strategy=(a.strategy, b.strategy),
    )
