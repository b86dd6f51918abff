"""A run's settings, resolved once before anything heavy, and the data a plan deals its servers.

`RunSpec.resolve` takes the plan file and the command line's overrides, checks every one of them
(rule names, densities, counts, the run folder) and returns the settings every transport runs by,
so a mistake is reported in well under a second, before any model loads.
"""

from __future__ import annotations

import math
from pathlib import Path

from pydantic import BaseModel, ConfigDict, ValidationError

from fedpipe.aggregators import get_aggregator
from fedpipe.data import load_examples, partition, split_holdout
from fedpipe.digest import sha256_file
from fedpipe.errors import FedpipeError
from fedpipe.federation.rundir import RunFolder
from fedpipe.models import resolve_model_dir
from fedpipe.plan import Plan, ServerPlan, check_densities, load_plan
from fedpipe.tasks import FAMILIES, Example


class RunSpec(BaseModel):
    """Everything that makes a run that run, resolved from the plan and the overrides."""

    model_config = ConfigDict(frozen=True, arbitrary_types_allowed=True)

    plan_path: Path
    plan: Plan
    plan_sha256: str
    folder: RunFolder
    rule: str
    rounds: int
    local_steps: int
    eval_samples: int
    min_participation: int
    round_timeout: float
    resume: bool
    device: str = "cpu"

    @classmethod
    def resolve(cls, plan_path: str | Path, *, rounds: int | None = None, out: str | Path | None = None,
                aggregation: str | None = None, resume: bool = False, local_steps: int | None = None,
                eval_samples: int | None = None, upload_density: float | None = None,
                download_density: float | None = None, min_participation: str | int | float = "1",
                round_timeout: float = 3600.0, device: str = "cpu") -> RunSpec:
        plan_path = Path(plan_path)
        plan = with_densities(load_plan(plan_path), upload_density, download_density)
        rule = get_aggregator(aggregation or plan.aggregation).name
        check_densities(plan.servers, rule)
        if round_timeout <= 0:
            raise FedpipeError(f"--round-timeout: must be positive seconds, got {round_timeout}")
        folder = RunFolder(Path(out) if out else Path("runs") / plan.profile.name)
        folder.claim(resume)
        return cls(plan_path=plan_path, plan=plan, plan_sha256=sha256_file(plan_path), folder=folder,
                   rule=rule, rounds=rounds or plan.task.rounds,
                   local_steps=local_steps or plan.task.local_steps,
                   eval_samples=eval_samples or plan.task.eval_samples,
                   min_participation=parse_min_participation(min_participation, len(training_members(plan))),
                   round_timeout=float(round_timeout), resume=resume, device=device)


def with_densities(plan: Plan, upload: float | None = None, download: float | None = None) -> Plan:
    """The plan with every server's upload / download density overridden (None: the plan's)."""
    update = {k: v for k, v in (("upload_density", upload), ("download_density", download))
              if v is not None}
    if not update:
        return plan
    try:
        servers = [ServerPlan.model_validate(s.model_dump() | update) for s in plan.servers]
    except ValidationError as e:
        raise FedpipeError("density override: " + "; ".join(err["msg"] for err in e.errors())) from None
    return plan.model_copy(update={"servers": servers})


def parse_min_participation(text: str | int | float, n_servers: int) -> int:
    """Replies a round needs: "2" is a count, "0.5" (a decimal point) a fraction of the servers."""
    raw = str(text).strip()
    try:
        value = float(raw) if "." in raw else int(raw)
    except ValueError:
        value = None
    if isinstance(value, float) and 0 < value <= 1:
        return max(1, math.ceil(value * n_servers - 1e-9))
    if isinstance(value, int) and 1 <= value <= n_servers:
        return value
    raise FedpipeError(f"min_participation: {raw!r} is neither a count from 1 to {n_servers} (the "
                       "servers that train) nor a fraction in (0, 1] written with a decimal point")


def training_members(plan: Plan) -> list[tuple[str, ServerPlan]]:
    """(member, its plan entry) for every server that adapts something, in plan order."""
    members = [(m, entry) for entry in plan.servers for m in entry.members if entry.rank_pattern]
    if not members:
        raise FedpipeError("the plan adapts no matrix on any server: nothing to train")
    return members


def idle_members(plan: Plan) -> list[str]:
    return [m for entry in plan.servers for m in entry.members if not entry.rank_pattern]


def model_folder(plan: Plan) -> Path:
    """The plan's model with weights: the bundled one, or a folder (relative to its profile)."""
    beside_profile = Path(plan.profile.path).parent / plan.model
    return resolve_model_dir(str(beside_profile) if beside_profile.is_dir() else plan.model)


def plan_data(plan: Plan, n_eval: int) -> tuple[dict[str, list[Example]], list[Example]]:
    """(each training member's shard, the held-out split): a function of the plan, its seed and
    data only, so every transport and machine rebuilds the same."""
    task = plan.task
    members = training_members(plan)
    # generated data: enough of every family that a skewed (non-IID) shard never repeats examples
    needed = (sum(entry.samples for _, entry in members) + n_eval) * len(FAMILIES)
    examples = load_examples(task.dataset, n=needed if task.dataset.startswith("builtin") else None,
                             seed=task.seed)
    train_pool, held_out = split_holdout(examples, n_eval, task.seed)
    shards = partition(train_pool, {m: entry.samples for m, entry in members}, task.partition,
                       task.dirichlet_alpha, task.seed)
    return shards, held_out
