"""`fedpipe export RUN_DIR`: the run's global adapter in a form a serving stack takes.

The global adapter can be large: under flexlora its rank is the sum of the servers' ranks (160 on
the shipped cluster), more than a LoRA server such as vLLM accepts (`max_lora_rank`, 16 by
default). Each module's update B @ A is cut to its best rank-k approximation (Eckart-Young) by
the factored SVD the aggregators use (QRs of the factors and a small core SVD: the dense matrix is
never formed). k is fixed (`rank`) or the smallest keeping a share `energy` of the update's
squared Frobenius norm; the error is reported per module and overall. The result is a peft
adapter folder (with the base model's path and tokenizer) or, `merge`, a full model folder.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from fedpipe.aggregators.linalg import factored_svd, map_modules, split_sqrt
from fedpipe.errors import FedpipeError
from fedpipe.lora import GlobalAdapter, LoraFactors
from fedpipe.models import ADAPTER_WEIGHTS, load_adapter, save_adapter, save_merged


@dataclass(frozen=True)
class ModuleCut:
    """One module's truncation: ranks, the squared norms kept and dropped, the largest dropped
    singular value (it bounds the change of the module's output: |ΔW x - ΔW_k x| <= sigma |x|)."""

    name: str
    rank_before: int
    rank_after: int
    kept_sq: float
    dropped_sq: float
    sigma_dropped: float

    @property
    def rel_error(self) -> float:
        """|ΔW - ΔW_k|_F / |ΔW|_F."""
        total = self.kept_sq + self.dropped_sq
        return math.sqrt(self.dropped_sq / total) if total > 0 else 0.0


@dataclass(frozen=True)
class ExportResult:
    out_dir: Path
    base_dir: Path
    merged: bool
    modules: list[ModuleCut]
    bytes_before: int
    bytes_after: int | None  # the adapter's file (None when merged)

    @property
    def rel_error(self) -> float:
        """|ΔW - ΔW_k|_F / |ΔW|_F over all modules together."""
        kept = sum(m.kept_sq for m in self.modules)
        dropped = sum(m.dropped_sq for m in self.modules)
        return math.sqrt(dropped / (kept + dropped)) if kept + dropped > 0 else 0.0

    @property
    def worst(self) -> ModuleCut:
        return max(self.modules, key=lambda m: m.rel_error)


def cut_rank(S: list[float], rank: int | None, energy: float | None) -> int:
    """How many of the singular values S (descending) to keep: at most `rank`, and the fewest
    whose squares hold a share `energy` of the total (at least one)."""
    k = len(S)
    if energy is not None:
        total, running = sum(s * s for s in S), 0.0
        for i, s in enumerate(S):
            running += s * s
            if running >= energy * total:
                k = i + 1
                break
    return max(1, min(k, rank if rank is not None else k))


def truncate(adapter: GlobalAdapter, rank: int | None = None, energy: float | None = None
             ) -> tuple[GlobalAdapter, list[ModuleCut]]:
    """Every module's best approximation of rank `cut_rank(...)`, as folded float32 factors."""
    if rank is not None and rank < 1:
        raise FedpipeError(f"--rank: {rank} is out of range; valid is a rank >= 1")
    if energy is not None and not 0 < energy <= 1:
        raise FedpipeError(f"--energy: {energy} is out of range; valid is 0 < energy <= 1")

    def cut(name: str) -> tuple[LoraFactors, ModuleCut]:
        f = adapter.factors[name].folded()
        U, S, Vh = factored_svd(f.B.double(), f.A.double())
        values = S.tolist()
        k = cut_rank(values, rank, energy)
        dropped = values[k:]
        return split_sqrt(U, S, Vh, k), ModuleCut(
            name, f.rank, k, sum(s * s for s in values[:k]), sum(s * s for s in dropped),
            dropped[0] if dropped else 0.0)

    done = map_modules(cut, list(adapter.factors))
    return (GlobalAdapter({n: f for n, (f, _) in done.items()}, adapter.round),
            [c for _, c in done.values()])


def export_run(run_dir: str | Path, out_dir: str | Path, *, rank: int | None = None,
               energy: float | None = None, merge: bool = False,
               base: str | Path | None = None) -> ExportResult:
    """Export RUN_DIR/adapter to `out_dir`: cut to `rank` / `energy` when given; a peft folder
    (base path recorded, tokenizer included), or `merge`d into a full model folder."""
    run_dir = Path(run_dir)
    adapter_dir = run_dir / "adapter"
    if not adapter_dir.is_dir():
        raise FedpipeError(f"export: {adapter_dir.absolute()} is not there: pass the folder "
                           "`fedpipe run` wrote (runs/NAME), after at least one round")
    adapter, recorded_base = load_adapter(adapter_dir)
    base_dir = Path(base) if base is not None else recorded_base
    if not (base_dir / "config.json").is_file():
        raise FedpipeError(f"export: the base model {base_dir.absolute()} is not there",
                           ["pass its folder with --base"])
    if rank is not None or energy is not None:
        adapter, cuts = truncate(adapter, rank, energy)
    else:
        cuts = [ModuleCut(n, f.rank, f.rank, 0.0, 0.0, 0.0) for n, f in adapter.factors.items()]
    before = (adapter_dir / ADAPTER_WEIGHTS).stat().st_size
    if merge:
        out = save_merged(adapter, base_dir, out_dir)
        return ExportResult(out, base_dir, True, cuts, before, None)
    out = save_adapter(adapter, base_dir, out_dir, with_tokenizer=True)
    return ExportResult(out, base_dir, False, cuts, before, (out / ADAPTER_WEIGHTS).stat().st_size)
