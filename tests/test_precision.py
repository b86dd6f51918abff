"""Value precisions on the wire: error bounds, counted bytes = predicted bytes, refused corruption."""

from __future__ import annotations

import json
import math
from typing import get_args

import pytest
import torch
from pydantic import ValidationError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from fedpipe import blockwise
from fedpipe.errors import FedpipeError
from fedpipe.lora import LoraFactors
from fedpipe.plan import Prediction, ServerPlan, check_densities
from fedpipe.precision import (
    BLOCK,
    PRECISIONS,
    WirePrecision,
    bytes_per_value,
    tensor_bytes,
    value_bytes,
)
from fedpipe.wire import decode, encode, payload_bytes, topk_with_residual

BLOCKWISE = ["int8", "nf4", "fp4", "int2", "int3"]


def _header_len(payload: bytes) -> int:
    return 8 + int.from_bytes(payload[:8], "little")


def _factors(seed: int = 0, r: int = 4, d_in: int = 100, d_out: int = 70) -> dict[str, LoraFactors]:
    g = torch.Generator().manual_seed(seed)
    return {"m": LoraFactors(torch.randn(r, d_in, generator=g), torch.randn(d_out, r, generator=g), 2.0),
            "n": LoraFactors(torch.randn(2, 30, generator=g), torch.randn(9, 2, generator=g) * 1e-3)}


def _bound(want: torch.Tensor, precision: str) -> torch.Tensor:
    """The documented per-value error bound of `precision` for the dense flat tensor `want`."""
    p = PRECISIONS[precision]
    flat = want.reshape(-1)
    if not p.blockwise:
        return p.error * flat.abs() + (2.0**-25 if precision == "fp16" else 0.0)
    pad = torch.cat([flat, flat.new_zeros(-flat.numel() % BLOCK)]).reshape(-1, BLOCK)
    absmax = pad.abs().max(dim=1).values.repeat_interleave(BLOCK)[: flat.numel()]
    return p.error * absmax


@pytest.mark.parametrize("precision", list(PRECISIONS))
def test_dense_round_trip_within_documented_error(precision):
    f = _factors()
    out, meta = decode(encode(f, precision=precision))
    assert meta["fedpipe.precision"] == precision and meta["fedpipe.relative"] == "false"
    for n in f:
        for part in ("A", "B"):
            want, got = getattr(f[n], part), getattr(out[n], part)
            assert got.dtype == torch.float32 and got.shape == want.shape
            assert torch.all((got - want).abs().reshape(-1) <= _bound(want, precision))


def test_values_on_the_code_book_round_trip_exactly():
    # Prepare: every value is 0 or +-absmax of its block, which both 4-bit code books hold
    # (bitsandbytes' 8-bit dynamic code has +1 but neither 0 nor -1: 2e-5 and 0.993 are nearest).
    x = torch.tensor([[3.0, -3.0, 0.0, 3.0], [0.0, 0.0, -3.0, 0.0]])
    for precision in ("nf4", "fp4"):
        # Execute
        out, _ = decode(encode({"m": LoraFactors(x, x.T.clone())}, precision=precision))
        # Assert
        assert torch.equal(out["m"].A, x) and torch.equal(out["m"].B, x.T)


@pytest.mark.parametrize("precision", BLOCKWISE)
def test_documented_bound_covers_the_code_book(precision):
    """Half the widest gap between neighbouring codes is the worst rounding (relative to absmax)."""
    import bitsandbytes.functional as F

    code = {"int8": F.create_dynamic_map(), "int2": blockwise.uniform_code(2),
            "int3": blockwise.uniform_code(3)}.get(precision)
    code = F.get_4bit_type(precision, device="cpu") if code is None else code
    half_gap = code.float().sort().values.diff().max().item() / 2
    assert half_gap <= PRECISIONS[precision].error < half_gap * 1.01


@pytest.mark.parametrize("precision", list(PRECISIONS))
@pytest.mark.parametrize("density", [0.25, 1 / 64])
def test_topk_then_precision_within_error_of_the_kept_values(precision, density):
    ref = _factors(seed=1)
    f = {n: LoraFactors(r.A + 0.1 * torch.randn_like(r.A), r.B + 0.1 * torch.randn_like(r.B), r.scale)
         for n, r in ref.items()}
    out, meta = decode(encode(f, density=density, precision=precision, reference=ref), reference=ref)
    assert meta["fedpipe.relative"] == "true"
    for n in f:
        for part in ("A", "B"):
            base, want, got = (getattr(x[n], part) for x in (ref, f, out))
            sent_delta = topk_with_residual(want - base, None, density)[0]  # exact top-k, fp32
            kept = sent_delta != 0
            err = (got - base - sent_delta).abs()
            worst = PRECISIONS[precision].error * sent_delta.abs().max() + 2.0**-25
            assert torch.all(err[kept] <= worst) and torch.all(err[~kept] == 0)


def test_lossy_dense_sends_the_change_against_the_reference():
    # Prepare: factors far from zero, a tiny change: nf4 of the absolute values would lose it.
    ref = {"m": LoraFactors(torch.full((2, 64), 5.0), torch.full((64, 2), 5.0))}
    f = {"m": LoraFactors(ref["m"].A + 0.01, ref["m"].B - 0.01)}
    # Execute
    payload = encode(f, precision="nf4", reference=ref)
    out, meta = decode(payload, reference=ref)
    # Assert: the change is constant per block, so exactly on the code book.
    assert meta["fedpipe.relative"] == "true"
    assert torch.equal(out["m"].A, f["m"].A) and torch.equal(out["m"].B, f["m"].B)
    with pytest.raises(FedpipeError, match="same reference"):
        decode(payload)
    # fp32 dense stays absolute and exact; it needs no reference.
    assert decode(encode(f, reference=ref))[1]["fedpipe.relative"] == "false"


def test_int2_codes_by_hand():
    # Prepare: one block holding each code's value, the thresholds between codes, and their
    # neighbours (absmax 3: codes -3, -1, 1, 3; thresholds -2, 0, 2; a tie goes to the smaller code).
    x = torch.tensor([-3.0, -1.0, 1.0, 3.0, -2.0, 0.0, 2.0, -2.01, -1.99, 0.01, 1.99, 2.01] + [0.0] * 52)
    # Execute
    [(codes, absmax)] = blockwise.quantize([x], "int2")
    [got] = blockwise.dequantize([(codes, absmax, x.numel())], "int2")
    # Assert: four codes per byte, the first in the two high bits.
    assert absmax.tolist() == [3.0] and codes.numel() == 16
    assert codes[0].item() == 0b00_01_10_11  # -3, -1, 1, 3
    want = [-3.0, -1.0, 1.0, 3.0, -3.0, -1.0, 1.0, -3.0, -1.0, 1.0, 1.0, 3.0]
    assert got[:12].tolist() == pytest.approx(want) and torch.all(got[12:] == -1.0)


def test_int3_packs_eight_codes_in_three_bytes():
    # Prepare: one block whose first eight values are the eight codes, smallest first.
    x = torch.cat([torch.linspace(-7.0, 7.0, 8), torch.zeros(56)])
    # Execute
    [(codes, absmax)] = blockwise.quantize([x], "int3")
    [got] = blockwise.dequantize([(codes, absmax, x.numel())], "int3")
    # Assert: codes 0..7 as 000 001 010 011 100 101 110 111 in three bytes, and back exactly.
    assert codes.numel() == 24 and codes[:3].tolist() == [0b00000101, 0b00111001, 0b01110111]
    assert torch.allclose(got[:8], x[:8], rtol=0, atol=1e-6)


def test_adam_round_updates_sit_on_the_int2_grid():
    """Why int2's codes: 3 AdamW steps from a fresh optimizer move each entry by about
    lr x (sum of 3 signs), so a block's values are near {-3, -1, 1, 3} x lr."""
    torch.manual_seed(0)
    target = torch.randn(64, 64)
    w = torch.zeros(64, 64, requires_grad=True)
    opt = torch.optim.AdamW([w], lr=1e-3, weight_decay=0.0)
    for _ in range(3):
        (w - target + 0.3 * torch.randn(64, 64)).pow(2).sum().backward()
        opt.step()
        opt.zero_grad()
    delta = w.detach().reshape(-1)
    [(codes, absmax)] = blockwise.quantize([delta], "int2")
    [got] = blockwise.dequantize([(codes, absmax, delta.numel())], "int2")
    assert float((got - delta).pow(2).sum() / delta.pow(2).sum()) < 0.05


def test_value_bytes_by_hand():
    assert value_bytes(100, "fp32") == 400 and value_bytes(100, "bf16") == 200
    assert value_bytes(100, "int8") == 100 + 4 * 2  # two blocks of 64: two float32 scales
    assert value_bytes(101, "nf4") == 51 + 4 * 2  # two codes per byte, the last one half empty
    assert tensor_bytes(4096, 0.25, "int8") == 1024 + 4 * 16 + 512  # + bitmask (512 B < 2048 B)
    assert tensor_bytes(4096, 1 / 128, "nf4") == 16 + 4 + 2 * 32  # + 32 uint16 indices
    assert bytes_per_value(1.0, "int8") == 1.0625 and bytes_per_value(1.0, "nf4") == 0.5625
    assert value_bytes(101, "int2") == 26 + 4 * 2 and bytes_per_value(1.0, "int2") == 0.3125
    assert value_bytes(101, "int3") == 38 + 4 * 2 and bytes_per_value(1.0, "int3") == 0.4375
    assert bytes_per_value(0.25, "fp32") == 1.125


@pytest.mark.parametrize("precision", list(PRECISIONS))
@pytest.mark.parametrize("density", [1.0, 0.25, 1 / 16, 1 / 200])
def test_counted_bytes_equal_predicted_up_to_the_header(precision, density):
    f = _factors() | {"big": LoraFactors(torch.randn(2, 40000), torch.randn(300, 2))}
    ref = _factors(seed=1) if density < 1 else None
    payload = encode(f, density=density, precision=precision, reference=ref)
    predicted = sum(tensor_bytes(t.numel(), density, precision) for x in f.values() for t in (x.A, x.B))
    assert payload_bytes(payload) - _header_len(payload) == predicted


def test_bytes_per_value_is_what_a_large_payload_costs():
    f = {"m": LoraFactors(torch.randn(64, 576), torch.randn(576, 64))}  # SmolLM2-sized matrix
    n = 2 * 64 * 576
    for precision in PRECISIONS:
        for density in (1.0, 0.25, 1 / 16):
            payload = encode(f, density=density, precision=precision)
            data = payload_bytes(payload) - _header_len(payload)
            assert data <= bytes_per_value(density, precision) * n * 1.01
            assert data >= bytes_per_value(density, precision) * n * 0.95  # uint16 beats int32


def _tamper(payload: bytes, change) -> bytes:
    """Re-serialise `payload` after `change(data, meta)` edits its data bytes (a uint8 tensor) and
    metadata in place."""
    n = int.from_bytes(payload[:8], "little")
    meta = json.loads(payload[8:8 + n])["__metadata__"]
    data = st_load(payload)["data"].clone()
    change(data, meta)
    return st_save({"data": data}, metadata=meta)


def _scales(at: int, *values: float):
    """Overwrite float32 block scales from data byte `at`."""
    def change(data, meta):
        data[at:at + 4 * len(values)] = torch.tensor(values, dtype=torch.float32).view(torch.uint8)
    return change


def _relabel(**fields):
    def change(data, meta):
        meta.update({f"fedpipe.{k}": v for k, v in fields.items()})
    return change


# int8, dense: m.A is 400 codes then 7 scales (data bytes 0-399, 400-427), m.B 280 codes then 5
# scales (428-707, 708-727), n.A 60 + 1 scale (728-791), n.B 18 + 1 scale (792-813).
@pytest.mark.parametrize("change,match", [
    (_scales(400, float("nan")), "module 'm' is corrupt (m.A: int8 scales: block absmax values must be "
                                 "finite and >= 0)"),
    (_scales(712, -1.0), "module 'm' is corrupt (m.B: int8 scales: block absmax values must be finite"),
    (_scales(810, float("inf")), "module 'n' is corrupt (n.B: int8 scales"),
    (_relabel(precision="int5"), "precision 'int5' is not a wire precision"),
    (_relabel(precision="nf4"), "after the last module's factors: the layout accounts for 435 of 814"),
    (_relabel(precision="fp32"), "module 'm' is corrupt (its factors need data bytes 0 to 2720, the "
                                 "payload holds 814)"),
    (_relabel(density="0.5"), "303 data bytes after the last module's factors: the layout accounts for 511"),
])
def test_corrupt_quantized_payload_is_refused_naming_the_tensor(change, match):
    payload = encode(_factors(), precision="int8")
    decode(payload)  # untouched, it decodes
    with pytest.raises(FedpipeError, match="payload") as e:
        decode(_tamper(payload, change))
    assert match in str(e.value)


@pytest.mark.parametrize("precision", BLOCKWISE)
def test_truncated_quantized_payload_is_refused(precision):
    payload = encode(_factors(), precision=precision, density=0.25)
    for cut in (1, 100, len(payload) // 2):
        with pytest.raises(FedpipeError, match="payload"):
            decode(payload[:-cut])


def test_values_a_precision_cannot_hold_are_refused_at_encode():
    big = {"m": LoraFactors(torch.full((1, 4), 2.0**17), torch.ones(4, 1))}
    with pytest.raises(FedpipeError, match="m.A: values exceed the range of fp16"):
        encode(big, precision="fp16")
    assert torch.equal(decode(encode(big, precision="bf16"))[0]["m"].A, big["m"].A)
    nan = {"m": LoraFactors(torch.tensor([[1.0, float("nan")]]), torch.ones(2, 1))}
    with pytest.raises(FedpipeError, match="m.A: non-finite values cannot be sent at nf4"):
        encode(nan, precision="nf4")


def test_blockwise_dequantize_checks_before_decoding():
    # Prepare: three vectors, one empty, none a whole number of blocks.
    vectors = [torch.randn(130), torch.zeros(0), torch.randn(7)]
    # Execute: one call for all, and each alone.
    together = blockwise.quantize(vectors, "nf4")
    alone = [blockwise.quantize([v], "nf4")[0] for v in vectors]
    # Assert: the same codes and scales either way, two codes per byte, one scale per 64.
    assert [(c.numel(), a.numel()) for c, a in together] == [(65, 3), (0, 0), (4, 1)]
    for (c1, a1), (c2, a2) in zip(together, alone, strict=True):
        assert torch.equal(c1, c2) and torch.equal(a1, a2)
    back = blockwise.dequantize([(c, a, v.numel()) for (c, a), v in zip(together, vectors, strict=True)],
                                "nf4")
    assert [b.shape for b in back] == [(130,), (0,), (7,)]
    assert torch.equal(back[2], blockwise.dequantize([(*together[2], 7)], "nf4")[0])
    codes, absmax = together[0]
    with pytest.raises(ValueError, match="item 0: nf4 codes: expected 66 uint8"):
        blockwise.dequantize([(codes, absmax, 132)], "nf4")
    assert math.isclose(bytes_per_value(1.0, "fp4"), 0.5625)


def _entry(**fields) -> ServerPlan:
    predicted = Prediction(memory_gib=1, memory_budget_gib=2, compute_s=1, upload_s=0, download_s=0,
                           round_s=1, upload_bytes=0, download_bytes=0, lora_params=0)
    return ServerPlan(name="edge", members=["edge-0"], samples=10, bits=4, batch_size=1,
                      rank_pattern={"m": 4}, importance_covered=1.0, predicted=predicted, **fields)


def test_plan_precisions_default_to_fp32_and_name_only_wire_precisions():
    assert get_args(WirePrecision) == tuple(PRECISIONS)
    entry = _entry()
    assert entry.upload_precision == entry.download_precision == "fp32"
    assert _entry(upload_precision="nf4", download_precision="int8").upload_precision == "nf4"
    with pytest.raises(ValidationError, match="upload_precision"):
        _entry(upload_precision="int5")


def test_flora_refuses_lossy_download_precision():
    lossy = _entry(download_precision="bf16", upload_precision="nf4")
    check_densities([lossy], "flexlora")
    check_densities([_entry(upload_precision="nf4")], "flora")
    with pytest.raises(FedpipeError, match="'edge': download_precision bf16 with aggregation 'flora'; "
                                           "valid is fp32"):
        check_densities([lossy], "flora")


@pytest.mark.parametrize("precision", BLOCKWISE)
def test_rank_zero_factors_round_trip(precision):
    f = {"m": LoraFactors(torch.zeros(0, 4), torch.zeros(3, 0))}
    out, _ = decode(encode(f, precision=precision))
    assert out["m"].A.shape == (0, 4) and out["m"].B.shape == (3, 0)
