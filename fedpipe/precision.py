"""How values travel in a wire payload: each precision's bytes per value and documented error.

Torch-free, so the planner can price a (density, precision) choice without importing torch; the
wire (`fedpipe.wire`) encodes exactly what is counted here, and a test holds the prediction against
real payloads (they add only the safetensors header).

| name | stored as | bytes per value (scales counted) | error bound per value |
|---|---|---|---|
| fp32 | float32 | 4 | exact |
| bf16 | bfloat16 | 2 | 2^-8 * abs(x) (round to nearest) |
| fp16 | float16 | 2 | 2^-11 * abs(x) + 2^-25 (subnormals); abs(x) > 65504 is refused |
| int8 | bitsandbytes blockwise 8-bit (dynamic code) | 1 + 4/64 = 1.0625 | 0.0071 * absmax of its block |
| nf4 | bitsandbytes blockwise 4-bit NormalFloat | 0.5 + 4/64 = 0.5625 | 0.152 * absmax of its block |
| fp4 | bitsandbytes blockwise 4-bit float | 0.5 + 4/64 = 0.5625 | 0.167 * absmax of its block |
| int2 | blockwise 2-bit, codes {±1/3, ±1} x absmax | 0.25 + 4/64 = 0.3125 | 0.33334 * absmax of its block |
| int3 | blockwise 3-bit, codes {±1/7, ±3/7, ±5/7, ±1} x absmax | 0.4375 | 0.14286 * absmax of its block |

Blockwise precisions cut the tensor's values (flat, row-major; under top-k the kept values in
ascending index order) into blocks of `BLOCK` = 64 (bitsandbytes' smallest 4-bit block) with one
float32 absmax per block; the bound is half the widest gap of the code book (0.00703, 0.1519,
1/6), measured as the worst error over 1.3M random values. 4-bit codes pack two per byte.

Why int2 has no zero and four even steps: a round's update of a factor is the sum of k AdamW
steps from a fresh optimizer, each about lr * sign(gradient) per entry (the first exactly so), so
its entries sit near the grid {-k, ..., k} x lr and a block's absmax near k x lr. At the usual
3 local steps that grid is {-3, -1, 1, 3} x lr: the four codes. Measured on SmolLM2-135M (3 AdamW
steps, 30 LoRA modules, rounds 1-3; benchmarks/bench_update_grid.py) int2 loses 5% of an update's
energy where top-k at 1/4 drops 43-58%, at 12.8x fewer bytes than fp32 against top-k's 14.6x
(nf4 values). It needs error feedback and deltas on both sides (fedit, hetlora: `fedpipe.client`);
benchmarks/bench_bytes.py has its quality.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

WirePrecision = Literal["fp32", "bf16", "fp16", "int8", "nf4", "fp4", "int2", "int3"]  # the plan's field type
BLOCK = 64
ABSMAX_BYTES = 4  # one float32 scale per block
UINT16_MAX_NUMEL = 65536  # sparse indices are uint16 up to this many entries, int32 beyond
BITMASK_BYTES_PER_VALUE = 1 / 8


@dataclass(frozen=True)
class Precision:
    """One way of storing values: `bits` per value, plus a float32 absmax per block if blockwise."""

    name: str
    bits: int
    blockwise: bool
    error: float  # relative to abs(x) (floating formats) or to the block's absmax (blockwise)


PRECISIONS: dict[str, Precision] = {p.name: p for p in (
    Precision("fp32", 32, False, 0.0),
    Precision("bf16", 16, False, 2.0**-8),
    Precision("fp16", 16, False, 2.0**-11),
    Precision("int8", 8, True, 0.0071),
    Precision("nf4", 4, True, 0.152),
    Precision("fp4", 4, True, 0.167),
    Precision("int2", 2, True, 0.33334),  # 1/3, rounded up past float32 rounding
    Precision("int3", 3, True, 0.14286),  # 1/7, likewise
)}


def get_precision(name: str) -> Precision:
    """The precision called `name`; ValueError naming the valid ones otherwise."""
    p = PRECISIONS.get(name)
    if p is None:
        raise ValueError(f"precision {name!r} is not a wire precision; valid: {', '.join(PRECISIONS)}")
    return p


def value_bytes(n: int, precision: str) -> int:
    """Exact bytes of `n` values stored at `precision`: codes (packed: 8 codes of b bits in b bytes)
    + scales."""
    p = get_precision(precision)
    codes = math.ceil(n * p.bits / 8)
    return codes + (ABSMAX_BYTES * math.ceil(n / BLOCK) if p.blockwise else 0)


def kept(density: float, numel: int) -> int:
    """Entries a top-k at `density` keeps: ceil(density * numel), tolerant to float rounding
    (0.1 * 30 is 3, not 4), at least 1 (0 for an empty tensor)."""
    if density >= 1.0:
        return numel
    return min(numel, max(1, math.ceil(density * numel * (1 - 1e-12))))


def mask_bytes(numel: int, k: int) -> int:
    """Bytes of the top-k mask: a bitmask or the flat indices, whichever is fewer (tie: bitmask)."""
    itemsize = 2 if numel <= UINT16_MAX_NUMEL else 4
    return min(math.ceil(numel / 8), k * itemsize)


def tensor_bytes(numel: int, density: float = 1.0, precision: str = "fp32") -> int:
    """Exact data bytes of one factor tensor in a payload (values + scales + mask, no header)."""
    if density >= 1.0 or numel == 0:
        return value_bytes(numel, precision)
    k = kept(density, numel)
    return value_bytes(k, precision) + mask_bytes(numel, k)


def bytes_per_value(density: float = 1.0, precision: str = "fp32") -> float:
    """The planner's v(d, p): wire bytes per adapter value, in the limit of large tensors.

    Dense: the precision's bytes per value (scales included). Below density 1: d times that for the
    kept values, plus min(1/8, 4 d) for the mask (a bitmask, or int32 indices where fewer: uint16
    indices on small tensors are ignored, so this is an upper bound up to ceil(d n) and the block
    rounding). Generalises `fedpipe.planning.cost.bytes_per_value(d)`, which is this at fp32.
    """
    p = get_precision(precision)
    per_value = p.bits / 8 + (ABSMAX_BYTES / BLOCK if p.blockwise else 0.0)
    if density >= 1.0:
        return per_value
    return per_value * density + min(BITMASK_BYTES_PER_VALUE, 4 * density)
