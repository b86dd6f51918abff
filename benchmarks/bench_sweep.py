"""What a 10-point budget sweep costs next to one plan (issue #6, point 4).

Measured in one run, on the shipped cluster profile (``--profile`` for another):

1. in-process, best of ``--repeat``: one ``make_plan`` and ``save_plan``; the 10-point sweep
   (memory 0.5,1,2,4,8 x bandwidth 0.25,1) by ``run_sweep`` without pictures (it writes every
   point's profile and plan); and the baseline a sweep would be without reuse: the same 10 scaled
   profiles written out, planned and saved one by one (shapes loaded and tables built each time);
2. as a user runs them (a fresh process each, best of ``--repeat``): ``fedpipe plan`` against
   ``fedpipe sweep --no-plots`` and ``fedpipe sweep`` (which also draws two PNGs).

Prints ratios to one plan. These machines are noisy: compare ratios within one run.

    PYTHONPATH=. python benchmarks/bench_sweep.py [--repeat 3]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from fedpipe.errors import FedpipeError
from fedpipe.plan import save_plan
from fedpipe.planning.strategies import make_plan
from fedpipe.planning.sweep import run_sweep, scale_profile
from fedpipe.profile import load_profile

ROOT = Path(__file__).resolve().parent.parent
AXES = {"memory": ["0.5", "1", "2", "4", "8"], "bandwidth": ["0.25", "1"]}


def best_of(repeat: int, fn) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def one_by_one(profile_path: Path, folder: Path) -> None:
    """The no-reuse baseline: every point's profile planned from its file, like 10 `fedpipe plan`s
    without the process start."""
    base = load_profile(profile_path)
    for m in AXES["memory"]:
        for b in AXES["bandwidth"]:
            scaled = scale_profile(base, memory=float(m), bandwidth=float(b))
            path = folder / f"m{m}-b{b}.yaml"
            path.write_text(yaml.safe_dump(scaled.model_dump(mode="python"), sort_keys=False))
            try:
                save_plan(make_plan(path), folder / f"m{m}-b{b}.plan.yaml")
            except FedpipeError:
                pass  # an infeasible point (the sweep records it too)


def cli(args: list[str]) -> None:
    subprocess.run([sys.executable, "-m", "fedpipe.cli", *args], check=True, capture_output=True,
                   env={**os.environ, "COLUMNS": "200"})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", default=str(ROOT / "profiles" / "cluster.yaml"))
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    profile = Path(args.profile)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        make_plan(profile)  # warm: imports, the shape card, first-use caches
        plan_s = best_of(args.repeat, lambda: save_plan(make_plan(profile), tmp / "one.plan.yaml"))
        sweep_s = best_of(args.repeat, lambda: run_sweep(profile, AXES, out_dir=tmp / "sweep"))
        naive_s = best_of(args.repeat, lambda: one_by_one(profile, tmp))
        axes = ["--memory", ",".join(AXES["memory"]), "--bandwidth", ",".join(AXES["bandwidth"])]
        cli_plan = best_of(args.repeat, lambda: cli(["plan", str(profile), "-o", str(tmp / "p.yaml")]))
        cli_sweep = best_of(args.repeat, lambda: cli(["sweep", str(profile), *axes, "--out",
                                                      str(tmp / "cli"), "--no-plots"]))
        cli_plots = best_of(args.repeat, lambda: cli(["sweep", str(profile), *axes, "--out",
                                                      str(tmp / "cli")]))
    print(f"profile {profile.name}, 10 points (memory x5, bandwidth x2), best of {args.repeat}, "
          f"load average {os.getloadavg()[0]:.1f}\n")
    print("| what | seconds | × one plan |")
    print("|---|---|---|")
    for label, s, ref in [
        ("one plan (make_plan + save_plan, in-process)", plan_s, plan_s),
        ("10-point sweep (run_sweep, no pictures)", sweep_s, plan_s),
        ("baseline: 10 plans one by one, no reuse", naive_s, plan_s),
        ("`fedpipe plan` (a fresh process)", cli_plan, cli_plan),
        ("`fedpipe sweep --no-plots`", cli_sweep, cli_plan),
        ("`fedpipe sweep` (with sweep.png and rankmap.png)", cli_plots, cli_plan),
    ]:
        print(f"| {label} | {s:.2f} | {s / ref:.2f} |")
    print(f"\nreuse makes the in-process sweep {naive_s / sweep_s:.2f}x faster than planning the "
          "points one by one")


if __name__ == "__main__":
    main()
