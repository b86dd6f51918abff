"""Does the data hold what the plan asks of it? Counted before planning and before a run.

A data file smaller than the servers' samples plus the held-out split would silently reuse examples
across shards (or leave nothing to train on); this says the numbers up front instead.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

from fedpipe.errors import FedpipeError

if TYPE_CHECKING:
    from fedpipe.plan import Plan
    from fedpipe.profile import ClusterProfile


def check_data_size(dataset: str, samples: Mapping[str, int], n_eval: int,
                    allow_reuse: bool = False, eval_name: str = "task.eval_samples") -> str | None:
    """Whether `dataset` holds the training samples the servers ask for (entry name -> samples of
    all its members) plus `n_eval` held out; a problem says the numbers.

    Generated data ("builtin") always fits. Too few records for the held-out split is an error;
    too few for the shards too, unless `allow_reuse` (task.reuse_samples): then the warning to
    show is returned. None when everything fits. `eval_name` is where `n_eval` came from.
    """
    if dataset == "builtin" or dataset.startswith("builtin:"):
        return None
    from fedpipe.data import load_examples  # torch: only when there is a file to count

    records = len(load_examples(dataset))
    asked = sum(samples.values())
    where = f"task.dataset {dataset}"
    if n_eval >= records:
        raise FedpipeError(f"{where}: {records} records, but {eval_name} holds out {n_eval}: "
                           f"valid is at most {records - 1}, leaving training data")
    train = records - n_eval
    if asked <= train:
        return None
    shown = sorted(samples.items(), key=lambda kv: -kv[1])
    detail = ", ".join(f"{name} {n}" for name, n in shown[:5]) + (", ..." if len(shown) > 5 else "")
    message = (f"{where}: {records} records, {n_eval} held out ({eval_name}) leave {train} "
               f"for training, but the servers ask for {asked} samples ({detail}): each example "
               f"is used about {asked / train:.1f} times")
    if allow_reuse:
        return message + " (task.reuse_samples allows it)"
    raise FedpipeError(message, [f"give the file at least {asked + n_eval} records, lower the "
                                 "servers' samples or task.eval_samples, or set "
                                 "task.reuse_samples: true to reuse examples across shards"])


def check_profile_data(profile: ClusterProfile) -> str | None:
    """`check_data_size` for every server of a profile (`fedpipe plan`)."""
    task = profile.task
    return check_data_size(task.dataset, {s.name: s.samples * s.count for s in profile.servers},
                           task.eval_samples, task.reuse_samples)


def check_plan_data(plan: Plan, eval_samples: int | None = None) -> str | None:
    """`check_data_size` for the servers a plan trains (`fedpipe run`, before loading models)."""
    task = plan.task
    return check_data_size(task.dataset, {s.name: s.samples * s.count for s in plan.servers
                                          if s.rank_pattern},
                           eval_samples or task.eval_samples, task.reuse_samples,
                           "--eval-samples" if eval_samples else "task.eval_samples")
