"""CUDA check: nf4 and int8 LoRA training work, and the cost model's memory holds on a GPU.

Run on any machine with CUDA (no weights needed, nothing downloaded):
    PYTHONPATH=. python benchmarks/gpu_check.py [--models smollm2-135m,tinyllama-1.1b]
        [--bits 4,8,16] [--batch-sizes 4,16] [--seq-len 256] [--rank 8] [--steps 6] [--tflops 989]
        [--json results.json]

Per model, a random-weight model is built from its shape card (time and memory do not depend on
the weight values). Per bits x batch, a fresh process (`fedpipe.calibrate.measure`, the path of
`fedpipe calibrate`) loads it on CUDA with bf16 compute (nf4 + double quantization, LLM.int8 or
bf16), attaches LoRA at --rank on all seven projections and takes 1 + --steps AdamW steps on one
fixed batch of random tokens.

Checks (exit 1 if one fails): every loss and LoRA gradient norm is finite; the loss falls on the
fixed batch; the first loss at 4 and 8 bits is within 2% of bf16's (same weights, same batch: a
coarse check that the quantized base computes the same function).
Memory, two comparisons:
  alloc  torch.cuda.max_memory_allocated over the steps (weights, adapters, AdamW state,
         activations) against the prediction minus runtime_overhead_gib (the allocator's own
         figure holds no CUDA context and no cache slack);
  total  device memory of the process (context + peak reserved) against the whole prediction,
         with the profile defaults and after `fit_calibration` (in-sample and leave-one-out).
Time: median step time and the effective TFLOP/s (cost-model FLOPs / step time); utilisation is
relative to --tflops (H100 SXM dense bf16: 989).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
from pathlib import Path

import yaml

from fedpipe.calibrate import (
    Row,
    compare,
    error_summary,
    fit_calibration,
    make_setup,
    measure,
    model_weights,
    parse_int_list,
    terms,
)


def profile_for(model: str, seq_len: int, rank: int, tflops: float) -> dict:
    return {
        "name": f"gpu-check-{model}", "model": model,
        "task": {"seq_len": seq_len, "local_steps": 1, "learning_rate": 2e-3},
        "candidates": {"ranks": [0, rank]},
        "servers": [{"name": "gpu", "memory_gib": 80, "tflops": tflops, "uplink_mbps": 1000,
                     "downlink_mbps": 1000, "samples": 100, "device": "cuda"}],
    }


def check_model(model: str, args: argparse.Namespace) -> tuple[list[dict], list[str]]:
    """Measure one model, printing each configuration as it completes; return rows and failures."""
    rows, failures, measured = [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "profile.yaml"
        path.write_text(yaml.safe_dump(profile_for(model, args.seq_len, args.rank, args.tflops)))
        setup = make_setup(path, rank=args.rank, device="cuda")
        folder, weights = model_weights(setup.profile, path.parent, Path(tmp))
        print(f"\n{model}: {weights}", flush=True)
        print_header()
        for bits in args.bits:
            for batch in args.batch_sizes:
                m = measure(folder, setup, bits, batch, args.steps)
                measured.append(m)
                rows.append(row(setup, model, m))
                print_row(rows[-1])
    before = setup.profile.calibration
    fit = fit_calibration(setup, measured, before)
    compared = compare(setup, measured, before, fit.calibration)
    first = {(m.bits, m.batch): m.losses[0] for m in measured}
    for m, r, c in zip(measured, rows, compared, strict=True):
        r.update(pred_total_after=c.after_gib, pred_total_loo=c.loo_gib, pred_step_after=c.after_s,
                 pred_step_loo=c.loo_s)
        where = f"{model} {m.bits}-bit batch {m.batch}"
        if not all(math.isfinite(v) for v in m.losses + m.grad_norms):
            failures.append(f"{where}: non-finite loss or LoRA gradient {m.losses} {m.grad_norms}")
        if not m.losses[-1] < m.losses[0]:
            failures.append(f"{where}: loss did not fall on a fixed batch: {m.losses}")
        ref = first.get((16, m.batch))
        if ref is not None and abs(m.losses[0] / ref - 1) > 0.02:
            failures.append(f"{where}: first loss {m.losses[0]:.4f} vs bf16 {ref:.4f}")
    summary = error_summary(compared)
    print(f"  fitted on this GPU: {fit.calibration.model_dump()}")
    print(f"  largest |error| of the total: before {summary['before_gib']:.1%}, after "
          f"{summary['after_gib']:.1%}, leave-one-out {summary['loo_gib']:.1%}; step time: before "
          f"{summary['before_s']:.0%}, after {summary['after_s']:.1%}, leave-one-out "
          f"{summary['loo_s']:.1%}", flush=True)
    for note in fit.notes:
        print(f"  note: {note}")
    return rows, failures


def row(setup, model: str, m) -> dict:
    """One configuration against the profile-default predictions."""
    before = setup.profile.calibration
    pred_gib, pred_s = setup.predict(m.bits, m.batch, before)
    pred_alloc = pred_gib - before.runtime_overhead_gib
    t = terms(setup, m.bits, m.batch)
    flops = (t.base_s + t.lora_s) * setup.server.tflops * 1e12  # FLOPs per step (utilisation 1)
    return {
        "model": model, "bits": m.bits, "batch": m.batch, "losses": m.losses,
        "max_grad_norm": max(m.grad_norms),
        "alloc_gib": m.allocated_gib, "pred_alloc_gib": pred_alloc,
        "alloc_err": Row.error(pred_alloc, m.allocated_gib),
        "total_gib": m.peak_gib, "context_gib": m.runtime_gib, "resident_gib": m.resident_gib,
        "pred_total_before": pred_gib, "step_s": m.step_s, "pred_step_before": pred_s,
        "tflops_effective": flops / m.step_s / 1e12,
    }


def print_header() -> None:
    print(f"{'bits':>5}{'batch':>6}  {'loss first→last':>17}  {'alloc GiB':>9} {'pred':>6} {'err':>7}  "
          f"{'total':>6} {'pred':>6} {'err':>7}  {'step ms':>8} {'TFLOP/s':>8}", flush=True)


def print_row(r: dict) -> None:
    print(f"{r['bits']:>5}{r['batch']:>6}  {r['losses'][0]:>8.3f}→{r['losses'][-1]:<8.3f}  "
          f"{r['alloc_gib']:>9.3f} {r['pred_alloc_gib']:>6.3f} {r['alloc_err']:>+7.1%}  "
          f"{r['total_gib']:>6.3f} {r['pred_total_before']:>6.3f} "
          f"{Row.error(r['pred_total_before'], r['total_gib']):>+7.1%}  "
          f"{r['step_s'] * 1e3:>8.1f} {r['tflops_effective']:>8.2f}", flush=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="smollm2-135m,tinyllama-1.1b")
    ap.add_argument("--bits", default="4,8,16")
    ap.add_argument("--batch-sizes", default="4,16")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--tflops", type=float, default=989.0)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    args.bits = parse_int_list(args.bits, "--bits", [4, 8, 16])
    args.batch_sizes = parse_int_list(args.batch_sizes, "--batch-sizes")

    import torch

    if not torch.cuda.is_available():
        print("no CUDA device: this check needs one", file=sys.stderr)
        return 2
    print(f"device: {torch.cuda.get_device_name()} · torch {torch.__version__} · seq {args.seq_len} "
          f"· LoRA rank {args.rank} on q,k,v,o,gate,up,down · {args.steps} timed steps", flush=True)
    rows, failures = [], []
    for model in args.models.split(","):
        r, f = check_model(model.strip(), args)
        rows += r
        failures += f
    if args.json:
        args.json.write_text(json.dumps({"args": {k: (str(v) if isinstance(v, Path) else v)
                                                  for k, v in vars(args).items()},
                                         "rows": rows, "failures": failures}, indent=2))
    print("\nchecks: " + ("all passed" if not failures else f"{len(failures)} FAILED"))
    for f in failures:
        print(f"  FAIL {f}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
