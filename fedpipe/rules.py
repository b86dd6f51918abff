"""What each aggregation rule implies beyond its arithmetic, in one torch-free table.

The profile schema, the planner, plan validation, the coordinator and the CLI each need to know
a rule's traits (does its broadcast merge into the base? is the download a stack? may it be
sparse?) without importing the torch-based rule classes in ``fedpipe.aggregators``; those take
their own ``merges_into_base`` from here, so one table answers every question.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from fedpipe.errors import FedpipeError


@dataclass(frozen=True)
class RuleTraits:
    """One aggregation rule's traits (design §7)."""

    name: str
    # each server merges the broadcast into its base weights for good and restarts a fresh adapter
    merges_into_base: bool
    # every server downloads the stack of all servers' adapters, not an adapter of its own rank
    broadcasts_stack: bool
    # a top-k download may stand for the broadcast: a later round corrects what it leaves out
    sparse_download: bool
    # the aggregate depends on each server's product B_k A_k alone, so a broadcast may be
    # re-factorised to align with what the server already holds (cheaper sparse deltas)
    aligned_broadcasts: bool
    # a server's next start is in the same factor coordinates as its last (factors averaged, restart
    # by truncation), so an upload residual kept in them stays meaningful (`fedpipe.feedback`); and
    # so every server starts round 1 from one shared A, as the averages assume (`fedpipe.client`)
    keeps_factor_coordinates: bool
    # the global rank grows with the servers' ranks (an SVD of the sum, a stack), so a `Truncation`
    # of it (`fedpipe.aggregators.truncate`) applies; the others stay at the largest server rank
    grows_global_rank: bool
    description: str


RULES: dict[str, RuleTraits] = {t.name: t for t in (
    RuleTraits("fedit", merges_into_base=False, broadcasts_stack=False, sparse_download=True,
               aligned_broadcasts=False, keeps_factor_coordinates=True, grows_global_rank=False,
               description="average the factors A and B (zero-padded)"),
    RuleTraits("hetlora", merges_into_base=False, broadcasts_stack=False, sparse_download=True,
               aligned_broadcasts=False, keeps_factor_coordinates=True, grows_global_rank=False,
               description="zero-pad to the largest rank, weight by |BA|, truncate per server"),
    RuleTraits("flora", merges_into_base=True, broadcasts_stack=True, sparse_download=False,
               aligned_broadcasts=False, keeps_factor_coordinates=False, grows_global_rank=True,
               description="stack every server's factors (exact sum), merged into each base"),
    RuleTraits("flexlora", merges_into_base=False, broadcasts_stack=False, sparse_download=True,
               aligned_broadcasts=True, keeps_factor_coordinates=False, grows_global_rank=True,
               description="SVD of the weighted sum of products, truncated to each server's rank"),
)}
RULE_NAMES: tuple[str, ...] = tuple(RULES)
AggregationRule = Literal[RULE_NAMES]  # type: ignore[valid-type]  # the profile's and the plan's field


def rule_traits(name: str) -> RuleTraits:
    """The traits of the rule called `name` (case-insensitive, as ``--aggregation`` takes it); an
    unknown name is a user error naming the valid ones."""
    traits = RULES.get(name.strip().lower())
    if traits is None:
        raise FedpipeError(f"unknown aggregation rule {name!r}",
                           [f"aggregation: valid rules are {', '.join(sorted(RULES))}"])
    return traits


def rules_help() -> str:
    """'fedit | hetlora | flora | flexlora': the valid names, for help texts."""
    return " | ".join(RULE_NAMES)
