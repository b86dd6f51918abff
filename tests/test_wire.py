"""Wire format: exact round trips, top-k semantics, mask encoding choice, bytes as measured."""

from __future__ import annotations

import json
import math
import pickle
import re

import pytest
import torch
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


def _tables(payload: bytes) -> dict[str, tuple[str, int]]:
    """Tensor name -> (safetensors dtype, bytes it occupies in the payload)."""
    return {k: (v["dtype"], v["data_offsets"][1] - v["data_offsets"][0])
            for k, v in _header(payload).items() if k != "__metadata__"}


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
    assert {dt for dt, _ in _tables(payload).values()} == {"BF16" if dtype == torch.bfloat16
                                                           else "F16"}
    data = sum(n for _, n in _tables(payload).values())
    assert data == sum(n for _, n in _tables(encode(f)).values()) // 2


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
    t = _tables(payload)
    assert t["m.A.values"] == ("F32", 12) and t["m.A.mask"] == ("U8", 1)  # 1 byte beats 3 uint16
    layout = json.loads(_header(payload)["__metadata__"]["fedpipe.layout"])
    assert layout["m"]["A"] == {"shape": [2, 3], "enc": "bitmask", "k": 3, "ref": True,
                                "prec": "fp32"}
    assert layout["m"]["rank"] == 2


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
    t = _tables(payload)
    k = math.ceil(4096 * density)
    for part in ("A", "B"):
        assert f"m.{part}.{enc}" in t
        other = "idx" if enc == "mask" else "mask"
        assert f"m.{part}.{other}" not in t
        assert t[f"m.{part}.{enc}"][1] == min(512, 2 * k)
        assert t[f"m.{part}.values"][1] == 4 * k
    header = 8 + int.from_bytes(payload[:8], "little")
    assert payload_bytes(payload) == header + 2 * (4 * k + min(512, 2 * k))


def test_large_tensors_use_int32_indices():
    f = {"m": LoraFactors(torch.randn(2, 40000), torch.randn(40000, 2))}  # numel 80000 > 65536
    payload = encode(f, density=0.001)
    assert _tables(payload)["m.A.idx"][0] == "I32"
    out, _ = decode(payload)
    assert int((out["m"].A != 0).sum()) == 80


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
    # A well-formed safetensors file whose layout lies about the tensors.
    meta = {"fedpipe.format": "fedpipe-wire/1", "fedpipe.layout": json.dumps(
        {"m": {"scale": 1.0, "rank": 1,
               "A": {"shape": [1, 4], "enc": "indices", "k": 1, "ref": False},
               "B": {"shape": [2, 1], "enc": "dense", "k": 2, "ref": False}}})}
    lying = {"m.A.values": torch.ones(1), "m.A.idx": torch.tensor([9], dtype=torch.int32),
             "m.B": torch.ones(2, 1)}
    with pytest.raises(FedpipeError, match="out of range"):
        decode(st_save(lying, metadata=meta))
    del lying["m.B"]
    with pytest.raises(FedpipeError, match="corrupt"):
        decode(st_save(lying, metadata=meta))


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
    ({"precision": "int3"}, "precision"), ({"precision": torch.int8}, "precision"),
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
