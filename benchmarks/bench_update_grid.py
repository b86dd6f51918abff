"""Why int2's codes: how much of a round's LoRA update each encoding loses, on SmolLM2-135M.

A round is a few AdamW steps from a fresh optimizer (`fedpipe.train.train_steps`), so each entry of
the update is about lr x (a sum of signs). This trains LoRA (rank 8) on 30 q/v/down projections of
the bundled SmolLM2-135M for 3 rounds of 3 steps on random tokens, and prints per round where
|update| / lr sits (quantiles) and the share of the update's energy ||received - meant||^2 /
||meant||^2 each encoding loses: int2 and int3 (`fedpipe.blockwise`, the wire's own code), nf4
(bitsandbytes) and top-k at several densities (the energy of the entries it drops).

    python benchmarks/bench_update_grid.py      # about a minute on 2 CPU cores
"""

from __future__ import annotations

import torch

from fedpipe import blockwise
from fedpipe.models import attach_lora, get_factors, load_base, resolve_model_dir
from fedpipe.train import train_steps

LR, STEPS, ROUNDS = 2e-3, 3, 3


def flat(factors) -> torch.Tensor:
    return torch.cat([torch.cat([f.A.reshape(-1), f.B.reshape(-1)]) for f in factors.values()])


def lost(delta: torch.Tensor, precision: str) -> float:
    [(codes, absmax)] = blockwise.quantize([delta], precision)
    [got] = blockwise.dequantize([(codes, absmax, delta.numel())], precision)
    return float((got - delta).pow(2).sum() / delta.pow(2).sum())


def dropped(delta: torch.Tensor, density: float) -> float:
    keep = int(density * delta.numel())
    threshold = delta.abs().kthvalue(delta.numel() - keep).values
    return float(delta[delta.abs() <= threshold].pow(2).sum() / delta.pow(2).sum())


def main() -> None:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = load_base(resolve_model_dir("smollm2-135m"), 16)
    names = [n for n, _ in model.named_modules() if n.endswith(("q_proj", "v_proj", "down_proj"))][:30]
    peft_model = attach_lora(model, dict.fromkeys(names, 8))
    generator = torch.Generator().manual_seed(1)

    def batches():
        while True:
            ids = torch.randint(100, 5000, (4, 48), generator=generator)
            yield {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}

    stream = batches()
    for round_index in range(1, ROUNDS + 1):
        before = flat(get_factors(peft_model)).clone()
        train_steps(peft_model, stream, STEPS, LR)
        delta = flat(get_factors(peft_model)) - before
        quantiles = [round(float(delta.abs().quantile(q)) / LR, 2) for q in (0.1, 0.25, 0.5, 0.75, 0.9, 0.99)]
        print(f"round {round_index}: |update| / lr at quantiles 10/25/50/75/90/99%: {quantiles}")
        for precision in ("int2", "int3", "nf4"):
            print(f"  {precision}: loses {lost(delta, precision):.4f} of the energy")
        for density in (0.25, 1 / 3, 0.5):
            print(f"  top-k {density:.2f}: drops {dropped(delta, density):.4f}")


if __name__ == "__main__":
    main()
