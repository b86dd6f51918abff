"""The `fedpipe` command line: parse, call one function, render. No logic lives here."""

from __future__ import annotations

import functools
import json
from collections.abc import Callable
from pathlib import Path
from typing import Annotated

import typer

from fedpipe.errors import FedpipeError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
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


def default_plan_path(name: str) -> Path:
    return Path("plans") / f"{name}.plan.yaml"


@app.command()
@user_errors
def plan(
    profile: Annotated[Path, typer.Argument(help="Cluster profile YAML.")],
    output: Annotated[Path | None, typer.Option("-o", "--output", help="Plan file to write "
                                                "(default: plans/NAME.plan.yaml).")] = None,
    solver: Annotated[str | None, typer.Option(help="highs or cbc (default: highs if installed).")] = None,
    time_limit: Annotated[float, typer.Option(help="Solver time limit in seconds.")] = 60.0,
    importance: Annotated[Path | None, typer.Option(help="Importance report (YAML/JSON) to plan with.")] = None,
) -> None:
    """Solve for each server's bits, batch and LoRA ranks, and write the plan."""
    from fedpipe.plan import save_plan
    from fedpipe.planner import make_plan
    from fedpipe.render import console, plan_table

    report = source = None
    if importance is not None:
        from fedpipe.importance import load_report

        report, source = load_report(importance), str(importance)
    result = make_plan(profile, solver=solver, time_limit=time_limit, importance=report,
                       importance_source=source)
    path = save_plan(result, output or default_plan_path(result.profile.name))
    out = console()
    out.print(plan_table(result))
    out.print(f"wrote {path}")


@app.command()
@user_errors
def diff(
    a: Annotated[Path, typer.Argument(help="Plan A.")],
    b: Annotated[Path, typer.Argument(help="Plan B.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print the diff as JSON.")] = False,
) -> None:
    """Show per server what changed between two plans, and the change in totals."""
    from fedpipe.diff import diff_plans
    from fedpipe.plan import load_plan
    from fedpipe.render import console, diff_table

    d = diff_plans(load_plan(a), load_plan(b), str(a), str(b))
    if as_json:
        typer.echo(json.dumps(d.model_dump(mode="json"), indent=2))
    else:
        console().print(diff_table(d))


if __name__ == "__main__":
    app()
