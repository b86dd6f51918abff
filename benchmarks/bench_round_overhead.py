"""Round overhead: how much of a federated round is not local training?

Run: ``PYTHONPATH=. python benchmarks/bench_round_overhead.py [--plan plans/cluster.plan.yaml]
[--local-steps N] [--eval-samples N] [--rounds 1] [--threads N] [--json FILE]
[--backends inprocess,flower,flower-per-message]``

A real `fedpipe run` of the plan (default: the shipped cluster plan on the bundled SmolLM2-135M,
six servers at 4, 8 and 16 bits, flexlora) in this process, with every phase of
`fedpipe.federation.inprocess.run_plan` timed by wrapping the functions it calls (nothing in the loop is
changed). The baseline is the run's own local training (`train_steps`, the AdamW steps); every
other phase is reported as seconds and as a share of the round:

  setup   tokenizer, data, tokenising shards, loading + quantizing + LoRA per plan entry,
          the evaluation model (once per run)
  round   per server: apply the broadcast, reset/set factors, local training, serialise the update;
          coordinator: broadcast, aggregate; memory metric; evaluation (merge + loss + generation);
          saving the peft adapter and the checkpoint
  after   metrics.jsonl and the curves PNG

The target (issue "Performance", 3) is overhead <= 15% of the round. Shown: per round (the
runner's round_s), and with the one-time setup spread over the plan's rounds. With
--local-steps below the plan's, training time is also projected linearly to the plan's steps
(the overhead does not depend on the step count), and that projection is labelled as such.

Backends (``--backends inprocess,flower,flower-per-message``): the same plan (default: the
quickstart profile's phone and workstation, a 2-server plan on the bundled SmolLM2) run once per
backend, one after another, every process at --threads torch threads (default 1). Flower runs on
127.0.0.1: a SuperLink and one `fedpipe node` per server, with their resident trainer
(``flower``) or loading the model for every message (``flower-per-message``, `--no-resident`).
Overhead = round wall time (the loop's round_s) minus the training on the round's critical path:
the sum of the servers' train_s in process (one after another), their maximum on Flower (in
parallel). The nodes' load time (their logs) is scaled to Llama-2-7B by weight bytes. The
benchmark starts itself as the `fedpipe` command does (under jemalloc where installed), so the
in-process trainers and the nodes' run on the same allocator.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from contextlib import contextmanager
from pathlib import Path

import torch

import fedpipe.client as client
import fedpipe.federation.inprocess as inprocess
import fedpipe.federation.loop as loop
import fedpipe.federation.spec as spec
import fedpipe.metrics as metrics
from fedpipe.federation.coordinator import Coordinator
from fedpipe.federation.rundir import RunFolder
from fedpipe.plan import load_plan

SECONDS: dict[str, float] = defaultdict(float)
CALLS: dict[str, int] = defaultdict(int)

# (owner, attribute, phase): the functions run_plan calls, as the loop and client look them up
PHASES = [
    (inprocess, "load_tokenizer", "setup: tokenizer"),
    (loop, "load_tokenizer", "setup: tokenizer"),
    (spec, "load_examples", "setup: data (examples, hold-out, partition)"),
    (spec, "split_holdout", "setup: data (examples, hold-out, partition)"),
    (spec, "partition", "setup: data (examples, hold-out, partition)"),
    (client.EdgeTrainer, "__init__", "setup: tokenise shards"),
    (client.AdaptedModel, "load", "setup: load + quantize + attach LoRA"),
    (loop, "load_base", "setup: load evaluation model"),
    (Coordinator, "broadcast", "round: coordinator broadcast"),
    (client.EdgeTrainer, "train_round", "client round (total)"),
    (client, "train_steps", "round: local training (baseline)"),
    (inprocess, "resident_gib", "round: memory metric"),
    (Coordinator, "aggregate", "round: aggregate (decode + rule)"),
    (loop, "apply_base_delta", "round: eval merge global update"),
    (loop, "evaluate", "round: eval loss + generation"),
    (loop, "save_adapter", "round: save peft adapter"),
    (RunFolder, "save_checkpoint", "round: save checkpoint"),
    (metrics, "write_metrics", "after: metrics.jsonl"),
    (metrics, "plot_rounds", "after: curves PNG"),
]


def _timed(fn, phase: str):
    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            SECONDS[phase] += time.perf_counter() - start
            CALLS[phase] += 1
    return wrapper


@contextmanager
def instrumented():
    """Wrap every function of PHASES with a timer; restore them afterwards."""
    saved = []
    for owner, attr, phase in PHASES:
        original = inspect.getattr_static(owner, attr)
        if isinstance(original, classmethod):
            wrapped = classmethod(_timed(original.__func__, phase))
        else:
            wrapped = _timed(getattr(owner, attr), phase)
        setattr(owner, attr, wrapped)
        saved.append((owner, attr, original))
    try:
        yield
    finally:
        for owner, attr, original in reversed(saved):
            setattr(owner, attr, original)


LLAMA2_7B_FP16_BYTES = 6.74e9 * 2  # its released checkpoint: 6.74 B parameters in fp16


def two_server_plan(folder: Path) -> Path:
    """The quickstart profile without its laptop: phone (4-bit) and workstation (16-bit)."""
    import yaml

    from fedpipe.plan import save_plan
    from fedpipe.planning.strategies import make_plan

    profile = yaml.safe_load(Path("profiles/quickstart.yaml").read_text())
    profile["name"] = "quickstart-two"
    profile["servers"] = [s for s in profile["servers"] if s["name"] != "laptop"]
    (folder / "two.yaml").write_text(yaml.safe_dump(profile))
    return save_plan(make_plan(folder / "two.yaml"), folder / "two.plan.yaml")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def flower_rows(plan_path: Path, folder: Path, resident: bool, threads: int, **settings) -> tuple[list, dict]:
    """A Flower run of the plan on 127.0.0.1 (SuperLink + one `fedpipe node` per server): its metrics
    rows and each server's load seconds: at node start (resident trainer, its log), else every
    round's setup seconds as its replies reported them."""
    from fedpipe.flower_app import flower_command, flower_env, launch
    from fedpipe.plan import load_plan

    env = flower_env(folder / "flwr-home") | {"OMP_NUM_THREADS": str(threads), "PYTHONPATH": os.getcwd()}
    port = free_port()
    procs = []

    def start(command: list[str], name: str) -> None:
        with open(folder / f"{name}.log", "w") as log:
            procs.append(subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT,
                                          stdin=subprocess.DEVNULL, start_new_session=True))

    servers = [m for m, _ in load_plan(plan_path).training_members()]
    try:
        start([flower_command("flower-superlink"), "--insecure", "--host", "127.0.0.1", "--port", str(port),
               "--disable-runtime-dependency-installation"], "superlink")
        for server in servers:
            start([sys.executable, "-m", "fedpipe.cli", "node", str(plan_path), "--server", server,
                   "--superlink", f"127.0.0.1:{port}", "--insecure", "--port", str(free_port()),
                   *([] if resident else ["--no-resident"])], f"node-{server}")
        deadline = time.time() + 120  # the SuperLink listening (its ServerApp inherits env: the threads)
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert time.time() < deadline, (folder / "superlink.log").read_text()
                time.sleep(0.3)
        lines: list[str] = []
        result = launch(plan_path, superlink=f"127.0.0.1:{port}", insecure=True, out=folder / "run",
                        round_timeout=900, echo=lines.append, **settings)
    finally:
        for proc in reversed(procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(20)
                except subprocess.TimeoutExpired:
                    pass
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            proc.wait()
    loads = {}
    for server in servers:
        found = re.search(r"loaded in ([0-9.]+) s", (folder / f"node-{server}.log").read_text())
        setups = [float(x) for x in re.findall(rf"round \d+: {server} trained .* after ([0-9.]+) s of setup",
                                                "\n".join(lines))]
        loads[server] = [float(found.group(1))] if found else setups
    return result.rows, loads


def overhead(rows: list[dict], parallel: bool) -> dict:
    """Round wall time against the training on its critical path, summed over the rounds."""
    per_round = [r["round_s"] - (max if parallel else sum)(s["train_s"] for s in r["servers"]) for r in rows]
    round_s = sum(r["round_s"] for r in rows)
    evaluate = sum(r["eval_s"] + r["aggregate_s"] for r in rows)
    return {"rounds": len(rows), "round_s": round_s, "train_critical_s": round_s - sum(per_round),
            "overhead_s": sum(per_round), "share": sum(per_round) / round_s, "aggregate_eval_s": evaluate,
            "transport_s": sum(per_round) - evaluate, "per_round_overhead_s": per_round}


def compare_backends(args) -> None:
    """One run per backend of the same plan; overhead outside training, as a share of the round."""
    from transformers.utils import logging as hf_logging

    from fedpipe import allocator

    hf_logging.disable_progress_bar()
    threads = args.threads or 1
    torch.set_num_threads(threads)
    load_before = os.getloadavg()
    results, loads = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        plan_path = Path(args.plan) if args.plan else two_server_plan(tmp)
        settings = dict(rounds=args.rounds, local_steps=args.local_steps, eval_samples=args.eval_samples)
        for backend in args.backends.split(","):
            folder = tmp / backend
            folder.mkdir()
            start = time.perf_counter()
            if backend == "inprocess":
                rows = inprocess.run_plan(plan_path, out=folder / "run", **settings).rows
            else:
                rows, loads[backend] = flower_rows(plan_path, folder, backend == "flower", threads,
                                                   **settings)
            results[backend] = overhead(rows, parallel=backend != "inprocess") | {
                "wall_s": time.perf_counter() - start, "eval_loss": [r["eval"]["loss"] for r in rows],
                "missed": [r["missed_servers"] for r in rows]}
        bytes_here = sum(f.stat().st_size for f in plan_model_folder(plan_path).glob("*.safetensors"))
    load_after = os.getloadavg()
    print(f"plan {args.plan or 'quickstart without laptop (phone 4-bit, workstation 16-bit)'}: {args.rounds} "
          f"rounds, {args.local_steps} local steps, {args.eval_samples} eval examples, torch threads "
          f"{threads}, allocator {allocator.running()}; load average before {load_before[0]:.1f}, after "
          f"{load_after[0]:.1f}")
    print(f"{'backend':<20}{'rounds s':>10}{'training':>10}{'overhead':>10}{'share':>8}{'eval+agg':>10}"
          f"{'transport':>11}  per round overhead s")
    for backend, r in results.items():
        print(f"{backend:<20}{r['round_s']:>10.1f}{r['train_critical_s']:>10.1f}{r['overhead_s']:>10.1f}"
              f"{r['share']:>8.1%}{r['aggregate_eval_s']:>10.1f}{r['transport_s']:>11.1f}  "
              + ", ".join(f"{x:.1f}" for x in r["per_round_overhead_s"]))
    for backend, r in results.items():
        for round_index, missed in enumerate(r["missed"], 1):
            for server, why in missed.items():
                print(f"{backend}: round {round_index}: {server} missed it: {why}")
    if "inprocess" in results:
        for backend in results.keys() - {"inprocess"}:
            print(f"{backend} overhead / in-process overhead: "
                  f"{results[backend]['overhead_s'] / results['inprocess']['overhead_s']:.2f}")
    for backend, by_server in loads.items():
        for server, all_seconds in by_server.items():
            seconds = statistics.median(all_seconds)
            scale = LLAMA2_7B_FP16_BYTES / bytes_here
            print(f"{backend}: {server} loaded its base in {seconds:.1f} s (median of {len(all_seconds)}; "
                  f"{bytes_here / 1e6:.0f} MB of "
                  f"weights); Llama-2-7B ({LLAMA2_7B_FP16_BYTES / 1e9:.1f} GB fp16) scaled by weight bytes "
                  f"(x{scale:.0f}): {seconds * scale / 60:.1f} min, paid "
                  + ("once per node" if backend == "flower" else "every round on every node"))
    if args.json:
        args.json.write_text(json.dumps({"args": vars(args) | {"json": str(args.json)}, "results": results,
                                         "load_before": load_before, "load_after": load_after,
                                         "loads": loads}, indent=2, default=str))


def plan_model_folder(plan_path: Path) -> Path:
    from fedpipe.models import plan_model_dir
    from fedpipe.plan import load_plan

    return plan_model_dir(load_plan(plan_path))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--plan", default=None, help="default: the shipped cluster plan; with --backends, a "
                    "2-server quickstart plan")
    ap.add_argument("--backends", default=None, help="compare these backends instead: inprocess, flower, "
                    "flower-per-message (comma-separated)")
    ap.add_argument("--local-steps", type=int, default=None, help="default: the plan's")
    ap.add_argument("--eval-samples", type=int, default=None, help="default: the plan's")
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    if args.backends:
        from fedpipe import allocator

        allocator.start_command()  # every backend's trainers on the allocator the `fedpipe` command picks
        args.local_steps, args.eval_samples = args.local_steps or 3, args.eval_samples or 8
        return compare_backends(args)
    args.plan = args.plan or "plans/cluster.plan.yaml"
    if args.threads:
        torch.set_num_threads(args.threads)
    plan = load_plan(args.plan)
    steps = args.local_steps or plan.task.local_steps
    n_eval = args.eval_samples or plan.task.eval_samples

    with tempfile.TemporaryDirectory() as tmp, instrumented():
        start = time.perf_counter()
        result = inprocess.run_plan(args.plan, rounds=args.rounds, out=Path(tmp) / "run", local_steps=steps,
                                 eval_samples=n_eval)
        wall = time.perf_counter() - start

    rows = result.rows
    rounds = len(rows)
    round_s = sum(r["round_s"] for r in rows)
    train = SECONDS["round: local training (baseline)"]
    SECONDS["round: client apply broadcast + serialise update"] = (
        SECONDS.pop("client round (total)") - train)
    setup = sum(v for k, v in SECONDS.items() if k.startswith("setup"))
    after = sum(v for k, v in SECONDS.items() if k.startswith("after"))
    in_round = sum(v for k, v in SECONDS.items() if k.startswith("round"))
    SECONDS["round: other (untimed glue)"] = round_s - in_round
    SECONDS["setup: other (untimed glue)"] = wall - round_s - after - setup
    setup = wall - round_s - after

    print(f"plan {args.plan}: {len(rows[0]['servers'])} servers, {rounds} round(s), {steps} local steps, "
          f"{n_eval} eval examples, torch threads {torch.get_num_threads()}, wall {wall:.0f} s")
    print(f"{'phase':<52}{'seconds':>9}{'calls':>7}{'% round':>9}{'% run':>8}")
    for phase in sorted(SECONDS, key=lambda k: (k.split(":")[0] != "setup", k.split(":")[0] == "after", k)):
        share = f"{SECONDS[phase] / round_s:>8.1%}" if phase.startswith("round") else f"{'':>8}"
        print(f"{phase:<52}{SECONDS[phase]:>9.1f}{CALLS.get(phase, 0):>7}{share:>9}"
              f"{SECONDS[phase] / wall:>8.1%}")
    per_server = [(s["server"], s["bits"], s["batch_size"], s["train_s"], s["tokens"])
                  for s in rows[0]["servers"]]
    print("local training per server (round 1): " + ", ".join(
        f"{n} {b}-bit b{bs}: {t:.0f} s ({t / steps:.1f} s/step)" for n, b, bs, t, _ in per_server))
    overhead = round_s - train
    plan_rounds = plan.task.rounds
    amortised = (overhead + (setup + after) / plan_rounds * rounds) / (round_s + (setup + after)
                                                                         / plan_rounds * rounds)
    summary = {
        "wall_s": wall, "round_s": round_s, "train_s": train, "overhead_s": overhead,
        "overhead_share_of_round": overhead / round_s,
        "setup_s": setup, "after_s": after,
        "overhead_share_with_setup_over_plan_rounds": amortised,
        "overhead_share_with_setup_this_run": (wall - train) / wall,
        "phases": dict(SECONDS),
        "eval_s_per_example": SECONDS["round: eval loss + generation"] / rounds / n_eval,
        "median_step_s": statistics.median(t / steps for *_, t, _ in per_server),
    }
    print(f"\noverhead per round (runner's round_s - local training): {overhead:.1f} s of {round_s:.1f} s "
          f"= {overhead / round_s:.1%} (target <= 15%)")
    print(f"with setup ({setup:.1f} s) and metrics/plot ({after:.1f} s) spread over the plan's {plan_rounds} "
          f"rounds: {amortised:.1%}; all of this {rounds}-round run: {(wall - train) / wall:.1%}")
    if steps < plan.task.local_steps:
        scale = plan.task.local_steps / steps
        proj = overhead / (overhead + train * scale)
        summary["projected_share_at_plan_steps"] = proj
        print(f"projected to the plan's {plan.task.local_steps} local steps (training x {scale:.1f}, "
              f"overhead unchanged): {proj:.1%}")
    if args.json:
        args.json.write_text(json.dumps({"args": vars(args) | {"json": str(args.json)}, "summary": summary,
                                         "rows": rows}, indent=2, default=str))


if __name__ == "__main__":
    main()
