"""Wire format: exact round trips, top-k semantics, mask encoding choice, bytes as measured."""

from __future__ import annotations

import json
import math
import pickle
import re

import numpy as np
import pytest
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from fedpipe.errors import FedpipeError
from fedpipe.lora import LoraFactors
from fedpipe.wire import (
    decode,
    dense_bytes,
    encode,
    payload_bytes,
    topk_with_residual,
)


def _header(payload: bytes) -> dict:
    n = int.from_bytes(payload[:8], "little")
    return json.loads(payload[8:8 + n])


def _data(payload: bytes) -> bytes:
    """The payload's data: every factor's bytes, after the header."""
    return payload[8 + int.from_bytes(payload[:8], "little"):]


def _layout(payload: bytes) -> dict:
    return json.loads(_header(payload)["__metadata__"]["fedpipe.layout"])


def _reserialise(payload: bytes, change) -> bytes:
    """`payload` rebuilt after `change(tensors, meta)` edited its tensors and metadata in place."""
    meta = _header(payload)["__metadata__"]
    tensors = {k: v.clone() for k, v in st_load(payload).items()}
    change(tensors, meta)
    return st_save(tensors, metadata=meta)


def _factors(shapes: dict[str, tuple[int, int, int]], seed: int = 0) -> dict[str, LoraFactors]:
    """name -> (r, d_in, d_out)."""
    g = torch.Generator().manual_seed(seed)
    return {n: LoraFactors(torch.randn(r, i, generator=g), torch.randn(o, r, generator=g), 0.5 + k)
            for k, (n, (r, i, o)) in enumerate(shapes.items())}


MODS = {"model.layers.0.self_attn.q_proj": (4, 16, 16), "model.layers.0.mlp.down_proj": (2, 24, 8)}


def test_dense_round_trip_is_exact_in_float32():
    f = _factors(MODS)
    out, meta = decode(encode(f))
    assert out.keys() == f.keys()
    for n in f:
        assert torch.equal(out[n].A, f[n].A) and torch.equal(out[n].B, f[n].B)
        assert out[n].scale == f[n].scale and out[n].A.dtype == torch.float32
    assert meta["fedpipe.density"] == "1.0" and meta["fedpipe.precision"] == "fp32"


@pytest.mark.parametrize("precision,dtype", [("bf16", torch.bfloat16), ("fp16", torch.float16)])
def test_dense_half_precision_within_its_precision(precision, dtype):
    f = _factors(MODS)
    payload = encode(f, precision=precision)
    out, meta = decode(payload)
    eps = torch.finfo(dtype).eps
    for n in f:
        for got, want in ((out[n].A, f[n].A), (out[n].B, f[n].B)):
            assert got.dtype == torch.float32
            assert torch.all((got - want).abs() <= want.abs() * eps)
            assert torch.equal(got, want.to(dtype).float())  # the stored bits are the dtype's
    assert len(_data(payload)) == len(_data(encode(f))) // 2


def test_sparse_keeps_exactly_the_topk_of_the_update_by_hand():
    # A: deltas vs the reference are [[0.5, -5, 0], [2, 0.25, -1]]; k = ceil(0.5 * 6) = 3
    # keeps -5 (flat 1), 2 (flat 3), -1 (flat 5); the rest stays at the reference (all ones).
    ref = {"m": LoraFactors(torch.ones(2, 3), torch.zeros(3, 2))}
    A = torch.tensor([[1.5, -4.0, 1.0], [3.0, 1.25, 0.0]])
    B = torch.tensor([[0.1, -0.2], [7.0, 0.0], [-3.0, 0.3]])  # vs zeros: keeps 7, -3, 0.3
    payload = encode({"m": LoraFactors(A, B, 2.0)}, density=0.5, reference=ref)
    out, _ = decode(payload, reference=ref)
    assert torch.equal(out["m"].A, torch.tensor([[1.0, -4.0, 1.0], [3.0, 1.0, 0.0]]))
    assert torch.equal(out["m"].B, torch.tensor([[0.0, 0.0], [7.0, 0.0], [-3.0, 0.3]]))
    assert out["m"].scale == 2.0
    # One data buffer: per factor its 3 kept values (float32 deltas, ascending flat index), then a
    # 1-byte bitmask (fewer than 3 uint16 indices); the layout is [scale, rank, d_out, d_in, relative].
    values = torch.tensor([-5.0, 2.0, -1.0, 7.0, -3.0, 0.3]).numpy().astype("<f4").tobytes()
    assert _data(payload) == values[:12] + bytes([0b101010]) + values[12:] + bytes([0b110100])
    assert _layout(payload) == {"m": [2.0, 2, 3, 3, True]}


def test_sparse_without_reference_is_against_zeros_and_needs_none():
    f = _factors(MODS)
    out, _ = decode(encode(f, density=0.25))
    for n in f:
        for got, want in ((out[n].A, f[n].A), (out[n].B, f[n].B)):
            kept = got != 0
            k = -(-want.numel() // 4)
            assert int(kept.sum()) == k
            assert torch.equal(got[kept], want[kept])
            assert want[~kept].abs().max() <= want[kept].abs().min()


def test_sparse_round_trip_with_reference_is_reference_plus_delta():
    ref = _factors(MODS, seed=1)
    f = {n: LoraFactors(r.A + 0.01 * torch.randn_like(r.A), r.B + 0.01 * torch.randn_like(r.B),
                        r.scale) for n, r in ref.items()}
    out, _ = decode(encode(f, density=0.3, reference=ref), reference=ref)
    for n in f:
        for got, want, base in ((out[n].A, f[n].A, ref[n].A), (out[n].B, f[n].B, ref[n].B)):
            sent = got != base
            assert torch.allclose(got[sent], want[sent], atol=1e-6)
            assert torch.equal(got[~sent], base[~sent])
            d = (want - base).abs()
            assert d[~sent].max() <= d[sent].min()


@pytest.mark.parametrize("density,enc", [(0.25, "mask"), (1 / 128, "idx")])
def test_mask_encoding_is_the_smaller_one(density, enc):
    # 64x64 tensors: bitmask 512 bytes; uint16 indices 2 bytes each (k = 1024 vs k = 32).
    f = {"m": LoraFactors(torch.randn(64, 64), torch.randn(64, 64))}
    payload = encode(f, density=density)
    k = math.ceil(4096 * density)
    data = _data(payload)
    assert len(data) == 2 * (4 * k + min(512, 2 * k))
    mask = data[4 * k:4 * k + min(512, 2 * k)]  # A's, after its k values
    out, _ = decode(payload)
    kept = np.flatnonzero(out["m"].A.reshape(-1).numpy())
    if enc == "mask":
        assert np.flatnonzero(np.unpackbits(np.frombuffer(mask, np.uint8), bitorder="little")).tolist() \
            == kept.tolist()
    else:
        assert np.frombuffer(mask, "<u2").tolist() == kept.tolist()


def test_large_tensors_use_int32_indices():
    f = {"m": LoraFactors(torch.randn(2, 40000), torch.randn(40000, 2))}  # numel 80000 > 65536
    payload = encode(f, density=0.001)
    data = _data(payload)
    assert len(data) == 2 * (80 * 4 + 80 * 4)  # values and int32 indices (uint16 would be 2 bytes)
    out, _ = decode(payload)
    assert np.frombuffer(data[320:640], "<i4").tolist() == np.flatnonzero(out["m"].A.reshape(-1).numpy()).tolist()


def test_bytes_shrink_with_density_measured():
    f = {"m": LoraFactors(torch.randn(64, 576), torch.randn(576, 64))}
    dense = payload_bytes(encode(f))
    assert payload_bytes(encode(f, density=1 / 4)) <= 0.3 * dense
    assert payload_bytes(encode(f, density=1 / 16)) <= 0.1 * dense


def test_dense_bytes_predicts_the_payload_up_to_the_header():
    f = _factors(MODS)
    ranks = {n: x.rank for n, x in f.items()}
    shapes = {n: (x.B.shape[0], x.A.shape[1]) for n, x in f.items()}
    assert dense_bytes(ranks, shapes) == 4 * (4 * 32 + 2 * 32)
    for precision, bpv in (("fp32", 4), ("bf16", 2)):
        payload = encode(f, precision=precision)
        header = 8 + int.from_bytes(payload[:8], "little")
        assert payload_bytes(payload) == dense_bytes(ranks, shapes, bpv) + header
    with pytest.raises(FedpipeError, match="without a shape"):
        dense_bytes({"x": 4}, {})


def test_metadata_round_trip_and_reserved_prefix():
    meta = {"server": "edge-3", "round": "7", "rule": "flexlora"}
    _, got = decode(encode(_factors(MODS), metadata=meta, density=0.5))
    assert {k: got[k] for k in meta} == meta
    assert got["fedpipe.density"] == "0.5" and "fedpipe.layout" not in got
    with pytest.raises(FedpipeError, match="reserved"):
        encode({}, metadata={"fedpipe.density": "1"})
    with pytest.raises(FedpipeError, match="strings"):
        encode({}, metadata={"round": 7})


def test_empty_dict_round_trips():
    out, meta = decode(encode({}, density=0.1, metadata={"a": "b"}))
    assert out == {} and meta["a"] == "b"


@pytest.mark.parametrize("bad", [
    b"", b"garbage", b"\xff" * 64,
    st_save({"x": torch.zeros(2)}),  # valid safetensors, not a fedpipe payload
])
def test_not_a_payload_raises_fedpipe_error(bad):
    with pytest.raises(FedpipeError, match="payload"):
        decode(bad)


def test_corrupt_payload_raises_fedpipe_error():
    payload = encode(_factors(MODS), density=0.25)
    with pytest.raises(FedpipeError):
        decode(payload[:-7])
    with pytest.raises(FedpipeError):
        decode(payload[:8] + payload[9:])


def _set_bytes(at: int, raw: bytes):
    def change(tensors, meta):
        tensors["data"][at:at + len(raw)] = torch.frombuffer(bytearray(raw), dtype=torch.uint8)
    return change


# A (1, 4096) at density 1/128: 32 float32 values (128 bytes), then 32 uint16 indices; B (4, 1) at
# 1/128 keeps 1 value (4 bytes) and a 1-byte bitmask: data bytes 0-127, 128-191, 192-195, 196.
SPARSE = {"m": LoraFactors(torch.randn(1, 4096), torch.randn(4, 1))}


@pytest.mark.parametrize("change,match", [
    (_set_bytes(190, np.array([4096], "<u2").tobytes()), "module 'm' is corrupt (m.A: indices out of range"),
    (_set_bytes(128, np.array([9, 3], "<u2").tobytes()), "m.A: indices out of range or not ascending"),
    (_set_bytes(196, bytes([0b11])), "m.B: bitmask marks 2 entries, the density keeps k = 1"),
    (_set_bytes(196, bytes([0b10001])), "m.B: bitmask has bits set past the end"),
    (lambda t, meta: t.update(data=t["data"][:-1]), "'m' is corrupt (its factors need data bytes 0 to 197, "
                                                    "the payload holds 196)"),
    (lambda t, meta: t.update(data=torch.cat([t["data"], t["data"][:3]])), "3 data bytes after the last"),
    (lambda t, meta: t.update(extra=torch.zeros(1)), "expected one named 'data'"),
    (lambda t, meta: t.update(data=t["data"].float()), "expected 1-D uint8"),
    (lambda t, meta: meta.update({"fedpipe.format": "fedpipe-wire/1"}), "format 'fedpipe-wire/1'"),
    (lambda t, meta: meta.update({"fedpipe.density": "0"}), "density 0.0 is out of range"),
    (lambda t, meta: meta.update({"fedpipe.density": "1/128"}), "not a valid fedpipe wire payload"),
    (lambda t, meta: meta.update({"fedpipe.density": "0.25"}), "'m' is corrupt (its factors need data bytes"),
    (lambda t, meta: meta.update({"fedpipe.layout": "[]"}), "layout is not a JSON object"),
])
def test_lying_payload_is_refused_saying_what_is_wrong(change, match):
    payload = encode(SPARSE, density=1 / 128)
    assert decode(payload)[0]["m"].A.count_nonzero() == 32  # the untouched payload decodes
    with pytest.raises(FedpipeError, match="payload") as e:
        decode(_reserialise(payload, change))
    assert match in str(e.value)


@pytest.mark.parametrize("entry,match", [
    ([1.0, 1, 4, 4096], "is not [scale, rank, d_out, d_in, relative]"),
    ({"scale": 1.0}, "is not [scale, rank, d_out, d_in, relative]"),
    (["1", 1, 4, 4096, False], "scale '1' is not a finite number"),
    ([float("nan"), 1, 4, 4096, False], "scale nan is not a finite number"),
    ([1.0, "1", 4, 4096, False], "rank '1' is not a count >= 0"),
    ([1.0, True, 4, 4096, False], "rank True is not a count >= 0"),
    ([1.0, 1, -4, 4096, False], "d_out -4 is not a count >= 0"),
    ([1.0, 1, 4, 4096.0, False], "d_in 4096.0 is not a count >= 0"),
    ([1.0, 1, 4, 4096, 0], "relative 0 is not true or false"),
    ([1.0, 1, 4, 4097, False], "its factors need data bytes 0 to 203"),  # k 33: 6 more bytes
    ([1.0, 2**16, 2**16, 2**16, False], "more than 2^31 - 1 entries"),
])
def test_lying_layout_entry_is_refused_naming_the_module(entry, match):
    def change(tensors, meta):
        meta["fedpipe.layout"] = json.dumps({"m": entry})

    with pytest.raises(FedpipeError, match="module 'm' is corrupt") as e:
        decode(_reserialise(encode(SPARSE, density=1 / 128), change))
    assert match in str(e.value)


def test_reference_must_be_given_and_match():
    ref = _factors(MODS, seed=1)
    payload = encode(_factors(MODS), density=0.5, reference=ref)
    with pytest.raises(FedpipeError, match="same reference"):
        decode(payload)
    small = {n: LoraFactors(r.A[:1], r.B[:, :1]) for n, r in ref.items()}
    with pytest.raises(FedpipeError, match="shape"):
        decode(payload, reference=small)
    with pytest.raises(FedpipeError, match="reference"):
        encode(_factors(MODS), density=0.5, reference=small)


@pytest.mark.parametrize("kwargs,match", [
    ({"density": 0.0}, "density"), ({"density": 1.5}, "density"),
    ({"precision": "int5"}, "precision"), ({"precision": torch.int8}, "precision"),
])
def test_bad_arguments_raise_fedpipe_error(kwargs, match):
    with pytest.raises(FedpipeError, match=match):
        encode(_factors(MODS), **kwargs)


def test_bad_factor_shapes_name_the_module():
    with pytest.raises(FedpipeError, match="'m'"):
        encode({"m": LoraFactors(torch.zeros(2, 3), torch.zeros(3, 4))})


def test_topk_with_residual_is_pure_and_loses_nothing():
    update = torch.tensor([[0.5, -5.0, 0.0], [2.0, 0.25, -1.0]])
    residual = torch.tensor([[0.0, 0.0, 3.0], [0.0, 0.0, 0.0]])
    u0, r0 = update.clone(), residual.clone()
    sparse, new_res = topk_with_residual(update, residual, 0.5)
    assert torch.equal(sparse, torch.tensor([[0.0, -5.0, 3.0], [2.0, 0.0, 0.0]]))
    assert torch.equal(new_res, torch.tensor([[0.5, 0.0, 0.0], [0.0, 0.25, -1.0]]))
    assert torch.equal(update, u0) and torch.equal(residual, r0)
    # Rounding to the precision is fed back too.
    x = torch.randn(8, 8)
    sparse, new_res = topk_with_residual(x, None, 1.0, precision="bf16")
    assert torch.equal(sparse, x.bfloat16().float()) and torch.equal(sparse + new_res, x)


def test_encode_with_residual_feeds_back_what_was_cut():
    ref = {"m": LoraFactors(torch.ones(2, 3), torch.zeros(3, 2))}
    A = torch.tensor([[1.5, -4.0, 1.0], [3.0, 1.25, 0.0]])
    B = torch.tensor([[0.1, -0.2], [7.0, 0.0], [-3.0, 0.3]])
    residual: dict[str, torch.Tensor] = {}
    out, _ = decode(encode({"m": LoraFactors(A, B)}, density=0.5, reference=ref,
                           residual=residual), reference=ref)
    assert torch.equal(residual["m.A"], torch.tensor([[0.5, 0.0, 0.0], [0.0, 0.25, 0.0]]))
    assert torch.allclose(out["m"].A + residual["m.A"], A)
    assert torch.allclose(out["m"].B + residual["m.B"], B)
    # Next round with no new update: the cut 0.5 and 0.25 now go out.
    out2, _ = decode(encode(ref, density=0.5, reference=ref, residual=residual), reference=ref)
    assert torch.equal(out2["m"].A, torch.tensor([[1.5, 1.0, 1.0], [1.0, 1.25, 1.0]]))
    assert torch.count_nonzero(residual["m.A"]) == 0
    with pytest.raises(FedpipeError, match="residual"):
        encode({"m": LoraFactors(torch.ones(1, 3), torch.ones(3, 1))}, density=0.5,
               residual=residual)


def test_density_rounding_is_tolerant():
    # 0.1 * 30 == 3.0000000000000004 in floating point: k must be 3, not 4.
    out, _ = decode(encode({"m": LoraFactors(torch.randn(1, 30), torch.randn(30, 1))},
                           density=0.1))
    assert int((out["m"].A != 0).sum()) == 3


def test_no_pickle_anywhere(monkeypatch):
    def boom(*a, **k):
        raise AssertionError("pickle used")

    for name in ("dumps", "loads", "dump", "load", "Pickler", "Unpickler"):
        monkeypatch.setattr(pickle, name, boom)
    monkeypatch.setattr(torch, "save", boom)
    monkeypatch.setattr(torch, "load", boom)
    f = _factors(MODS)
    payload = encode(f, density=0.25)
    decode(payload)
    # The payload is plain safetensors: 8-byte length, JSON header, raw little-endian data.
    header = _header(payload)
    end = max(v["data_offsets"][1] for k, v in header.items() if k != "__metadata__")
    assert len(payload) == 8 + int.from_bytes(payload[:8], "little") + end
    import fedpipe.wire as wire
    src = open(wire.__file__).read()
    assert not re.search(r"import pickle|(?<!safetensors\.)torch\.(load|save)\b", src)
