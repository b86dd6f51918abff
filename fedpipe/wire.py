"""What goes over the wire: LoRA factors as one self-describing safetensors payload.

Bytes on the wire are *counted* on the serialised payload (``len(payload)``), never estimated, so
the planner's prediction ``dense_bytes`` can be held against what was really sent.

Sparse mode (FLASC-style top-k) applies separately to every A and B tensor: keep the
``k = ceil(density * numel)`` entries of largest ``|value - reference|`` (the update since the
reference the receiver already holds, e.g. the round's starting factors; no reference = zeros).
The receiver rebuilds ``reference + sparse delta``: entries outside the mask stay at the reference.
Both sides must use the same reference tensors.

Precision (`fedpipe.precision`: fp32, bf16, fp16, int8, nf4, fp4; each one's bytes and error bound
are documented there) applies to the values that travel, the kept ones under top-k. Every lossy
payload (density < 1 or a precision other than fp32) sends the change against the reference when
one is given, dense ones too: rounding then scales with the update, not with the factors. A dense
fp32 payload is absolute and exact.

Payload layout (safetensors; no pickle anywhere), per module ``NAME`` and factor ``X`` in {A, B}:

* ``dense``:   ``NAME.X``         the full tensor (absolute, or a delta if ``ref``);
* ``bitmask``: ``NAME.X.values``  k values, row-major order of the kept entries;
               ``NAME.X.mask``    uint8, ``ceil(numel / 8)`` bytes, bit i of the flat tensor is
                                  ``(mask[i // 8] >> (i % 8)) & 1``;
* ``indices``: ``NAME.X.values``  as above;
               ``NAME.X.idx``     ascending flat indices, uint16 when numel <= 65536, else int32.

Values are float32/bfloat16/float16 tensors (a dense one in the factor's 2-D shape), or, at a
blockwise precision, flat uint8 codes with ``NAME.X.absmax`` (float32, one per block of 64 values,
`fedpipe.blockwise`). Per tensor the mask uses the bitmask or the indices, whichever is fewer
bytes (a tie goes to the bitmask). The safetensors metadata holds the caller's string pairs plus
``fedpipe.format``, ``fedpipe.density``, ``fedpipe.precision``, ``fedpipe.relative`` ("true" when
some tensor is a delta, so the receiver needs the reference) and ``fedpipe.layout``: JSON
``{NAME: {"scale", "rank", "A": {"shape", "enc", "k", "ref", "prec"}, "B": {...}}}``. `decode`
checks every count, dtype and shape against the layout and raises FedpipeError naming the tensor.

Error feedback: pass ``residual`` (a dict keyed ``NAME.A`` / ``NAME.B``, updated in place) and what
the receiver did not get this time (entries cut by top-k, and rounding to the precision) is added
to the next update before its top-k, so nothing is lost for good, only delayed. When a residual
still means something a round later is the sender's policy: `fedpipe.feedback.ErrorFeedback`.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load as _st_load
from safetensors.torch import save as _st_save

from fedpipe import blockwise
from fedpipe.errors import FedpipeError
from fedpipe.lora import LoraFactors
from fedpipe.precision import UINT16_MAX_NUMEL, get_precision, kept, mask_bytes

FORMAT = "fedpipe-wire/1"
_RESERVED = "fedpipe."
_LAYOUT_KEY = "fedpipe.layout"
_FLOAT_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def encode(
    factors: dict[str, LoraFactors],
    *,
    density: float = 1.0,
    precision: str = "fp32",
    reference: dict[str, LoraFactors] | None = None,
    metadata: dict[str, str] | None = None,
    residual: dict[str, torch.Tensor] | None = None,
) -> bytes:
    """Serialise `factors` into one payload; density 1.0 is dense, below 1 is top-k of the update;
    values at `precision` (`fedpipe.precision`: fp32, bf16, fp16, int8, nf4, fp4).

    `reference` is what the receiver already holds: a lossy payload (density < 1 or a precision
    other than fp32) sends the change against it; `residual`, when given, turns on error feedback
    and is updated in place (see the module docstring).
    """
    density = _check_density(density)
    _check_precision(precision)
    user_meta = _check_metadata(metadata)
    lossy = density < 1.0 or precision != "fp32"
    layout: dict[str, dict] = {}
    picks: list[_Pick] = []
    for name, f in factors.items():
        _check_factors(name, f)
        layout[name] = {"scale": float(f.scale), "rank": int(f.rank)}
        for part in ("A", "B"):
            x = getattr(f, part).detach().to("cpu", torch.float32)
            ref = _reference_tensor(reference, name, part, x.shape) if lossy else None
            picks.append(_pick(name, part, x, ref, density, residual))
    # All values at once: blockwise quantization is one bitsandbytes call per payload.
    stored = _store([p.values for p in picks], precision, [p.key for p in picks])
    tensors: dict[str, torch.Tensor] = {}
    for p, (st, received) in zip(picks, stored, strict=True):
        if residual is not None:
            residual[p.key] = p.meant - _scatter(p.idx, received, p.meant.shape)
        layout[p.name][p.part] = _write(tensors, p, st, precision)
    meta = dict(user_meta)
    meta.update({
        "fedpipe.format": FORMAT,
        "fedpipe.density": repr(density),
        "fedpipe.precision": precision,
        "fedpipe.relative": json.dumps(any(e[p]["ref"] for e in layout.values() for p in "AB")),
        _LAYOUT_KEY: json.dumps(layout, separators=(",", ":")),
    })
    return _st_save(tensors, metadata=meta)


def decode(
    payload: bytes, *, reference: dict[str, LoraFactors] | None = None
) -> tuple[dict[str, LoraFactors], dict[str, str]]:
    """Rebuild float32 factors from `payload`; metadata is the caller's pairs plus format, density,
    precision and relative (the per-tensor layout is consumed here). Deltas need the sender's
    reference.
    """
    try:
        tensors = _st_load(bytes(payload))
        meta = _read_metadata(payload)
        if meta.get("fedpipe.format") != FORMAT:
            raise ValueError(f"format {meta.get('fedpipe.format')!r}, expected {FORMAT!r}")
        layout = json.loads(meta.pop(_LAYOUT_KEY))
        if not isinstance(layout, dict):
            raise ValueError("layout is not a JSON object")
    except (SafetensorError, ValueError, KeyError, TypeError) as e:
        raise FedpipeError(f"payload: not a valid fedpipe wire payload ({e})") from e
    quantized = _dequantize_all(tensors, layout)
    factors: dict[str, LoraFactors] = {}
    for name, entry in layout.items():
        try:
            parts = {
                part: _decode_tensor(tensors, f"{name}.{part}", entry[part], reference, name, part,
                                     quantized)
                for part in ("A", "B")
            }
            factors[name] = LoraFactors(parts["A"], parts["B"], float(entry["scale"]))
        except (KeyError, TypeError, ValueError, RuntimeError, IndexError) as e:
            raise FedpipeError(f"payload: module {name!r} is corrupt ({e})") from e
    return factors, meta


def payload_bytes(payload: bytes) -> int:
    """Bytes on the wire: the length of the serialised payload, header included."""
    return len(payload)


def read_metadata(payload: bytes) -> dict[str, str]:
    """A payload's metadata without decoding its tensors (the receiver picks a reference from it)."""
    try:
        return _read_metadata(payload)
    except (ValueError, AttributeError) as e:
        raise FedpipeError(f"payload: not a valid fedpipe wire payload ({e})") from e


def dense_bytes(
    ranks: dict[str, int], shapes: dict[str, tuple[int, int]], bytes_per_value: int = 4
) -> int:
    """The planner-side prediction P(r) * bytes per value: sum of r * (d_out + d_in) * bpv.

    A dense payload is this plus the safetensors header (tensor table and metadata).
    """
    missing = sorted(set(ranks) - set(shapes))
    if missing:
        raise FedpipeError("dense_bytes: modules without a shape",
                           [f"module {m!r}" for m in missing])
    return sum(r * (shapes[n][0] + shapes[n][1]) * bytes_per_value for n, r in ranks.items())


def topk_with_residual(
    update: torch.Tensor,
    residual: torch.Tensor | None,
    density: float,
    *,
    precision: str = "fp32",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Error-feedback top-k: sparsify ``update + residual`` and keep what was not sent.

    Returns ``(sent, new_residual)`` with ``sent + new_residual == update + residual``: `sent`
    holds the k = ceil(density * numel) largest-magnitude entries as the receiver decodes them at
    `precision` (zeros elsewhere), `new_residual` the cut entries and the rounding error.
    Pure: the inputs are not modified.
    """
    _check_precision(precision)
    acc = _accumulate(update, residual)
    idx = _topk_indices(acc, kept(_check_density(density), acc.numel()))
    [(_, received)] = _store([acc.reshape(-1).index_select(0, idx)], precision, ["update"])
    sent = _scatter(idx, received, acc.shape)
    return sent, acc - sent


# --- encoding ------------------------------------------------------------------------------------


@dataclass
class _Pick:
    """One factor tensor on its way out: what is meant, and which entries of it travel."""

    name: str
    part: str
    meant: torch.Tensor  # x less the reference (if any) plus the carried residual
    idx: torch.Tensor  # ascending flat indices of the entries sent (all when dense)
    values: torch.Tensor  # meant at idx
    dense: bool
    relative: bool

    @property
    def key(self) -> str:
        return f"{self.name}.{self.part}"


def _pick(name: str, part: str, x: torch.Tensor, ref: torch.Tensor | None, density: float,
          residual: dict[str, torch.Tensor] | None) -> _Pick:
    meant = x - ref if ref is not None else x
    if residual is not None:
        meant = _accumulate(meant, residual.get(f"{name}.{part}"))
    numel = meant.numel()
    dense = density >= 1.0 or numel == 0
    idx = torch.arange(numel) if dense else _topk_indices(meant, kept(density, numel))
    values = meant.reshape(-1) if dense else meant.reshape(-1).index_select(0, idx)
    return _Pick(name, part, meant, idx, values, dense, ref is not None)


def _write(out: dict[str, torch.Tensor], p: _Pick, stored: dict[str, torch.Tensor],
           precision: str) -> dict:
    """Put one tensor's stored values (and scales, mask) into `out`; return its layout entry."""
    shape, numel = list(p.meant.shape), p.meant.numel()
    spec = {"shape": shape, "enc": "dense", "k": p.idx.numel(), "ref": p.relative, "prec": precision}
    values = stored["values"]
    if p.dense and not get_precision(precision).blockwise:
        values = values.reshape(p.meant.shape)  # a dense float tensor keeps its 2-D shape
    out[p.key if p.dense else f"{p.key}.values"] = values.contiguous()
    if "absmax" in stored:
        out[f"{p.key}.absmax"] = stored["absmax"]
    if p.dense:
        return spec
    if mask_bytes(numel, p.idx.numel()) == math.ceil(numel / 8):
        out[f"{p.key}.mask"] = _pack_bits(p.idx, numel)
        spec["enc"] = "bitmask"
    else:
        idx_dtype = torch.uint16 if numel <= UINT16_MAX_NUMEL else torch.int32
        out[f"{p.key}.idx"] = p.idx.to(torch.int32).to(idx_dtype).contiguous()
        spec["enc"] = "indices"
    return spec


def _store(vectors: list[torch.Tensor], precision: str, keys: list[str]
           ) -> list[tuple[dict[str, torch.Tensor], torch.Tensor]]:
    """For each flat vector: ({"values": stored[, "absmax": scales]}, what the receiver decodes)."""
    if precision == "fp32":
        return [({"values": v}, v) for v in vectors]
    if get_precision(precision).blockwise:
        for v, key in zip(vectors, keys, strict=True):
            if not bool(torch.isfinite(v).all()):
                raise FedpipeError(f"{key}: non-finite values cannot be sent at {precision}")
        quantized = blockwise.quantize(vectors, precision)
        received = blockwise.dequantize(
            [(c, a, v.numel()) for (c, a), v in zip(quantized, vectors, strict=True)], precision)
        return [({"values": c, "absmax": a}, r)
                for (c, a), r in zip(quantized, received, strict=True)]
    out = []
    for v, key in zip(vectors, keys, strict=True):
        stored = v.to(_FLOAT_DTYPES[precision])
        received = stored.to(torch.float32)
        if bool(torch.isfinite(v).all()) and not bool(torch.isfinite(received).all()):
            raise FedpipeError(f"{key}: values exceed the range of {precision} (largest magnitude "
                               f"{v.abs().max().item():.4g}); send them at bf16 or fp32")
        out.append(({"values": stored}, received))
    return out


def _accumulate(update: torch.Tensor, residual: torch.Tensor | None) -> torch.Tensor:
    """update + residual in float32, the residual's shape checked."""
    acc = update.detach().to(torch.float32)
    if residual is None:
        return acc
    if residual.shape != acc.shape:
        raise FedpipeError(
            f"residual: shape {tuple(residual.shape)} does not match the update's "
            f"{tuple(acc.shape)}; clear the residual when ranks change")
    return acc + residual.detach().to(acc.device, torch.float32)


def _scatter(idx: torch.Tensor, values: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    flat = torch.zeros(math.prod(shape), dtype=torch.float32)
    flat.index_copy_(0, idx, values)
    return flat.reshape(shape)


def _topk_indices(t: torch.Tensor, k: int) -> torch.Tensor:
    """Ascending flat indices of the k largest-magnitude entries of a float32 tensor.

    numpy's argpartition + sort: about 3x faster than torch.topk + sort on these small tensors.
    """
    n = t.numel()
    if k >= n:
        return torch.arange(n, device=t.device)
    mags = np.abs(t.detach().reshape(-1).cpu().numpy())
    return torch.from_numpy(np.sort(np.argpartition(mags, n - k)[n - k:])).to(t.device)


def _pack_bits(idx: torch.Tensor, numel: int) -> torch.Tensor:
    """Little-endian packed bitmask: bit i of the flat tensor is byte i // 8, bit i % 8.

    numpy's packbits: single-threaded and ~50x faster than the torch equivalent here.
    """
    bits = np.zeros(numel, dtype=np.uint8)
    bits[idx.cpu().numpy()] = 1
    return torch.from_numpy(np.packbits(bits, bitorder="little"))


def _unpack_bits(mask: torch.Tensor, numel: int) -> torch.Tensor:
    bits = np.unpackbits(mask.numpy(), bitorder="little")
    if bits[numel:].any():
        raise ValueError("bitmask has bits set past the end of the tensor")
    return torch.from_numpy(np.flatnonzero(bits[:numel]))


# --- decoding ------------------------------------------------------------------------------------


def _decode_tensor(
    tensors: dict[str, torch.Tensor],
    key: str,
    spec: dict,
    reference: dict[str, LoraFactors] | None,
    name: str,
    part: str,
    quantized: dict[str, torch.Tensor],
) -> torch.Tensor:
    shape = tuple(int(s) for s in spec["shape"])
    if len(shape) != 2 or min(shape) < 0:
        raise ValueError(f"{key}: bad shape {shape}")
    numel, k, enc = math.prod(shape), int(spec["k"]), spec["enc"]
    if enc == "dense":
        idx = None
        if k != numel:
            raise ValueError(f"{key}: dense with k = {k} of {numel} entries")
    elif enc == "bitmask":
        mask = tensors[f"{key}.mask"]
        if mask.dtype != torch.uint8 or mask.numel() != math.ceil(numel / 8):
            raise ValueError(f"{key}: bitmask is not {math.ceil(numel / 8)} uint8 bytes")
        idx = _unpack_bits(mask, numel)
    elif enc == "indices":
        idx = tensors[f"{key}.idx"].to(torch.int64)
        if idx.numel() and (idx.min() < 0 or idx.max() >= numel or (idx.diff() <= 0).any()):
            raise ValueError(f"{key}: indices out of range or not ascending")
    else:
        raise ValueError(f"{key}: unknown encoding {enc!r}")
    if idx is not None and idx.numel() != k:
        raise ValueError(f"{key}: {idx.numel()} mask entries, the layout says k = {k}")
    values = quantized[key] if key in quantized else _decode_values(
        tensors, key if idx is None else f"{key}.values", k, spec.get("prec"),
        shape if idx is None else None)
    if spec["ref"]:
        if reference is None or name not in reference:
            raise FedpipeError(
                f"decode: module {name!r} was sent as a delta against a reference; "
                "pass the same reference the sender used")
        base = getattr(reference[name], part).detach().to("cpu", torch.float32)
        if tuple(base.shape) != shape:
            raise FedpipeError(
                f"decode: reference {name}.{part} has shape {tuple(base.shape)}, "
                f"the payload was encoded against shape {shape}")
        flat = base.reshape(-1).clone()
    elif idx is None:
        return values.reshape(shape)
    else:
        flat = torch.zeros(numel, dtype=torch.float32)
    if idx is None:
        flat += values
    else:
        flat.index_add_(0, idx, values)
    return flat.reshape(shape)


def _dequantize_all(tensors: dict[str, torch.Tensor], layout: dict) -> dict[str, torch.Tensor]:
    """{NAME.X: its k float32 values} of every blockwise tensor, one bitsandbytes call per
    precision; each tensor's codes and scales are checked first, naming the module if corrupt."""
    groups: dict[str, list[tuple[str, tuple[torch.Tensor, torch.Tensor, int]]]] = {}
    for name, entry in layout.items():
        key = name
        try:
            for part in ("A", "B"):
                key, spec = f"{name}.{part}", entry[part]
                precision = spec.get("prec")
                if precision is None or not get_precision(precision).blockwise:
                    continue
                item = (tensors[key if spec["enc"] == "dense" else f"{key}.values"],
                        tensors[f"{key}.absmax"], int(spec["k"]))
                blockwise.check(*item, precision)
                groups.setdefault(precision, []).append((key, item))
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise FedpipeError(f"payload: module {name!r} is corrupt ({key}: {e})") from e
    out: dict[str, torch.Tensor] = {}
    for precision, group in groups.items():
        values = blockwise.dequantize([item for _, item in group], precision)
        out.update(zip((key for key, _ in group), values, strict=True))
    return out


def _decode_values(tensors: dict[str, torch.Tensor], value_key: str, k: int,
                   precision: str | None, dense_shape: tuple[int, ...] | None) -> torch.Tensor:
    """The k float32 values of a float tensor stored under `value_key`, checked against the layout.

    `precision` None: a payload from before precisions were recorded (float values of any width).
    A dense tensor keeps the factor's 2-D shape.
    """
    stored = tensors[value_key]
    if precision is not None:
        get_precision(precision)  # an unknown name is a corrupt layout
    allowed = tuple(_FLOAT_DTYPES.values()) if precision is None else (_FLOAT_DTYPES[precision],)
    if stored.dtype not in allowed:
        raise ValueError(f"{value_key}: values are {stored.dtype}, the layout says {precision}")
    want = dense_shape if dense_shape is not None else (k,)
    if tuple(stored.shape) != want:
        raise ValueError(f"{value_key}: tensor shape {tuple(stored.shape)} != layout shape {want}")
    return stored.to(torch.float32).reshape(-1)


def _read_metadata(payload: bytes) -> dict[str, str]:
    """The safetensors ``__metadata__`` block (safetensors.torch.load does not return it)."""
    n = int.from_bytes(payload[:8], "little")
    header = json.loads(bytes(payload[8:8 + n]))
    meta = header.get("__metadata__")
    if not isinstance(meta, dict):
        raise ValueError("no metadata block")
    return dict(meta)


# --- validation ----------------------------------------------------------------------------------


def _check_density(density: float) -> float:
    d = float(density)
    if not (0.0 < d <= 1.0):
        raise FedpipeError(f"density: {density!r} is out of range; valid is 0 < density <= 1")
    return d


def _check_precision(precision: str) -> None:
    try:
        get_precision(precision)
    except ValueError as e:
        raise FedpipeError(f"precision: {e}") from None


def _check_metadata(metadata: dict[str, str] | None) -> dict[str, str]:
    metadata = metadata or {}
    problems = [
        f"key {k!r}: keys and values must be strings" for k, v in metadata.items()
        if not isinstance(k, str) or not isinstance(v, str)
    ] + [f"key {k!r}: the prefix {_RESERVED!r} is reserved" for k in metadata
         if isinstance(k, str) and k.startswith(_RESERVED)]
    if problems:
        raise FedpipeError("metadata: invalid entries", problems)
    return metadata


def _check_factors(name: str, f: LoraFactors) -> None:
    if f.A.dim() != 2 or f.B.dim() != 2 or f.A.shape[0] != f.B.shape[1]:
        raise FedpipeError(
            f"factors: module {name!r} has A {tuple(f.A.shape)} and B {tuple(f.B.shape)}; "
            "valid is A (r, d_in) and B (d_out, r)")


def _reference_tensor(
    reference: dict[str, LoraFactors] | None, name: str, part: str, shape: torch.Size
) -> torch.Tensor | None:
    if reference is None or name not in reference:
        return None
    ref = getattr(reference[name], part).detach().to("cpu", torch.float32)
    if ref.shape != shape:
        raise FedpipeError(
            f"reference: module {name!r} {part} has shape {tuple(ref.shape)}, "
            f"the factors have {tuple(shape)}")
    return ref


def _residual_for(residual: dict[str, torch.Tensor], key: str, x: torch.Tensor) -> torch.Tensor:
    return residual.get(key, torch.zeros_like(x))
