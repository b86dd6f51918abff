"""Blockwise quantization of a flat float32 vector for the wire, by bitsandbytes' own routines.

bitsandbytes' ``quantize_blockwise`` (8-bit dynamic code) and ``quantize_4bit`` (NF4 / FP4) run
on CPU tensors (checked with bitsandbytes 0.50), so the wire uses them rather than a copy of their
code books; a payload stores the codes (uint8; 4-bit packed two per byte, the first value in the
high nibble, bitsandbytes' layout) and one float32 absmax per block of `precision.BLOCK` values.
Decoding goes through bitsandbytes too, so sender and receiver agree on every value bit for bit.
bitsandbytes is imported on first use (it takes seconds), never for float precisions.

int2 and int3 (evenly spaced codes, `uniform_code`) are what bitsandbytes has no routine for (its
blockwise kernel assumes a 256-entry code book: a 4-entry one returns out-of-range codes), so they
are the few torch lines below, in the same spirit: every 8 codes packed into `bits` bytes, the
first value in the high bits (int2: four codes per byte).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from fedpipe.precision import BLOCK, get_precision

UNIFORM = ("int2", "int3")  # precisions with evenly spaced codes (`uniform_code`)


def quantize(vectors: Sequence[torch.Tensor], precision: str) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(codes, absmax) of each 1-D float32 vector at a blockwise `precision` (int8, nf4, fp4).

    One quantizer call for all of them (a call costs milliseconds of overhead; a payload has
    hundreds of tensors): each vector is zero-padded to whole blocks, so no block straddles two
    vectors and each gets exactly the codes and scales it would get alone.
    """
    bits = get_precision(precision).bits
    sizes = [v.numel() for v in vectors]
    flat = torch.zeros(sum(_padded(n) for n in sizes), dtype=torch.float32)
    offset = 0
    for v, n in zip(vectors, sizes, strict=True):
        flat[offset:offset + n] = v.detach().reshape(-1).to("cpu", torch.float32)
        offset += _padded(n)
    if offset == 0:
        codes, absmax = torch.zeros(0, dtype=torch.uint8), torch.zeros(0, dtype=torch.float32)
    elif precision in UNIFORM:
        codes, absmax = _quantize_uniform(flat, bits)
    elif precision == "int8":
        codes, state = _functional().quantize_blockwise(flat, blocksize=BLOCK)
        absmax = state.absmax
    else:
        codes, state = _functional().quantize_4bit(flat, blocksize=BLOCK, quant_type=precision)
        absmax = state.absmax
    codes, absmax = codes.reshape(-1), absmax.to(torch.float32)
    out, offset = [], 0
    for n in sizes:
        c, b = offset * bits // 8, offset // BLOCK
        out.append((codes[c:c + math.ceil(n * bits / 8)].clone(), absmax[b:b + math.ceil(n / BLOCK)].clone()))
        offset += _padded(n)
    return out


def dequantize(items: Sequence[tuple[torch.Tensor, torch.Tensor, int]], precision: str
               ) -> list[torch.Tensor]:
    """The float32 values of each (codes, absmax, n), in one dequantizer call; every item is
    `check`ed first (ValueError naming its position if it does not fit)."""
    bits = get_precision(precision).bits
    for i, (codes, absmax, n) in enumerate(items):
        try:
            check(codes, absmax, n, precision)
        except ValueError as e:
            raise ValueError(f"item {i}: {e}") from None
    total = sum(_padded(n) for _, _, n in items)
    if total == 0:
        return [torch.zeros(0, dtype=torch.float32) for _ in items]
    codes = torch.zeros(total * bits // 8, dtype=torch.uint8)
    offset = 0
    for c, _, n in items:
        codes[offset * bits // 8:offset * bits // 8 + c.numel()] = c
        offset += _padded(n)
    absmax = torch.cat([a for _, a, _ in items])
    if precision in UNIFORM:
        flat = _dequantize_uniform(codes, absmax, bits)
    elif precision == "int8":
        F = _functional()
        flat = F.dequantize_blockwise(codes, absmax=absmax, blocksize=BLOCK)
    else:
        F = _functional()
        state = F.QuantState(absmax=absmax, shape=torch.Size([total]), blocksize=BLOCK,
                             quant_type=precision, code=F.get_4bit_type(precision, device="cpu"),
                             dtype=torch.float32)
        flat = F.dequantize_4bit(codes.reshape(-1, 1), state).reshape(-1)
    out, offset = [], 0
    for _, _, n in items:
        out.append(flat[offset:offset + n].to(torch.float32))
        offset += _padded(n)
    return out


def check(codes: torch.Tensor, absmax: torch.Tensor, n: int, precision: str) -> None:
    """What a decoder can verify: code and scale counts and dtypes, finite non-negative scales."""
    p = get_precision(precision)
    if not p.blockwise:
        raise ValueError(f"precision {precision!r} is not blockwise")
    n_codes, n_blocks = math.ceil(n * p.bits / 8), math.ceil(n / BLOCK)
    if codes.dtype != torch.uint8 or codes.dim() != 1 or codes.numel() != n_codes:
        raise ValueError(f"{precision} codes: expected {n_codes} uint8 bytes for {n} values, got "
                         f"{codes.numel()} {codes.dtype} of shape {tuple(codes.shape)}")
    if absmax.dtype != torch.float32 or absmax.dim() != 1 or absmax.numel() != n_blocks:
        raise ValueError(f"{precision} scales: expected {n_blocks} float32 block absmax values for "
                         f"{n} values, got {absmax.numel()} {absmax.dtype}")
    if not bool(torch.isfinite(absmax).all()) or bool((absmax < 0).any()):
        raise ValueError(f"{precision} scales: block absmax values must be finite and >= 0")


def uniform_code(bits: int) -> torch.Tensor:
    """The 2^bits codes of an intN precision, x absmax: evenly spaced over [-1, 1], no zero
    (int2: -1, -1/3, 1/3, 1); code i is the i-th smallest."""
    top = 2**bits - 1
    return torch.tensor([(2 * i - top) / top for i in range(top + 1)], dtype=torch.float32)


def _quantize_uniform(flat: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(packed codes, absmax per block) of whole blocks: each value to its nearest code (a tie
    halfway between two goes to the smaller)."""
    blocks = flat.reshape(-1, BLOCK)
    absmax = blocks.abs().amax(dim=1)
    scaled = blocks / absmax.clamp_min(torch.finfo(torch.float32).tiny).unsqueeze(1)
    top = 2**bits - 1
    codes = torch.ceil((scaled + 1) * (top / 2) - 0.5).clamp(0, top).to(torch.int32)
    return _pack(codes.reshape(-1), bits), absmax


def _dequantize_uniform(codes: torch.Tensor, absmax: torch.Tensor, bits: int) -> torch.Tensor:
    """The float32 values of whole blocks of packed intN codes."""
    unpacked = _unpack(codes, bits).reshape(-1, BLOCK)
    return (uniform_code(bits)[unpacked.long()] * absmax.unsqueeze(1)).reshape(-1)


def _pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Every 8 codes of `bits` bits as `bits` bytes, the first code in the high bits."""
    groups = codes.reshape(-1, 8).to(torch.int32)
    word = sum(groups[:, j] << (bits * (7 - j)) for j in range(8))
    packed = torch.stack([(word >> (8 * (bits - 1 - k))) & 255 for k in range(bits)], dim=1)
    return packed.to(torch.uint8).reshape(-1)


def _unpack(packed: torch.Tensor, bits: int) -> torch.Tensor:
    groups = packed.reshape(-1, bits).to(torch.int32)
    word = sum(groups[:, k] << (8 * (bits - 1 - k)) for k in range(bits))
    return torch.stack([(word >> (bits * (7 - j))) & (2**bits - 1) for j in range(8)], dim=1).reshape(-1)


def _padded(n: int) -> int:
    return -(-n // BLOCK) * BLOCK


def _functional():
    import bitsandbytes.functional as F

    return F
