"""Blockwise quantization of a flat float32 vector for the wire, by bitsandbytes' own routines.

bitsandbytes' ``quantize_blockwise`` (8-bit dynamic code) and ``quantize_4bit`` (NF4 / FP4) run
on CPU tensors (checked with bitsandbytes 0.50), so the wire uses them rather than a copy of their
code books; a payload stores the codes (uint8; 4-bit packed two per byte, the first value in the
high nibble, bitsandbytes' layout) and one float32 absmax per block of `precision.BLOCK` values.
Decoding goes through bitsandbytes too, so sender and receiver agree on every value bit for bit.
bitsandbytes is imported on first use (it takes seconds), never for float precisions.
"""

from __future__ import annotations

import math

import torch

from fedpipe.precision import BLOCK, get_precision


def quantize(values: torch.Tensor, precision: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes, absmax) of a 1-D float32 CPU vector at a blockwise `precision` (int8, nf4, fp4)."""
    if values.numel() == 0:
        return torch.zeros(0, dtype=torch.uint8), torch.zeros(0, dtype=torch.float32)
    F = _functional()
    x = values.detach().to("cpu", torch.float32).contiguous()
    if precision == "int8":
        codes, state = F.quantize_blockwise(x, blocksize=BLOCK)
    else:
        codes, state = F.quantize_4bit(x, blocksize=BLOCK, quant_type=precision)
    return codes.reshape(-1).contiguous(), state.absmax.to(torch.float32).contiguous()


def dequantize(codes: torch.Tensor, absmax: torch.Tensor, n: int, precision: str) -> torch.Tensor:
    """The `n` float32 values that `codes` and `absmax` stand for; ValueError if they cannot."""
    check(codes, absmax, n, precision)
    if n == 0:
        return torch.zeros(0, dtype=torch.float32)
    F = _functional()
    if precision == "int8":
        return F.dequantize_blockwise(codes, absmax=absmax, blocksize=BLOCK).to(torch.float32)
    state = F.QuantState(absmax=absmax, shape=torch.Size([n]), blocksize=BLOCK, quant_type=precision,
                         code=F.get_4bit_type(precision, device="cpu"), dtype=torch.float32)
    return F.dequantize_4bit(codes.reshape(-1, 1), state).reshape(-1)


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


def _functional():
    import bitsandbytes.functional as F

    return F
