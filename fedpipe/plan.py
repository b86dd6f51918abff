"""The plan: what each server runs (bits, batch, ranks per module) and what it is predicted to cost.

A plan is YAML validated by pydantic, with a schema version. It loads back to an equal object;
each server's ``rank_pattern`` (full module names, absent = not adapted) feeds peft's
``LoraConfig(rank_pattern=...)`` unchanged.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from fedpipe.atomic import write_atomic
from fedpipe.cache import cache_dir
from fedpipe.errors import FedpipeError
from fedpipe.precision import WirePrecision
from fedpipe.profile import (
    Bits,
    ObjectiveKind,
    Selection,
    Task,
    field_path,
    is_data_path,
    is_model_folder,
    is_plan,
    read_yaml,
    resolve_against,
)
from fedpipe.rules import AggregationRule, rule_traits

SCHEMA_VERSION = 1
Constraint = Literal["memory", "round_time", "deadline"]
SolverStatus = Literal["optimal", "feasible", "infeasible", "not_solved"]
# ImportanceRef.source of a plan made with the planner's data-free depth prior (no report file)
BUILTIN_PRIOR_SOURCE = "builtin prior"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Prediction(_Strict):
    """The cost model's prediction for one server's configuration."""

    memory_gib: float = Field(description="Predicted peak training memory.")
    memory_budget_gib: float = Field(description="The server's memory budget.")
    compute_s: float = Field(description="Local training time per round.")
    upload_s: float
    download_s: float
    round_s: float = Field(description="compute + upload + download.")
    upload_bytes: int = Field(description="Adapter bytes sent per round at the upload density "
                              "(values and mask; the payload's header, about 0.4-0.7 KB per "
                              "adapted matrix, comes on top).")
    download_bytes: int = Field(description="Adapter bytes received per round (likewise).")
    lora_params: int = Field(description="Trainable LoRA parameters.")


class ServerPlan(_Strict):
    """One profile entry's configuration; `count` identical servers share it."""

    name: str
    count: int = 1
    members: list[str] = Field(description="Names of the individual servers.")
    samples: int = Field(description="Local samples per server.")
    device: Literal["cuda", "cpu"] = "cuda"
    bits: Bits
    batch_size: int
    rank_pattern: dict[str, int] = Field(description="Full module name -> LoRA rank (absent = not adapted).")
    lora_alpha_ratio: float = Field(2.0, description="alpha = ratio x rank for every module.")
    importance_covered: float = Field(description="Share of importance adapted, rank-weighted, in [0, 1].")
    predicted: Prediction
    binding: list[Constraint] = Field(default_factory=list,
                                      description="Constraints within 1% of their limit.")
    upload_density: float = Field(1.0, description="Share of each uploaded factor's entries sent: "
                                  "top-k by magnitude of the update since the round's start "
                                  "(1 = dense).")
    download_density: float = Field(1.0, description="Share of each downloaded factor's entries "
                                    "sent: top-k of the change since the previous broadcast "
                                    "(1 = dense).")
    upload_precision: WirePrecision = Field("fp32", description="How uploaded values travel: fp32, "
                                            "bf16, fp16, or blockwise int8 / nf4 / fp4 / int2 / "
                                            "int3 (64 values per float32 scale); see "
                                            "fedpipe.precision.")
    download_precision: WirePrecision = Field("fp32", description="How downloaded values travel "
                                              "(likewise).")

    @field_validator("upload_density", "download_density")
    @classmethod
    def _density_in_range(cls, value: float, info: ValidationInfo) -> float:
        if not 0.0 < value <= 1.0:
            raise ValueError(f"server {info.data.get('name')!r}: {info.field_name} {value!r} is out "
                             "of range; valid is 0 < density <= 1")
        return value

    def alpha_pattern(self) -> dict[str, float]:
        """peft's ``alpha_pattern`` for this server (see `alpha_pattern`)."""
        return alpha_pattern(self.rank_pattern, self.lora_alpha_ratio)

    def scales(self) -> dict[str, float]:
        """peft's scaling alpha / r per adapted module: the ratio, whatever the rank (what the
        aggregation rules fold into the factors)."""
        return {name: self.lora_alpha_ratio for name, r in self.rank_pattern.items() if r > 0}


def alpha_pattern(ranks: dict[str, int], alpha_ratio: float) -> dict[str, float]:
    """LoRA alpha per adapted module: alpha = ratio x rank, so peft's scaling alpha / r is the
    ratio on every module whatever its rank (the one place alpha is derived from a rank)."""
    return {name: alpha_ratio * r for name, r in ranks.items() if r > 0}


class SolverReport(_Strict):
    """What the solver actually proved: status, relative gap, time."""

    solver: str
    status: SolverStatus
    gap: float | None = Field(None, description="Relative MIP gap when known (0 = proven optimal).")
    solve_time_s: float
    objective: float | None = None
    time_limit_s: float | None = None
    method: str = Field("milp", description="milp (one model) or decomposed (search over T).")
    dinkelbach_iterations: int | None = Field(
        None, description="MILP solves Dinkelbach's method took (the rate objective by MILP).")


class Summary(_Strict):
    """Totals over the federation for one plan (or for its homogeneous baseline)."""

    makespan_s: float = Field(description="Round time of the slowest server.")
    quality: float = Field(description="Sample-weighted importance covered, incl. precision loss.")
    upload_bytes: int = Field(description="Bytes uploaded by all servers per round.")
    download_bytes: int = Field(description="Bytes downloaded by all servers per round.")
    cohort: int | None = Field(None, description="Servers sampled per round (task.cohort; null: all).")
    cohort_makespan_s: float | None = Field(None, description="Expected round time of a sampled cohort "
                                            "(its slowest member).")
    cohort_makespan_p90_s: float | None = Field(None, description="90th percentile over cohorts.")


class Baseline(_Strict):
    """The homogeneous plan: every server forced to what the weakest can run."""

    bits: Bits
    batch_size: int
    adapted_matrices: int
    lora_params: int
    summary: Summary
    limited_by: list[str] = Field(description="Servers whose memory decides the common configuration.")


class ProfileRef(_Strict):
    path: str
    sha256: str
    name: str


class ImportanceRef(_Strict):
    scorer: str
    digest: str
    source: str = Field(description=f"{BUILTIN_PRIOR_SOURCE!r} or the report's path.")


class Plan(_Strict):
    """A complete, runnable plan."""

    schema_version: Literal[1] = SCHEMA_VERSION
    profile: ProfileRef
    model: str
    task: Task
    aggregation: AggregationRule
    strategy: str = Field("fedpipe", description="The allocation rule that made the plan: fedpipe "
                          "(the optimiser) or a peer strategy (`fedpipe plan --strategy`).")
    importance: ImportanceRef
    selection: Selection = Field(
        "importance", description="How matrices were chosen (the profile's candidates.selection): "
        "by importance alone, or spread over layers and types.")
    objective_kind: ObjectiveKind = Field(
        "weighted", description="weighted: quality - time_weight x makespan / reference time; "
        "rate: quality / makespan (per second).")
    objective_time_weight: float
    reference_time_s: float = Field(description="Time scale of the objective (baseline makespan).")
    deadline_s: float | None = None
    solver: SolverReport
    summary: Summary
    baseline: Baseline | None
    servers: list[ServerPlan]

    @model_validator(mode="after")
    def _downloads_fit_rule(self) -> Plan:
        check_densities(self.servers, self.aggregation, error=ValueError)
        return self

    def server(self, name: str) -> ServerPlan:
        """The entry serving `name` (an entry name or one of its members)."""
        for s in self.servers:
            if name == s.name or name in s.members:
                return s
        raise FedpipeError(f"server {name!r} is not in the plan",
                           [f"servers: {', '.join(m for s in self.servers for m in s.members)}"])

    def training_members(self) -> list[tuple[str, ServerPlan]]:
        """(member, its entry) for every server that adapts something, in plan order."""
        members = [(m, entry) for entry in self.servers for m in entry.members if entry.rank_pattern]
        if not members:
            raise FedpipeError("the plan adapts no matrix on any server: nothing to train")
        return members

    def idle_members(self) -> list[str]:
        """Servers the plan gives nothing to adapt: they never train."""
        return [m for entry in self.servers for m in entry.members if not entry.rank_pattern]


def check_densities(servers: list[ServerPlan], rule: str,
                    error: type[Exception] = FedpipeError) -> None:
    """Lossy downloads (sparse, or a precision below fp32) need a rule whose broadcast a later round
    can correct (``fedpipe.rules``: sparse_download); rules that merge each round's update into the
    base for good (flora) get it exact. One check for plan validation, the runner and the
    coordinator."""
    if rule_traits(rule).sparse_download:
        return
    why = (f"with aggregation {rule!r}; valid is {{}} (it merges each round's update into the base for "
           "good: a lossy copy of it would leave that server's base off the global model)")
    problems = [f"server {s.name!r}: download_density {s.download_density:g} " + why.format("1")
                for s in servers if s.download_density < 1.0]
    problems += [f"server {s.name!r}: download_precision {s.download_precision} " + why.format("fp32")
                 for s in servers if s.download_precision != "fp32"]
    if problems:
        raise error("; ".join(problems))


# libyaml's C emitter gives the same text 6-7x faster than the pure-Python one (`read_yaml`
# parses with libyaml's parser likewise)
_Dumper = getattr(yaml, "CSafeDumper", yaml.SafeDumper)


def to_yaml(data: object) -> str:
    """YAML text in the given key order, by libyaml's C emitter where installed."""
    return yaml.dump(data, Dumper=_Dumper, sort_keys=False, width=120)


def save_plan(plan: Plan, path: str | Path) -> Path:
    """Write the plan as YAML, atomically; its paths are written relative to the plan file, so
    the plan works from any working folder and moves with its profile, model and data."""
    path = Path(path)
    start = os.path.abspath(path.parent)

    def relative(p: str) -> str:
        full = os.path.abspath(Path(p).expanduser())
        if Path(full).is_relative_to(cache_dir()):  # a cached report stays where the cache is
            return full
        return os.path.relpath(full, start)

    portable = _map_paths(plan, relative, lambda d: relative(d) if os.path.isabs(d) else d)
    return write_atomic(path, to_yaml(portable.model_dump(mode="json")))


def load_plan(path: str | Path) -> Plan:
    """Read and validate a plan; problems name the field; its paths come back absolute."""
    path = Path(path)
    raw = read_yaml(path, "plan")
    if isinstance(raw, dict) and not is_plan(raw) and "servers" in raw:
        raise FedpipeError(f"{path} is a profile, not a plan: make its plan with "
                           f"`fedpipe plan {path}`, then pass the plan file")
    try:
        plan = Plan.model_validate(raw)
    except ValidationError as e:
        problems = [f"{field_path(tuple(err['loc']), raw) or 'plan'}: {err['msg']}" for err in e.errors()]
        raise FedpipeError(f"{path}: not a valid fedpipe plan", problems) from None

    def absolute(p: str) -> str:
        return resolve_against(path.parent, p)

    return _map_paths(plan, absolute, lambda d: absolute(d) if (path.parent / d).exists() else d)


def _map_paths(plan: Plan, file: Callable[[str], str], hf_source: Callable[[str], str]) -> Plan:
    """The plan with every path it records mapped by `file` (profile, importance report, model
    folder, data file), and a `hf:` source by `hf_source` (it may be a folder or a hub name)."""
    dataset = plan.task.dataset
    if is_data_path(dataset):
        dataset = file(dataset)
    elif dataset.startswith("hf:"):
        dataset = "hf:" + hf_source(dataset[3:])
    source = plan.importance.source
    return plan.model_copy(update={
        "profile": plan.profile.model_copy(update={"path": file(plan.profile.path)}),
        "importance": plan.importance.model_copy(update={
            "source": source if source == BUILTIN_PRIOR_SOURCE else file(source)}),
        "model": file(plan.model) if is_model_folder(plan.model) else plan.model,
        "task": plan.task.model_copy(update={"dataset": dataset}),
    })
