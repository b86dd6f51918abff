"""Serialised bytes, error and encode/decode time of SmolLM2-135M-shaped LoRA adapters, by density
and precision.

Run: ``PYTHONPATH=. python benchmarks/bench_wire.py [--precision nf4 ...] [--repeats N]``.
Bytes are len(payload) of real payloads; "pred" is `fedpipe.precision.tensor_bytes` summed over the
factors (values, scales and mask), so "payload / pred" shows the header's overhead ("header": the
safetensors header, its layout included).
Lossy payloads are deltas against the round's starting factors (the reference), as a server's upload
would be; "error" is ||received - meant|| / ||meant|| over the whole update (meant = trained - start).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from fedpipe.lora import LoraFactors
from fedpipe.precision import PRECISIONS, tensor_bytes
from fedpipe.wire import decode, encode, payload_bytes

# SmolLM2-135M: hidden 576, intermediate 1536, 9 heads / 3 KV heads (head dim 64), 30 layers.
LAYERS = 30
SHAPES = {  # (d_out, d_in)
    "self_attn.q_proj": (576, 576), "self_attn.k_proj": (192, 576),
    "self_attn.v_proj": (192, 576), "self_attn.o_proj": (576, 576),
    "mlp.gate_proj": (1536, 576), "mlp.up_proj": (1536, 576), "mlp.down_proj": (576, 1536),
}


def adapters(rank: int, seed: int = 0) -> tuple[dict[str, LoraFactors], dict[str, LoraFactors]]:
    """(reference = round start, trained = reference + a small update) for every module."""
    g = torch.Generator().manual_seed(seed)
    ref, new = {}, {}
    for layer in range(LAYERS):
        for suffix, (d_out, d_in) in SHAPES.items():
            name = f"model.layers.{layer}.{suffix}"
            A = torch.randn(rank, d_in, generator=g) / d_in ** 0.5
            B = torch.randn(d_out, rank, generator=g) * 0.01
            ref[name] = LoraFactors(A, B, 2.0)
            new[name] = LoraFactors(A + 1e-3 * torch.randn(A.shape, generator=g),
                                    B + 1e-3 * torch.randn(B.shape, generator=g), 2.0)
    return ref, new


def timed(repeats: int, fn, *args, **kwargs) -> tuple[float, object]:
    """(median seconds, result) of fn(*args, **kwargs) over `repeats` calls."""
    times, out = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn(*args, **kwargs)
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def update_error(got: dict[str, LoraFactors], new: dict[str, LoraFactors],
                 ref: dict[str, LoraFactors]) -> float:
    """||received - meant|| / ||meant|| over every factor, meant = new - ref."""
    err = total = 0.0
    for name in new:
        for part in ("A", "B"):
            g, n, r = (getattr(x[name], part).double() for x in (got, new, ref))
            err += float((g - n).square().sum())
            total += float((n - r).square().sum())
    return (err / total) ** 0.5


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--precision", choices=PRECISIONS, nargs="+", default=list(PRECISIONS))
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    torch.manual_seed(0)
    print(f"SmolLM2-135M adapters: {LAYERS} layers x {len(SHAPES)} matrices, "
          f"torch threads {torch.get_num_threads()}, median of {args.repeats}")
    print(f"{'rank':>4} {'prec':>5} {'density':>7} {'bytes':>11} {'vs fp32':>7} {'pred':>11} "
          f"{'header':>7} {'payload/pred':>12} {'error':>8} {'encode ms':>9} "
          f"{'decode ms':>9}")
    for rank in (8, 16):
        ref, new = adapters(rank)
        dense = payload_bytes(encode(new))
        for precision in args.precision:
            for label, density in (("1", 1.0), ("1/4", 0.25), ("1/16", 1 / 16)):
                t_enc, payload = timed(args.repeats, encode, new, density=density,
                                       precision=precision, reference=ref)
                t_dec, (got, _) = timed(args.repeats, decode, payload, reference=ref)
                n = payload_bytes(payload)
                pred = sum(tensor_bytes(t.numel(), density, precision)
                           for f in new.values() for t in (f.A, f.B))
                header = 8 + int.from_bytes(payload[:8], "little")
                print(f"{rank:>4} {precision:>5} {label:>7} {n:>11,} {n / dense:>7.3f} {pred:>11,} "
                      f"{header:>7,} {n / pred:>12.3f} {update_error(got, new, ref):>8.4f} "
                      f"{1e3 * t_enc:>9.1f} {1e3 * t_dec:>9.1f}")


if __name__ == "__main__":
    main()
