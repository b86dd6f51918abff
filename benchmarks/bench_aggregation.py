"""Factored FlexLoRA / FLoRA aggregation against the dense reference, and a 7B-shaped round.

Run: ``python benchmarks/bench_aggregation.py [--quick] [--round-only] [--device cpu|cuda] [--threads N]``.

Part 1, per matrix shape and server mix: the dense reference materialises
dW = sum p_k s_k B_k A_k and takes its SVD (what the FlexLoRA reference code does; here the cheaper
thin SVD, ``full_matrices=False``), against ``FlexLoRA().aggregate`` (QR of the stacked factors and
an R x R SVD, R = total rank) and ``FLoRA().aggregate`` (stacking). "sv rel" is the largest
|sigma_factored - sigma_dense| / sigma_dense over the R non-zero singular values; "fact/f64" and
"dense/f64" hold each side against float64 singular values (the factored SVD in float64, which
matches a dense float64 SVD to ~1e-11: on CUDA the dense float32 reference is the less accurate
one, ~1e-3); "flora err" is
||B A - dW||_F / ||dW||_F of FLoRA's stacked factors against the dense sum.

Part 2: one server-side round (aggregate, then broadcast to every server) for a Llama-2-7B-shaped
adapter set: q, k, v, o (4096 x 4096), gate, up (11008 x 4096), down (4096 x 11008), 32 layers,
10 servers with ranks 4, 8, 16, 32, 64 (twice). Times are medians; seeds are fixed. Other work
on the same cores slows everything: compare within one run.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fedpipe.aggregators import FlexLoRA, FLoRA, get_aggregator  # noqa: E402
from fedpipe.aggregators.linalg import factored_svd, participants, stack_factors  # noqa: E402
from fedpipe.lora import ClientUpdate, LoraFactors  # noqa: E402

LADDER = (4, 8, 16, 32, 64)
ALPHA = 16.0
LLAMA7B = {  # (d_out, d_in)
    "self_attn.q_proj": (4096, 4096), "self_attn.k_proj": (4096, 4096),
    "self_attn.v_proj": (4096, 4096), "self_attn.o_proj": (4096, 4096),
    "mlp.gate_proj": (11008, 4096), "mlp.up_proj": (11008, 4096), "mlp.down_proj": (4096, 11008),
}


def server_ranks(servers: int, ladder: tuple[int, ...]) -> list[int]:
    return [ladder[k % len(ladder)] for k in range(servers)]


def make_updates(shapes: dict[str, tuple[int, int]], ranks: list[int], seed: int,
                 device: str) -> list[ClientUpdate]:
    """Trained-looking factors: A ~ N(0, 1/d_in) (peft's init scale), B ~ N(0, 0.01^2)."""
    g = torch.Generator().manual_seed(seed)
    updates = []
    for k, r in enumerate(ranks):
        factors = {}
        for name, (m, n) in shapes.items():
            A = torch.randn(r, n, generator=g) / n ** 0.5
            B = torch.randn(m, r, generator=g) * 0.01
            factors[name] = LoraFactors(A.to(device), B.to(device), ALPHA / r)
        n_k = int(torch.randint(100, 1000, (1,), generator=g))
        updates.append(ClientUpdate(f"edge-{k}", n_k, factors))
    return updates


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def timed(repeats: int, device: str, fn: Callable[[], object]) -> tuple[float, object]:
    """(median seconds, last result) over `repeats` calls."""
    times, out = [], None
    for _ in range(repeats):
        out = None
        gc.collect()
        sync(device)
        t0 = time.perf_counter()
        out = fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def dense_reference(updates: list[ClientUpdate], name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(dW, its singular values): materialise the weighted sum of products, full thin SVD."""
    total = sum(u.n_samples for u in updates)
    dW = None
    for u in updates:
        f = u.factors[name]
        term = (u.n_samples / total * f.scale) * (f.B @ f.A)
        dW = term if dW is None else dW + term
    _, S, _ = torch.linalg.svd(dW, full_matrices=False)
    return dW, S


def matrix_case(shape: tuple[int, int], ranks: list[int], dense_repeats: int, repeats: int,
                device: str) -> dict[str, object]:
    name = "w"
    updates = make_updates({name: shape}, ranks, seed=sum(shape) + len(ranks), device=device)
    R = sum(ranks)
    t_dense, (dW, S_dense) = timed(dense_repeats, device, lambda: dense_reference(updates, name))
    t_flex, flex = timed(repeats, device, lambda: FlexLoRA().aggregate(updates, None))
    t_flora, flora = timed(repeats, device, lambda: FLoRA().aggregate(updates, None))
    g = flex.factors[name]
    # Global factors are B = U sqrt(S), A = sqrt(S) Vh, so sigma_i = |B_i| |A_i|.
    S_fact = (g.B.double().norm(dim=0) * g.A.double().norm(dim=1))
    k = min(R, S_fact.numel())
    S_ref = S_dense[:k].double()
    sv_rel = float(((S_fact[:k] - S_ref).abs() / S_ref).max())
    stacked = stack_factors(participants(updates, name), balanced=True)
    S_true = factored_svd(stacked.B.double(), stacked.A.double())[1][:k]
    true_rel = float(((S_fact[:k] - S_true).abs() / S_true).max())
    dense_rel = float(((S_ref - S_true).abs() / S_true).max())
    f = flora.factors[name]
    flora_err = float((f.B @ f.A - dW).norm() / dW.norm())
    return {"shape": f"{shape[0]}x{shape[1]}", "servers": len(ranks), "R": R, "dense": t_dense,
            "flex": t_flex, "speedup": t_dense / t_flex, "sv_rel": sv_rel, "true_rel": true_rel,
            "dense_rel": dense_rel, "flora": t_flora,
            "flora_err": flora_err}


def llama_round(rule: str, updates: list[ClientUpdate], ranks: list[int], repeats: int,
                device: str) -> float:
    """Median seconds of aggregate + broadcast to every server, over all 224 modules."""
    agg = get_aggregator(rule)
    plans = [({name: r for name in updates[0].factors},
              {name: ALPHA / r for name in updates[0].factors}) for r in ranks]

    def one_round() -> None:
        new = agg.aggregate(updates, None)
        for server_ranks_, scales in plans:
            agg.broadcast(new, None, server_ranks_, scales)

    seconds, _ = timed(repeats, device, one_round)
    return seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true",
                    help="only 4096x4096 at total rank <= 400, a 4-layer 7B round")
    ap.add_argument("--round-only", action="store_true",
                    help="skip the per-matrix table (its dense SVDs take minutes each)")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--repeats", type=int, default=3, help="repeats of the factored side")
    ap.add_argument("--dense-repeats", type=int, default=1, help="repeats of the dense SVD")
    ap.add_argument("--threads", type=int, default=0,
                    help="torch CPU threads (0: torch's default); 1 is far faster than 2 when "
                         "other processes load the same cores")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    mixes = [(10, LADDER), (50, (4, 8)), (50, LADDER)]
    shapes = [(4096, 4096), (4096, 11008)]
    if args.quick:
        mixes, shapes = mixes[:2], shapes[:1]
    print(f"device {args.device}, torch {torch.__version__}, threads {torch.get_num_threads()}; "
          f"ranks cycle through the ladder shown, alpha {ALPHA:g}")
    head = (f"{'shape':>11} {'servers':>7} {'ranks':>9} {'R':>5} {'dense (s)':>9} "
            f"{'flexlora (s)':>12} {'speed-up':>8} {'sv rel':>8} {'fact/f64':>8} {'dense/f64':>9} "
            f"{'flora (s)':>9} "
            f"{'flora err':>9}")
    if args.round_only:
        shapes = []
    else:
        print(head)
        print("-" * len(head))
    for shape in shapes:
        for servers, ladder in mixes:
            row = matrix_case(shape, server_ranks(servers, ladder), args.dense_repeats,
                              args.repeats, args.device)
            print(f"{row['shape']:>11} {row['servers']:>7} {f'{min(ladder)}-{max(ladder)}':>9} "
                  f"{row['R']:>5} {row['dense']:>9.2f} {row['flex']:>12.3f} "
                  f"{row['speedup']:>7.0f}x {row['sv_rel']:>8.1e} {row['true_rel']:>8.1e} "
                  f"{row['dense_rel']:>9.1e} {row['flora']:>9.4f} "
                  f"{row['flora_err']:>9.1e}", flush=True)

    layers = 4 if args.quick else 32
    ranks = server_ranks(10, LADDER)
    shapes7b = {f"model.layers.{i}.{s}": shape for i in range(layers)
                for s, shape in LLAMA7B.items()}
    updates = make_updates(shapes7b, ranks, seed=7, device=args.device)
    print(f"\nLlama-2-7B-shaped round: {len(shapes7b)} matrices ({layers} layers), "
          f"{len(ranks)} servers, ranks {ranks} (R = {sum(ranks)}); aggregate + 10 broadcasts")
    for rule in ("flexlora", "flora", "fedit", "hetlora"):
        seconds = llama_round(rule, updates, ranks, args.repeats, args.device)
        print(f"  {rule:>8}: {seconds:7.2f} s per round", flush=True)


if __name__ == "__main__":
    main()
