"""Error feedback: over rounds the sum of what was received converges to the sum of what was meant."""

from __future__ import annotations

import pytest
import torch

from fedpipe.feedback import ErrorFeedback
from fedpipe.lora import LoraFactors
from fedpipe.rules import RULES
from fedpipe.wire import decode, encode


def _delta(got: dict[str, LoraFactors], ref: dict[str, LoraFactors]) -> torch.Tensor:
    return torch.cat([torch.cat([(g.A - r.A).reshape(-1), (g.B - r.B).reshape(-1)])
                      for g, r in zip(got.values(), ref.values(), strict=True)])


@pytest.mark.parametrize("density,precision", [(0.1, "fp32"), (1.0, "nf4"), (0.1, "int8"),
                                               (0.25, "fp4")])
def test_sum_received_converges_to_sum_meant(density, precision):
    # Prepare: the same update each round, each against a fresh start the receiver also holds.
    g = torch.Generator().manual_seed(0)
    update = {"m": LoraFactors(torch.randn(4, 48, generator=g), torch.randn(40, 4, generator=g))}
    meant_one = _delta(update, {"m": LoraFactors(torch.zeros(4, 48), torch.zeros(40, 4))})
    with_fb, without = ErrorFeedback(), ErrorFeedback()
    received = {"fb": torch.zeros_like(meant_one), "plain": torch.zeros_like(meant_one)}
    gaps = {"fb": [], "plain": []}
    for t in range(1, 41):
        start = {"m": LoraFactors(torch.randn(4, 48, generator=g), torch.randn(40, 4, generator=g))}
        x = {"m": LoraFactors(start["m"].A + update["m"].A, start["m"].B + update["m"].B)}
        # Execute
        for key, fb in (("fb", with_fb), ("plain", without)):
            out, _ = decode(fb.encode(x, reference=start, density=density, precision=precision),
                            reference=start)
            received[key] += _delta(out, start)
            if key == "plain":
                fb.reset()
            gaps[key].append(float((received[key] - t * meant_one).norm() / (t * meant_one).norm()))
    # Assert: what is owed is exactly what is missing, and it stays bounded, so the relative gap
    # falls like 1/t (halves from round 20 to 40); without feedback it stays where it was.
    owed = torch.cat([with_fb.residual["m.A"].reshape(-1), with_fb.residual["m.B"].reshape(-1)])
    assert torch.allclose(received["fb"] + owed, 40 * meant_one, atol=1e-3)
    assert with_fb.owed() == pytest.approx(float(owed.norm()), rel=1e-6)
    assert gaps["fb"][-1] < gaps["fb"][0] / 5 and gaps["fb"][-1] < 0.6 * gaps["fb"][19]
    assert gaps["plain"][-1] == pytest.approx(gaps["plain"][0], rel=0.2)


def test_residual_by_hand_and_dropped_when_the_rank_changes():
    # Prepare: top-1 of 4 at fp32 against zeros.
    fb = ErrorFeedback()
    f = {"m": LoraFactors(torch.tensor([[4.0, 1.0, -2.0, 0.5]]), torch.tensor([[3.0]]))}
    # Execute / Assert: 4 goes, 1, -2, 0.5 are owed; next round -2 + -2 goes first.
    decode(fb.encode(f, density=0.25))
    assert torch.equal(fb.residual["m.A"], torch.tensor([[0.0, 1.0, -2.0, 0.5]]))
    out, _ = decode(fb.encode(f, density=0.25))
    assert torch.equal(out["m"].A, torch.tensor([[0.0, 0.0, -4.0, 0.0]]))
    assert torch.equal(fb.residual["m.A"], torch.tensor([[4.0, 2.0, 0.0, 1.0]]))
    # A different rank: the old residual is dropped, not added.
    wider = {"m": LoraFactors(torch.ones(2, 4), torch.ones(1, 2))}
    out, _ = decode(fb.encode(wider))
    assert torch.equal(out["m"].A, torch.ones(2, 4))
    fb.reset(["m"])
    assert fb.residual == {} and fb.owed() == 0.0


def test_downloads_converge_by_tracking_what_the_receiver_holds():
    """No residual on downloads: each broadcast is a delta against what the server holds, so what
    rounding dropped is in the next difference; nf4 shrinks the gap about 6x a round."""
    g = torch.Generator().manual_seed(1)
    target = {"m": LoraFactors(torch.randn(8, 64, generator=g), torch.randn(64, 8, generator=g))}
    zeros = {"m": LoraFactors(torch.zeros(8, 64), torch.zeros(64, 8))}
    held, errors = zeros, []
    for _ in range(5):
        held, _ = decode(encode(target, precision="nf4", reference=held), reference=held)
        errors.append(float(_delta(held, target).norm() / _delta(target, zeros).norm()))
    assert errors[-1] < 1e-3 and all(b < a / 4 for a, b in zip(errors[:-1], errors[1:], strict=True))


def test_which_rules_keep_factor_coordinates():
    keeps = {name: t.keeps_factor_coordinates for name, t in RULES.items()}
    assert keeps == {"fedit": True, "hetlora": True, "flexlora": False, "flora": False}
