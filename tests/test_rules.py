"""The rules' traits table: one answer for the schema, the planner, plan validation and the CLI."""

from typing import get_args

import pytest

from fedpipe.errors import FedpipeError
from fedpipe.plan import Plan, check_densities
from fedpipe.profile import ClusterProfile
from fedpipe.rules import RULE_NAMES, RULES, rule_traits, rules_help


def test_table_is_the_schemas_list_of_rules():
    assert RULE_NAMES == ("fedit", "hetlora", "flora", "flexlora")
    for model in (ClusterProfile, Plan):
        assert get_args(model.model_fields["aggregation"].annotation) == RULE_NAMES
    assert rules_help() == "fedit | hetlora | flora | flexlora"


def test_traits_are_consistent():
    for t in RULES.values():
        assert t.name and t.description
        # what is merged into the base for good cannot be corrected later: it must arrive whole
        assert not (t.merges_into_base and t.sparse_download)
    assert [n for n, t in RULES.items() if t.broadcasts_stack] == ["flora"]
    assert [n for n, t in RULES.items() if t.aligned_broadcasts] == ["flexlora"]


def test_lookup_is_case_insensitive_and_names_the_valid_rules():
    assert rule_traits(" FLoRA ") is RULES["flora"]
    with pytest.raises(FedpipeError) as e:
        rule_traits("fedavg")
    assert "fedavg" in str(e.value) and "flexlora" in str(e.value)


def test_check_densities_reads_the_table():
    class Entry:  # the fields check_densities reads
        name, download_density, download_precision = "edge", 0.25, "fp32"

    for name, traits in RULES.items():
        if traits.sparse_download:
            check_densities([Entry()], name)
        else:
            with pytest.raises(FedpipeError, match="download_density 0.25"):
                check_densities([Entry()], name)
