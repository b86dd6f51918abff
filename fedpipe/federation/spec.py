"""A run's settings, resolved once before anything heavy.

`RunSpec.resolve` takes the plan file and the command line's overrides, checks every one of them
(rule names, densities, counts, the run folder, a resume against what the checkpoint recorded) and
returns the settings every transport runs by, so a mistake is reported in well under a second,
before any model loads. Nothing here imports torch.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from fedpipe.cohort import count_or_fraction
from fedpipe.datasize import check_plan_data
from fedpipe.digest import file_sha256
from fedpipe.errors import FedpipeError
from fedpipe.federation.records import RunFingerprint
from fedpipe.federation.rundir import RunFolder
from fedpipe.plan import Plan, ServerPlan, check_densities, load_plan
from fedpipe.rules import rule_traits
from fedpipe.train import round_learning_rate


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
    eval_every: int
    accuracy_every: int = Field(description="Of the evaluated rounds, every Nth and the last also "
                                "measure exact match.")
    cohort: int = Field(description="Servers sampled to train each round (all: every round).")
    stratify: bool
    min_participation: int = Field(description="Replies a round needs, out of its cohort.")
    round_timeout: float
    resume: bool
    norm_bound: float | None
    clip_norm: float | None
    communication: dict[str, float | str] = {}  # --upload/--download-density/-precision overrides
    truncate_energy: float | None = None  # keep this share of the global update's energy (FLoRIST's tau)
    truncate_rank: int | None = None  # and at most this many components per module
    error_feedback: bool = True  # carry upload residuals where the rule keeps factor coordinates
    device: str = "cpu"
    completed_rounds: int = 0  # rounds the run folder already holds (a resume)
    data_warning: str | None = None  # the data file is reused across shards (task.reuse_samples)

    @classmethod
    def resolve(cls, plan_path: str | Path, *, rounds: int | None = None, out: str | Path | None = None,
                aggregation: str | None = None, resume: bool = False, local_steps: int | None = None,
                eval_samples: int | None = None, eval_every: int | None = None,
                accuracy_every: int | None = None,
                upload_density: float | None = None, download_density: float | None = None,
                upload_precision: str | None = None, download_precision: str | None = None,
                min_participation: str | int | float = "1", round_timeout: float = 3600.0,
                norm_bound: float | None = None, clip_norm: float | None = None,
                truncate_energy: float | None = None, truncate_rank: int | None = None,
                cohort: str | int | float | None = None, stratify: bool | None = None,
                error_feedback: bool = True, device: str = "cpu") -> RunSpec:
        """The run's settings; None takes the plan's value, and a norm setting of 0 turns it off."""
        plan_path = Path(plan_path)
        communication = {k: v for k, v in (("upload_density", upload_density),
                                           ("download_density", download_density),
                                           ("upload_precision", upload_precision),
                                           ("download_precision", download_precision)) if v is not None}
        plan = with_communication(load_plan(plan_path), **communication)
        rule = rule_traits(aggregation or plan.aggregation).name
        check_densities(plan.servers, rule)
        if round_timeout <= 0:
            raise FedpipeError(f"--round-timeout: must be positive seconds, got {round_timeout}")
        if truncate_energy is not None and not 0 < truncate_energy <= 1:
            raise FedpipeError(f"--truncate-energy: the share of the update's energy to keep; valid is "
                               f"0 < tau <= 1, got {truncate_energy}")
        if truncate_rank is not None and truncate_rank < 1:
            raise FedpipeError(f"--truncate-rank: valid is a rank >= 1, got {truncate_rank}")
        norm_bound = _setting("--norm-bound", norm_bound, plan.task.norm_bound)
        clip_norm = _setting("--clip-norm", clip_norm, plan.task.clip_norm)
        data_warning = check_plan_data(plan, eval_samples or plan.task.eval_samples)
        n_training = len(plan.training_members())
        cohort = cohort if cohort is not None else plan.task.cohort
        size = n_training if cohort is None else count_or_fraction("cohort", cohort, n_training)
        folder = RunFolder(Path(out) if out else Path("runs") / plan.profile.name)
        folder.claim(resume)
        spec = cls(plan_path=plan_path, plan=plan, plan_sha256=file_sha256(plan_path), folder=folder,
                   rule=rule, rounds=rounds or plan.task.rounds,
                   local_steps=local_steps or plan.task.local_steps,
                   eval_samples=eval_samples or plan.task.eval_samples,
                   eval_every=eval_every or plan.task.eval_every,
                   accuracy_every=accuracy_every or plan.task.accuracy_every,
                   cohort=size, stratify=plan.task.stratify if stratify is None else stratify,
                   min_participation=count_or_fraction("min_participation", min_participation, size),
                   round_timeout=float(round_timeout), resume=resume, norm_bound=norm_bound,
                   clip_norm=clip_norm, communication=communication, truncate_energy=truncate_energy,
                   truncate_rank=truncate_rank, error_feedback=error_feedback, device=device,
                   data_warning=data_warning)
        if resume and folder.holds_run():
            state = folder.read_state()
            differences = state.fingerprint.differences(spec.fingerprint())
            if differences:
                raise FedpipeError(f"--resume: {folder.path} was run with other settings; resume it "
                                   "with the same ones, or start a new run with --out",
                                   [f"{what}: the run has {had}, now {now}" for what, had, now in
                                    differences])
            spec = spec.model_copy(update={"completed_rounds": state.round})
        return spec

    def evaluates(self, round_index: int) -> Literal["nothing", "loss", "loss+accuracy"]:
        """What the round scores: the loss every `eval_every` rounds, exact match too on every
        `accuracy_every`-th of those; the last round both."""
        if round_index == self.rounds or round_index % (self.eval_every * self.accuracy_every) == 0:
            return "loss+accuracy"
        return "loss" if round_index % self.eval_every == 0 else "nothing"

    @property
    def carries_residuals(self) -> bool:
        """Whether servers carry what lossy uploads dropped into later rounds: asked for, and the
        rule keeps factor coordinates (fedit, hetlora), so a residual still means something."""
        return self.error_feedback and rule_traits(self.rule).keeps_factor_coordinates

    def learning_rate(self, round_index: int) -> float:
        """The servers' learning rate in round `round_index` of this run (`task.lr_schedule`)."""
        task = self.plan.task
        return round_learning_rate(task.learning_rate, task.lr_schedule, round_index, self.rounds)

    def fingerprint(self) -> RunFingerprint:
        """What a resume must keep equal (only the number of rounds may grow, and not under a
        decaying learning rate, whose schedule spans them)."""
        task, everyone = self.plan.task, len(self.plan.training_members())
        return RunFingerprint(plan=self.plan_sha256, communication=self.communication, rule=self.rule,
                              local_steps=self.local_steps, eval_samples=self.eval_samples, seed=task.seed,
                              data=data_fingerprint(self.plan), norm_bound=self.norm_bound,
                              clip_norm=self.clip_norm, truncate_energy=self.truncate_energy,
                              truncate_rank=self.truncate_rank, stratify=self.stratify,
                              error_feedback=self.error_feedback,
                              lr_rounds=None if task.lr_schedule == "constant" else self.rounds,
                              cohort=None if self.cohort == everyone else self.cohort)


def _setting(flag: str, given: float | None, planned: float | None) -> float | None:
    if given is None:
        return planned
    if not (math.isfinite(given) and given >= 0):
        raise FedpipeError(f"{flag}: must be a positive number, or 0 for off; got {given}")
    return given or None


def data_fingerprint(plan: Plan) -> str:
    """The dataset a run trains on: a file's sha256, else its source string (builtin is seeded)."""
    source = plan.task.dataset
    path = Path(plan.profile.path).parent / source
    return f"sha256:{file_sha256(path)}" if path.is_file() else source


def with_communication(plan: Plan, **overrides: float | str) -> Plan:
    """The plan with every server's upload / download density or precision overridden."""
    if not overrides:
        return plan
    try:
        servers = [ServerPlan.model_validate(s.model_dump() | overrides) for s in plan.servers]
    except ValidationError as e:
        raise FedpipeError("communication override: " + "; ".join(
            f"{'.'.join(map(str, err['loc']))}: {err['msg']}" for err in e.errors())) from None
    return plan.model_copy(update={"servers": servers})
