"""Do the cost model's predictions hold? Step time and peak memory, predicted vs measured.

Run: ``PYTHONPATH=. python benchmarks/bench_predictions.py [--profile profiles/cluster.yaml]
[--bits 4,8,16] [--batch-sizes 4,8] [--steps 3] [--threads N] [--json FILE]``

The bundled SmolLM2-135M (real weights) at every bits x batch, measured exactly as
``fedpipe calibrate`` measures (one fresh process per configuration, LoRA at rank 8 on all 210
matrices, fixed batches of batch x seq_len tokens, peak resident set of the whole process). Shown:

1. predicted / measured, before calibration (the profile's factors) and after: in-sample (fitted
   on all points) and leave-one-out (each point predicted by factors fitted on the other five,
   i.e. from the other batch size at its precision: the honest out-of-sample error).
2. step time measured interleaved (--passes > 0, the default): one process holds the model at
   every precision and takes one step of each configuration in turn, pass after pass, so a busy
   machine slows every configuration alike; the median per configuration is then calibrated
   (in-sample and leave-one-out) as above. On a shared machine only these times mean something.
3. ratios against a baseline measured in the same run (16-bit at the smallest batch): measured
   vs predicted time and memory ratios. Ratios do not depend on the declared TFLOP/s and, for the
   interleaved times, hardly on the machine's load: they test the formulas' shape.
4. the memory breakdown: process before the model, the model as held (parameters, buffers,
   quantization state), the file-backed part of the resident set, and the predicted terms.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from dataclasses import asdict, replace
from pathlib import Path

from rich.console import Console
from rich.table import Table

from fedpipe.calibrate import (
    compare,
    error_summary,
    fit_calibration,
    model_weights,
    parse_int_list,
    result_view,
    run_calibration,
    terms,
)


def interleaved_times(setup, folder: Path, configs: list[tuple[int, int]], passes: int,
                      threads: int | None, on_pass=None) -> dict[tuple[int, int], list[float]]:
    """Seconds per step of every configuration, one step of each in turn per pass (after a warm-up
    pass), in this process: load drift on a shared machine hits all configurations alike."""
    import torch

    from fedpipe.models import attach_lora, load_base

    if threads:
        torch.set_num_threads(threads)
    models, optimizers = {}, {}
    for bits in sorted({b for b, _ in configs}):
        model = attach_lora(load_base(folder, bits), setup.rank_pattern(),
                            alpha_ratio=setup.profile.candidates.lora_alpha_ratio, seed=0)
        model.train()
        models[bits] = model
        optimizers[bits] = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad],
                                             lr=setup.profile.task.learning_rate)
    vocab = next(iter(models.values())).config.vocab_size
    times: dict[tuple[int, int], list[float]] = {c: [] for c in configs}
    for p in range(passes + 1):
        order = configs[p % len(configs):] + configs[:p % len(configs)]  # rotate the order per pass
        for bits, batch in order:
            ids = torch.randint(0, vocab, (batch, setup.profile.task.seq_len),
                                generator=torch.Generator().manual_seed(0))
            start = time.perf_counter()
            loss = models[bits](input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(optimizers[bits].param_groups[0]["params"], 1.0)
            optimizers[bits].step()
            optimizers[bits].zero_grad(set_to_none=True)
            if p > 0:
                times[bits, batch].append(time.perf_counter() - start)
        if on_pass:
            on_pass(p)
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--profile", default="profiles/cluster.yaml")
    ap.add_argument("--bits", default="4,8,16")
    ap.add_argument("--batch-sizes", default="4,8")
    ap.add_argument("--steps", type=int, default=3, help="timed steps after one warm-up step "
                    "(the CPU resident set reaches its plateau by the third step)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads per process")
    ap.add_argument("--server", default=None)
    ap.add_argument("--passes", type=int, default=4, help="interleaved timing passes (0: skip)")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    bits = parse_int_list(args.bits, "--bits", [4, 8, 16])
    batches = parse_int_list(args.batch_sizes, "--batch-sizes")

    console = Console(width=160)
    start = time.perf_counter()
    result = run_calibration(args.profile, bits=bits, batch_sizes=batches, steps=args.steps,
                             server=args.server, threads=args.threads,
                             on_config=lambda b, n, i, k: console.print(
                                 f"[{i + 1}/{k}] {b}-bit batch {n} ({time.perf_counter() - start:.0f} s)"))
    console.print(result_view(result))
    worst = error_summary(result.rows)

    # 2. interleaved step times
    time_rows, time_fit, step_times = None, None, {}
    if args.passes > 0:
        configs = [(b, n) for b in bits for n in batches]
        with tempfile.TemporaryDirectory() as tmp:
            folder, _ = model_weights(result.setup.profile, Path(args.profile).parent, Path(tmp))
            step_times = interleaved_times(result.setup, folder, configs, args.passes, args.threads,
                                           on_pass=lambda p: console.print(
                                               f"interleaved pass {p}/{args.passes} "
                                               f"({time.perf_counter() - start:.0f} s)"))
        timed = [replace(m, step_s=statistics.median(step_times[m.bits, m.batch]))
                 for m in result.measurements]
        time_fit = fit_calibration(result.setup, timed, result.before)
        time_rows = compare(result.setup, timed, result.before, time_fit.calibration)
        t = Table(title=f"step time, interleaved ({args.passes} passes, median): predicted vs measured",
                  title_justify="left")
        for col in ("bits", "batch", "step s", "steps (s)", "before", "after", "leave-one-out"):
            t.add_column(col, justify="right")
        for r in time_rows:
            t.add_row(str(r.bits), str(r.batch), f"{r.measured_s:.2f}",
                      " ".join(f"{v:.1f}" for v in step_times[r.bits, r.batch]),
                      *(f"{p:.2f} ({p / r.measured_s - 1:+.0%})" if p == p else "-"
                        for p in (r.before_s, r.after_s, r.loo_s)))
        console.print(t)
        tw = error_summary(time_rows)
        c = time_fit.calibration
        console.print(f"fitted on interleaved times: utilisation {c.utilisation:.4g}, dequant_time "
                      f"{c.dequant_time} · largest |error|: before {tw['before_s']:.0%}, after "
                      f"{tw['after_s']:.1%}, leave-one-out {tw['loo_s']:.1%}")
        worst |= {f"interleaved_{k}": v for k, v in tw.items() if k.endswith("_s")}

    # 3. ratios against the baseline measured in this run
    rows = {(r.bits, r.batch): r for r in result.rows}
    trows = {(r.bits, r.batch): r for r in time_rows} if time_rows else rows
    base = rows[16, min(batches)]
    t = Table(title=f"ratios to 16-bit batch {min(batches)} (same run)", title_justify="left")
    for col in ("bits", "batch", "time measured", "time predicted", "memory measured", "memory predicted"):
        t.add_column(col, justify="right")
    tbase = trows[16, min(batches)]
    for (b, n), r in sorted(rows.items()):
        tr = trows[b, n]
        t.add_row(str(b), str(n), f"{tr.measured_s / tbase.measured_s:.2f}",
                  f"{tr.after_s / tbase.after_s:.2f}",
                  f"{r.measured_gib / base.measured_gib:.2f}", f"{r.after_gib / base.after_gib:.2f}")
    console.print(t)

    # 4. memory breakdown (GiB)
    s = result.setup
    t = Table(title="memory breakdown (GiB): measured | predicted terms", title_justify="left")
    for col in ("bits", "batch", "before model", "model held", "file-backed", "peak",
                "pred weights", "pred LoRA+logits", "pred layers x factor", "pred overhead", "step s (all)"):
        t.add_column(col, justify="right")
    cal = result.after
    for m in result.measurements:
        tm = terms(s, m.bits, m.batch)
        weights = _weights(s, m.bits)
        t.add_row(str(m.bits), str(m.batch), f"{m.runtime_gib:.3f}", f"{m.resident_gib:.3f}",
                  f"{m.file_gib:.3f}" if m.file_gib is not None else "-", f"{m.peak_gib:.3f}",
                  f"{weights:.3f}", f"{tm.fixed_gib - weights:.3f}",
                  f"{cal.activation_factor * tm.layers_gib:.3f}", f"{cal.runtime_overhead_gib:.3f}",
                  " ".join(f"{v:.1f}" for v in m.step_times))
    console.print(t)
    median_step = statistics.median(r.measured_s for r in result.rows)
    console.print(f"largest |error| — memory: before {worst['before_gib']:.1%}, after (in-sample) "
                  f"{worst['after_gib']:.1%}, leave-one-out {worst['loo_gib']:.1%} · time: before "
                  f"{worst['before_s']:.0%}, after {worst['after_s']:.1%}, leave-one-out "
                  f"{worst['loo_s']:.1%} · median step {median_step:.2f} s "
                  f"· wall {time.perf_counter() - start:.0f} s")
    if args.json:
        args.json.write_text(json.dumps({
            "args": vars(args) | {"json": str(args.json)}, "weights": result.weights,
            "before": result.before.model_dump(), "after": result.after.model_dump(),
            "rows": [asdict(r) for r in result.rows],
            "measurements": [asdict(m) for m in result.measurements],
            "interleaved": {"times": {f"{b}x{n}": v for (b, n), v in step_times.items()},
                            "after": time_fit.calibration.model_dump() if time_fit else None,
                            "rows": [asdict(r) for r in time_rows or []]},
            "worst": worst, "notes": result.notes}, indent=2))


def _weights(setup, bits: int) -> float:
    from fedpipe.planning.cost import CostModel

    return CostModel(setup.shapes, setup.profile.task, setup.profile.calibration).base_weights_gib(
        bits, setup.device)


if __name__ == "__main__":
    main()
