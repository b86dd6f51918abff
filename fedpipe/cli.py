"""The `fedpipe` command line: parse, call one function, render. No logic lives here."""

from __future__ import annotations

import functools
import json
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from fedpipe.errors import FedpipeError
from fedpipe.rules import rules_help

if TYPE_CHECKING:
    from fedpipe.importance import ImportanceReport


class Command(typer.Typer):
    """The `fedpipe` console command: first the CPU allocator (a re-exec under jemalloc where it is
    installed: `fedpipe.allocator.start_command`), then typer. Tests drive the commands through
    typer's CliRunner, which does not pass here."""

    def __call__(self, *args, **kwargs):
        from fedpipe import allocator

        try:
            allocator.start_command()
        except FedpipeError as e:
            typer.echo(f"error: {e}", err=True)
            raise SystemExit(2) from None
        return super().__call__(*args, **kwargs)


app = Command(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
              help="Plan and run federated LoRA fine-tuning across heterogeneous edge servers.")


def user_errors(fn: Callable) -> Callable:
    """Show a FedpipeError as a message on stderr with exit code 2, never a traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except FedpipeError as e:
            from fedpipe.render import console

            console(stderr=True).print(f"[bold red]error:[/] {e}", highlight=False, markup=True,
                                       soft_wrap=True)
            raise typer.Exit(2) from None

    return wrapper


def _print_version(value: bool) -> None:
    if value:
        from fedpipe import __version__

        typer.echo(f"fedpipe {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: Annotated[bool, typer.Option("--version", callback=_print_version, is_eager=True,
                                          help="Print the version and exit.")] = False,
) -> None:
    """Plan and run federated LoRA fine-tuning across heterogeneous edge servers."""


def default_plan_path(name: str) -> Path:
    return Path("plans") / f"{name}.plan.yaml"


def _say_auto_importance(choice: str, report: ImportanceReport | None, source: str | None) -> None:
    """On stderr, when `--importance auto` picked up a cached report (`importance.auto_notice`)."""
    from fedpipe.importance import auto_notice
    from fedpipe.render import console

    notice = auto_notice(choice, report, source)
    if notice:
        console(stderr=True).print(f"[bold yellow]note:[/] {notice}", highlight=False, soft_wrap=True)


@app.command()
@user_errors
def plan(
    profile: Annotated[Path, typer.Argument(help="Cluster profile YAML.")],
    output: Annotated[Path | None, typer.Option("-o", "--output", help="Plan file to write "
                                                "(default: plans/NAME.plan.yaml, "
                                                "plans/NAME.STRATEGY.plan.yaml for another strategy).")
                      ] = None,
    solver: Annotated[str | None, typer.Option(help="highs or cbc (default: highs if installed).")] = None,
    time_limit: Annotated[float, typer.Option(help="Solver time limit in seconds.")] = 60.0,
    method: Annotated[str, typer.Option(help="auto (MILP while tiny, else decomposed), milp (one "
                                        "model, --solver) or decomposed (search over the round time).")
                      ] = "auto",
    importance: Annotated[str, typer.Option(help="auto: the latest report `fedpipe importance` "
                                            "made for this model and data, else the data-free prior; "
                                            "a scorer (sensitivity, fisher, prior: cached or computed "
                                            "now); or a report file (YAML/JSON).")] = "auto",
    strategy: Annotated[str, typer.Option(help="fedpipe (the optimiser), homogeneous, uniform, "
                                          "hetlora, legend or importance-topk: the plan that rule "
                                          "makes, fitted by the same cost model.")] = "fedpipe",
    objective: Annotated[str | None, typer.Option(help="rate (quality per second of round time; "
                                                  "every server trains) or weighted (quality - "
                                                  "time_weight x round time / baseline round time). "
                                                  "Default: the profile's objective.kind (rate).")
                         ] = None,
) -> None:
    """Solve for each server's bits, batch and LoRA ranks, and write the plan."""
    from fedpipe.datasize import check_profile_data
    from fedpipe.importance import importance_for_plan
    from fedpipe.plan import save_plan
    from fedpipe.planning.strategies import DEFAULT, get_strategy, make_plan
    from fedpipe.profile import check_objective_kind, load_profile
    from fedpipe.render import console, plan_table

    chosen = get_strategy(strategy)  # a bad name fails before any work
    if objective is not None:
        check_objective_kind(objective)
    warning = check_profile_data(load_profile(profile))
    if warning:
        console(stderr=True).print(f"[bold yellow]warning:[/] {warning}", highlight=False, soft_wrap=True)
    report, source = importance_for_plan(profile, importance)
    _say_auto_importance(importance, report, source)
    result = make_plan(profile, chosen.name, solver=solver, time_limit=time_limit, method=method,
                       importance=report, importance_source=source, objective=objective)
    name = result.profile.name if chosen.name == DEFAULT else f"{result.profile.name}.{chosen.name}"
    path = save_plan(result, output or default_plan_path(name))
    out = console()
    out.print(plan_table(result))
    out.print(f"wrote {path}")


@app.command()
@user_errors
def importance(
    profile: Annotated[Path, typer.Argument(help="Cluster profile YAML.")],
    scorer: Annotated[str, typer.Option(help="sensitivity, fisher (need weights and data) or prior "
                                        "(data-free).")] = "sensitivity",
    output: Annotated[Path | None, typer.Option("-o", "--output", help="Report to write, .yaml or "
                                                ".json (default: reports/NAME.SCORER.yaml).")] = None,
    heatmap: Annotated[Path | None, typer.Option(help="Heat map PNG (default: the report's path "
                                                 "with .png).")] = None,
    batches: Annotated[int, typer.Option(help="Calibration batches per server.")] = 8,
    batch_size: Annotated[int, typer.Option(help="Examples per calibration batch.")] = 4,
    seq_len: Annotated[int | None, typer.Option(help="Tokens per sequence (default: task.seq_len).")
                       ] = None,
    seed: Annotated[int | None, typer.Option(help="Calibration seed (default: task.seed).")] = None,
    cache: Annotated[bool, typer.Option(help="Reuse a cached report for the same model, data and "
                                        "scorer.")] = True,
    top: Annotated[int, typer.Option(help="Rows of the ranked table.")] = 20,
) -> None:
    """Score every candidate matrix on each server's own data; a ranked table, report and heat map."""
    from fedpipe.importance import ScoringRequest, compute_report, save_report
    from fedpipe.importance_view import ranked_table, save_heatmap, scoring_progress
    from fedpipe.render import console

    request = ScoringRequest.make(profile, scorer, batches=batches, batch_size=batch_size,
                                  seq_len=seq_len, seed=seed)
    with scoring_progress(request.sample_weights(), batches) as progress:
        result = compute_report(request, use_cache=cache, progress=progress)
    name = request.profile.name or profile.stem
    path = save_report(result.report, output or Path("reports") / f"{name}.{request.scorer.name}.yaml")
    png = save_heatmap(result.report, heatmap or path.with_suffix(".png"))
    out = console()
    out.print(ranked_table(result.report, top))
    how = "from cache" if result.cached else "computed"
    out.print(f"{how} in {result.seconds:.1f} s · digest {result.report.digest()}"
              + (f" · cached at {result.cache_path}" if result.cache_path else ""))
    out.print(f"wrote {path}\nwrote {png}")


@app.command()
@user_errors
def diff(
    a: Annotated[Path, typer.Argument(help="Plan A.")],
    b: Annotated[Path, typer.Argument(help="Plan B.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print the diff as JSON.")] = False,
) -> None:
    """Show per server what changed between two plans, and the change in totals."""
    from fedpipe.plan import load_plan
    from fedpipe.planning.diff import diff_plans
    from fedpipe.render import console, diff_table

    d = diff_plans(load_plan(a), load_plan(b), str(a), str(b))
    if as_json:
        typer.echo(json.dumps(d.model_dump(mode="json"), indent=2))
    else:
        console().print(diff_table(d))


@app.command()
@user_errors
def run(
    plan_file: Annotated[Path, typer.Argument(metavar="PLAN", help="Plan YAML written by `fedpipe plan`.")],
    rounds: Annotated[int | None, typer.Option(min=1, help="Rounds (default: the plan's).")] = None,
    out: Annotated[Path | None, typer.Option(help="Run folder (default: runs/NAME).")] = None,
    aggregation: Annotated[str | None, typer.Option(help=f"{rules_help()} "
                                                    "(default: the plan's).")] = None,
    resume: Annotated[bool, typer.Option(help="Continue after the last completed round.")] = False,
    local_steps: Annotated[int | None, typer.Option(min=1, help="Local steps per round "
                                                    "(default: the plan's).")] = None,
    eval_samples: Annotated[int | None, typer.Option(min=1, help="Held-out examples "
                                                     "(default: the plan's).")] = None,
    eval_every: Annotated[int | None, typer.Option(min=1, help="Evaluate every N rounds, and always the "
                                                   "last (default: the plan's, 1).")] = None,
    accuracy_every: Annotated[int | None, typer.Option(min=1, help="Of the evaluated rounds, also "
                                                       "measure exact match (greedy generation) on "
                                                       "every Nth and the last; the others score the "
                                                       "loss only (default: the plan's).")] = None,
    upload_density: Annotated[float | None, typer.Option(help="Every server's upload density, top-k "
                                                         "share in (0, 1] (default: the plan's).")] = None,
    download_density: Annotated[float | None, typer.Option(help="Every server's download density "
                                                           "(default: the plan's).")] = None,
    upload_precision: Annotated[str | None, typer.Option(help="Every server's upload value precision: "
                                                         "fp32, bf16, fp16, int8, nf4, fp4, int2, int3 "
                                                         "(default: the plan's).")] = None,
    download_precision: Annotated[str | None, typer.Option(help="Every server's download value "
                                                           "precision (default: the plan's).")] = None,
    truncate_energy: Annotated[float | None, typer.Option(help="Keep only the singular components of "
                                                          "the global update carrying this share of "
                                                          "its energy, 0 < tau <= 1 (flexlora, flora).")
                               ] = None,
    truncate_rank: Annotated[int | None, typer.Option(help="Keep at most this many components of the "
                                                      "global update per module (flexlora, flora).")
                             ] = None,
    error_feedback: Annotated[bool, typer.Option("--error-feedback/--no-error-feedback", help="Carry "
                                                 "what a lossy upload dropped into the next round "
                                                 "(fedit, hetlora; in process and on resident Flower "
                                                 "nodes).")] = True,
    backend: Annotated[str, typer.Option(help="inprocess (every server in this process), flower "
                                         "(one SuperNode per server; docs/flower.md) or simulation "
                                         "(Flower's Simulation Engine: a virtual SuperNode per "
                                         "server on this machine, Ray).")] = "inprocess",
    superlink: Annotated[str | None, typer.Option(help="flower: the SuperLink's HOST:PORT (default "
                                                  "127.0.0.1:8000).")] = None,
    insecure: Annotated[bool, typer.Option(help="flower: plain HTTP to the SuperLink (trusted "
                                           "networks and tests only).")] = False,
    root_certificates: Annotated[Path | None, typer.Option(help="flower: CA certificate that signed "
                                                           "the SuperLink's (default: system CAs).")] = None,
    round_timeout: Annotated[float, typer.Option(help="Seconds a round waits for replies; who is late "
                                                 "misses the round (inprocess: a server whose own "
                                                 "training took longer).")] = 3600.0,
    cohort: Annotated[str | None, typer.Option(help="Servers sampled to train each round, a count (8) "
                                               "or a fraction (0.125) (default: the plan's task.cohort, "
                                               "else all).")] = None,
    stratify: Annotated[bool | None, typer.Option("--stratify/--no-stratify", help="Sample the cohort "
                                                  "class by class (default: the plan's).")] = None,
    min_participation: Annotated[str, typer.Option(help="Replies a round needs out of its cohort, a count "
                                                   "(2) or a fraction (0.5); a refused update counts as "
                                                   "missed.")] = "1",
    norm_bound: Annotated[float | None, typer.Option(help="Refuse an update whose norm is over this "
                                                     "multiple of the round's median; 0 = off (default: "
                                                     "the plan's task.norm_bound, 10).")] = None,
    clip_norm: Annotated[float | None, typer.Option(help="Clip every update to this norm before "
                                                    "aggregating; 0 = off (default: the plan's).")] = None,
) -> None:
    """Run the plan's federated rounds, in this process, on Flower SuperNodes (--backend flower) or on
    Flower's Simulation Engine (--backend simulation)."""
    if backend not in ("inprocess", "flower", "simulation"):
        raise FedpipeError(f"--backend: {backend!r} is not a backend (inprocess, flower, simulation)")
    overrides = dict(upload_density=upload_density, download_density=download_density,
                     upload_precision=upload_precision, download_precision=download_precision)
    if backend != "flower" and (superlink is not None or insecure or root_certificates is not None):
        raise FedpipeError(f"--superlink, --insecure, --root-certificates: only for --backend flower "
                           f"(the {backend} backend has no SuperLink)")
    if backend == "flower" and any(v is not None for v in overrides.values()):
        raise FedpipeError("--upload/--download-density/-precision: the flower backend's nodes read "
                           "them from their plan file; set them there")
    from fedpipe.federation.spec import RunSpec
    from fedpipe.render import console, run_table

    settings = dict(rounds=rounds, out=out, aggregation=aggregation, resume=resume, local_steps=local_steps,
                    eval_samples=eval_samples, eval_every=eval_every, accuracy_every=accuracy_every,
                    min_participation=min_participation,
                    round_timeout=round_timeout, norm_bound=norm_bound, clip_norm=clip_norm,
                    truncate_energy=truncate_energy, truncate_rank=truncate_rank, cohort=cohort,
                    stratify=stratify, error_feedback=error_feedback)
    spec = RunSpec.resolve(plan_file, **overrides, **settings)  # every argument checked before anything heavy
    if spec.data_warning:
        console(stderr=True).print(f"[bold yellow]warning:[/] {spec.data_warning}", highlight=False,
                                   soft_wrap=True)
    if spec.completed_rounds >= spec.rounds:
        console().print(f"{spec.folder.path} is complete: it holds {spec.completed_rounds} of "
                        f"{spec.rounds} rounds; nothing to do (--rounds N to go further)")
        return
    if backend == "flower":
        from fedpipe.flower_app import launch

        result = launch(plan_file, superlink=superlink or "127.0.0.1:8000", insecure=insecure,
                        root_certificates=root_certificates, **settings)
    elif backend == "simulation":
        from fedpipe.render import run_progress
        from fedpipe.simulation import simulate

        with run_progress() as on_progress:
            result = simulate(spec, on_progress)
    else:
        from transformers.utils import logging as hf_logging

        from fedpipe.federation.inprocess import InProcessTransport
        from fedpipe.federation.loop import run_federation
        from fedpipe.render import run_progress

        hf_logging.disable_progress_bar()  # our own bar shows rounds and servers
        with run_progress() as on_progress:
            result = run_federation(spec, InProcessTransport(spec), on_progress)
    console().print(run_table(result))


@app.command()
@user_errors
def export(
    run_dir: Annotated[Path, typer.Argument(metavar="RUN_DIR", help="Run folder `fedpipe run` wrote "
                                            "(runs/NAME).")],
    output: Annotated[Path, typer.Option("-o", "--output", help="Folder to write.")],
    rank: Annotated[int | None, typer.Option(help="Cut every module's update to at most this rank "
                                             "(vLLM's default max_lora_rank is 16).")] = None,
    energy: Annotated[float | None, typer.Option(help="Cut each module to the fewest singular values "
                                                 "keeping this share of its squared norm (0.99).")
                      ] = None,
    merge: Annotated[bool, typer.Option(help="Write a full model folder (base + update) instead of "
                                        "an adapter.")] = False,
    base: Annotated[Path | None, typer.Option(help="Base model folder (default: the one the "
                                              "adapter records).")] = None,
) -> None:
    """Export the run's global adapter for serving: a smaller rank (truncated SVD), or merged."""
    from fedpipe.export import export_run
    from fedpipe.render import console, export_view

    console().print(export_view(export_run(run_dir, output, rank=rank, energy=energy, merge=merge,
                                           base=base)), highlight=False)


@app.command()
@user_errors
def node(
    plan_file: Annotated[Path, typer.Argument(metavar="PLAN", help="The coordinator's plan file (a copy).")],
    server: Annotated[str, typer.Option(help="This machine's server: a member name of the plan.")],
    superlink: Annotated[str, typer.Option(help="The SuperLink's HOST:PORT.")] = "127.0.0.1:8000",
    insecure: Annotated[bool, typer.Option(help="Plain HTTP to the SuperLink (trusted networks and "
                                           "tests only).")] = False,
    root_certificates: Annotated[Path | None, typer.Option(help="CA certificate that signed the "
                                                           "SuperLink's (default: system CAs).")] = None,
    auth_key: Annotated[Path | None, typer.Option(help="This SuperNode's private key (ssh-keygen -t "
                                                  "ecdsa), registered on the SuperLink.")] = None,
    port: Annotated[int, typer.Option(help="Local port of this SuperNode's ClientApp API (one per node "
                                      "on a machine).")] = 9094,
    device: Annotated[str | None, typer.Option(help="cpu or cuda (default: the plan's, cpu without "
                                               "CUDA).")] = None,
    resident: Annotated[bool, typer.Option(help="Keep the base model loaded between rounds (default); "
                                           "--no-resident loads it for every round, holding no memory "
                                           "in between.")] = True,
) -> None:
    """Serve one edge server of the plan as a Flower SuperNode (runs until stopped)."""
    from fedpipe.flower_app import run_node, supernode_command

    def command(folder: Path | None) -> list[str]:
        return supernode_command(plan_file, server, superlink, insecure=insecure,
                                 root_certificates=root_certificates, auth_key=auth_key, port=port,
                                 device=device, resident=folder)

    raise typer.Exit(run_node(plan_file, server, command, device=device, resident=resident))


@app.command()
@user_errors
def sweep(
    profile: Annotated[Path, typer.Argument(help="Cluster profile YAML.")],
    memory: Annotated[str | None, typer.Option(help="Multipliers on every server's memory: 0.5,1,2.")] = None,
    bandwidth: Annotated[str | None, typer.Option(help="Multipliers on every uplink and downlink.")] = None,
    servers: Annotated[str | None, typer.Option(help="Multipliers on every entry's count (rounded, >= 1).")
                       ] = None,
    deadline: Annotated[str | None, typer.Option(help="Deadlines: seconds (60), multiples of the "
                                                 "unconstrained makespan (0.8x), or none.")] = None,
    out: Annotated[Path | None, typer.Option(help="Folder for the plans and pictures "
                                             "(default: plans/sweeps/NAME).")] = None,
    show_diff: Annotated[bool, typer.Option("--diff", help="Show `fedpipe diff` between neighbouring "
                                            "points.")] = False,
    plots: Annotated[bool, typer.Option(help="Write sweep.png and rankmap.png.")] = True,
    solver: Annotated[str | None, typer.Option(help="highs or cbc (default: highs if installed).")] = None,
    time_limit: Annotated[float, typer.Option(help="Solver time limit per point in seconds.")] = 60.0,
    method: Annotated[str, typer.Option(help="auto, milp or decomposed, as for `fedpipe plan`.")
                      ] = "auto",
    importance: Annotated[str, typer.Option(help="auto, a scorer or a report file, as for "
                                            "`fedpipe plan`.")] = "auto",
) -> None:
    """Plan every budget point ('what if half the memory?'): a table, one plan per point, plots."""
    from rich.progress import Progress

    from fedpipe.planning.diff import diff_plans
    from fedpipe.planning.sweep import parse_axis, run_sweep
    from fedpipe.render import console, diff_table, sweep_table

    axes = {name: parse_axis(name, text) for name, text in
            (("memory", memory), ("bandwidth", bandwidth), ("servers", servers), ("deadline", deadline))
            if text is not None}
    from fedpipe.importance import importance_for_plan

    report, source = importance_for_plan(profile, importance)
    _say_auto_importance(importance, report, source)
    total = 1
    for values in axes.values():
        total *= len(values)
    with Progress(console=console(stderr=True), transient=True) as bar:
        task = bar.add_task("planning budget points", total=total)
        result = run_sweep(profile, axes, out_dir=out, solver=solver, time_limit=time_limit,
                           method=method, importance=report, importance_source=source,
                           on_point=lambda p: bar.update(task, advance=1, description=p.name))
    out_console = console()
    out_console.print(sweep_table(result))
    if plots:
        from fedpipe.plots import sweep_pictures

        for path in sweep_pictures(result):
            out_console.print(f"wrote {path}")
    if show_diff:
        for a, b in result.neighbours():
            out_console.print(diff_table(diff_plans(result.plan(a), result.plan(b), a.name, b.name)))


@app.command()
@user_errors
def explain(
    plan_file: Annotated[Path, typer.Argument(metavar="PLAN", help="Plan YAML.")],
    server: Annotated[str | None, typer.Option(help="Explain only this server (entry or member name).")
                      ] = None,
    profile: Annotated[Path | None, typer.Option(help="Profile the plan was made from "
                                                 "(default: the path the plan records).")] = None,
    importance: Annotated[Path | None, typer.Option(help="Importance report the plan was made with "
                                                    "(default: the one the plan records).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the explanation as JSON.")] = False,
) -> None:
    """Why a server got its configuration: what binds, what one step better would take, what is forgone."""
    from fedpipe.plan import load_plan
    from fedpipe.planning.explain import explain_plan
    from fedpipe.render import console, explain_view

    e = explain_plan(load_plan(plan_file), str(plan_file), server, profile, importance)
    if as_json:
        typer.echo(json.dumps(e.model_dump(mode="json"), indent=2))
    else:
        console().print(explain_view(e))


@app.command()
@user_errors
def show(
    plan_file: Annotated[Path, typer.Argument(metavar="PLAN", help="Plan YAML.")],
    png: Annotated[Path | None, typer.Option(help="Also draw the rank map as a PNG here.")] = None,
) -> None:
    """A plan for a person: tables, predictions against budgets, the per-layer rank map."""
    from fedpipe.plan import load_plan
    from fedpipe.plots import plan_layout, rank_map, rank_map_png
    from fedpipe.render import console, show_view

    p = load_plan(plan_file)
    rm = rank_map(p, *plan_layout(p))
    out = console()
    out.print(show_view(p, rm))
    if png is not None:
        out.print(f"wrote {rank_map_png([(p.profile.name, rm)], png, columns=1)}")


@app.command()
@user_errors
def calibrate(
    profile: Annotated[Path, typer.Argument(help="Cluster profile YAML (its model, task and targets).")],
    bits: Annotated[str, typer.Option(help="Base precisions to measure, comma-separated; must "
                                      "include 16.")] = "4,8,16",
    batch_sizes: Annotated[str, typer.Option(help="Batch sizes to measure, comma-separated.")] = "4,8",
    steps: Annotated[int, typer.Option(help="Timed steps per configuration, after one warm-up.")] = 3,
    server: Annotated[str | None, typer.Option(help="The profile's server this machine stands for "
                                               "(its tflops); default: the first of this device.")] = None,
    rank: Annotated[int, typer.Option(help="LoRA rank on every candidate matrix.")] = 8,
    output: Annotated[Path, typer.Option("-o", "--output", help="YAML file for the `calibration:` "
                                         "block to paste into the profile.")] = Path("calibration.yaml"),
    quality: Annotated[bool, typer.Option("--quality", help="Measure the quality model instead: "
                                          "probe runs that fit rank gains, per-type shares, the batch "
                                          "exponent and what 4/8-bit bases keep (the options above "
                                          "are for the cost side).")] = False,
    probe_steps: Annotated[int, typer.Option(help="--quality: training steps per probe.")] = 20,
    seeds: Annotated[str, typer.Option(help="--quality: seeds to average each probe over, "
                                       "comma-separated.")] = "0",
    eval_samples: Annotated[int, typer.Option(help="--quality: held-out examples.")] = 64,
) -> None:
    """Measure step time and peak memory here; fit the cost model's factors; write a calibration block.
    With --quality: measure and fit the quality model (fedpipe/quality.py) instead."""
    import sys

    from rich.progress import Progress

    from fedpipe.calibrate import parse_int_list, result_view, run_calibration, write_calibration
    from fedpipe.render import console

    command = "fedpipe " + " ".join(sys.argv[1:])
    if quality:
        from fedpipe.quality import parse_seeds, quality_view, run_quality_probes, write_quality

        with Progress(console=console(stderr=True), transient=True) as bar:
            task = bar.add_task("probing", total=None)
            result = run_quality_probes(
                profile, steps=probe_steps, seeds=parse_seeds(seeds), eval_samples=eval_samples,
                on_probe=lambda label, i, k: bar.update(task, total=k, completed=i,
                                                        description=f"probe: {label}"))
        out = console()
        out.print(quality_view(result))
        out.print(f"wrote {write_quality(result, output, command)}")
        return
    with Progress(console=console(stderr=True), transient=True) as bar:
        task = bar.add_task("measuring", total=None)
        result = run_calibration(
            profile, bits=parse_int_list(bits, "--bits", [4, 8, 16]),
            batch_sizes=parse_int_list(batch_sizes, "--batch-sizes"), steps=steps, server=server,
            rank=rank, on_config=lambda b, n, i, k: bar.update(
                task, total=k, completed=i, description=f"measuring {b}-bit, batch {n}"))
    out = console()
    out.print(result_view(result))
    out.print(f"wrote {write_calibration(result, output, command)}")


if __name__ == "__main__":
    app()
