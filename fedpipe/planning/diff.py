"""What changed between two plans: per server and in total, as plain data for tables and JSON."""

from __future__ import annotations

from pydantic import BaseModel

from fedpipe.plan import Plan, ServerPlan


class ServerDiff(BaseModel):
    """One server's changes from plan A to plan B (None: the server is only in one plan)."""

    name: str
    status: str  # "changed", "unchanged", "added", "removed"
    bits: tuple[int, int] | None = None
    batch_size: tuple[int, int] | None = None
    matrices_added: list[str] = []
    matrices_removed: list[str] = []
    rank_changes: dict[str, tuple[int, int]] = {}
    memory_gib: tuple[float, float] | None = None
    round_s: tuple[float, float] | None = None
    lora_params: tuple[int, int] | None = None
    upload_density: tuple[float, float] | None = None
    download_density: tuple[float, float] | None = None


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


def _server_diff(a: ServerPlan, b: ServerPlan) -> ServerDiff:
    ra, rb = a.rank_pattern, b.rank_pattern
    diff = ServerDiff(
        name=a.name, status="changed",
        bits=(a.bits, b.bits), batch_size=(a.batch_size, b.batch_size),
        matrices_added=sorted(set(rb) - set(ra)), matrices_removed=sorted(set(ra) - set(rb)),
        rank_changes={n: (ra[n], rb[n]) for n in sorted(set(ra) & set(rb)) if ra[n] != rb[n]},
        memory_gib=(a.predicted.memory_gib, b.predicted.memory_gib),
        round_s=(a.predicted.round_s, b.predicted.round_s),
        lora_params=(a.predicted.lora_params, b.predicted.lora_params),
        upload_density=(a.upload_density, b.upload_density),
        download_density=(a.download_density, b.download_density),
    )
    same = (a.bits == b.bits and a.batch_size == b.batch_size and ra == rb
            and a.upload_density == b.upload_density and a.download_density == b.download_density)
    diff.status = "unchanged" if same else "changed"
    return diff


def diff_plans(a: Plan, b: Plan, a_name: str = "A", b_name: str = "B") -> PlanDiff:
    """Compare two plans server by server (matched by name)."""
    by_a = {s.name: s for s in a.servers}
    by_b = {s.name: s for s in b.servers}
    servers = []
    for name in list(by_a) + [n for n in by_b if n not in by_a]:
        if name in by_a and name in by_b:
            servers.append(_server_diff(by_a[name], by_b[name]))
        else:
            servers.append(ServerDiff(name=name, status="removed" if name in by_a else "added"))
    return PlanDiff(
        a=a_name, b=b_name, servers=servers,
        makespan_s=(a.summary.makespan_s, b.summary.makespan_s),
        quality=(a.summary.quality, b.summary.quality),
        upload_bytes=(a.summary.upload_bytes, b.summary.upload_bytes),
        download_bytes=(a.summary.download_bytes, b.summary.download_bytes),
        solver_status=(a.solver.status, b.solver.status),
        strategy=(a.strategy, b.strategy),
    )
