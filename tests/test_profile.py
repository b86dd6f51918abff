"""Profile schema: every shipped profile validates; every malformed one gets a message naming the field."""

from pathlib import Path

import pytest
import yaml

from fedpipe.errors import FedpipeError
from fedpipe.profile import load_profile, parse_profile
from fedpipe.shapes import load_shapes

ROOT = Path(__file__).parent.parent
PROFILES = sorted([*(ROOT / "profiles").glob("*.yaml"), *(ROOT / "benchmarks" / "profiles").glob("*.yaml")])
SERVER = {"name": "a", "memory_gib": 2, "tflops": 1, "uplink_mbps": 20, "downlink_mbps": 50, "samples": 10}


def profile(**overrides):
    base = {"model": "smollm2-135m", "servers": [dict(SERVER)]}
    base.update(overrides)
    return base


@pytest.mark.parametrize("path", PROFILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_shipped_profiles_validate_and_have_shapes(path):
    p = load_profile(path)
    assert load_shapes(p.model, path.parent).matrices


def test_count_expands_to_unique_member_names():
    p = parse_profile(profile(servers=[dict(SERVER, count=12)]))
    names = p.servers[0].member_names()
    assert names[0] == "a-01" and names[-1] == "a-12" and len(set(names)) == 12
    assert p.n_servers == 12


@pytest.mark.parametrize("raw, expected", [
    (profile(bogus=1), "bogus: Extra inputs are not permitted"),
    (profile(servers=[dict(SERVER, memory_gib=-1)]), "servers[0] (server 'a').memory_gib: Input should be greater than 0"),
    (profile(servers=[{k: v for k, v in SERVER.items() if k != "memory_gib"}]), "servers[0] (server 'a').memory_gib: Field required"),
    (profile(servers=[dict(SERVER, tflops="fast")]), "servers[0] (server 'a').tflops: Input should be a valid number"),
    (profile(servers=[SERVER, SERVER]), "server names must be unique; repeated: a"),
    (profile(servers=[dict(SERVER, count=2), dict(SERVER, name="a-1")]), "repeated: a-1"),
    (profile(candidates={"ranks": []}), "candidates.ranks: List should have at least 1 item"),
    (profile(candidates={"ranks": [0]}), "candidates.ranks: the rank ladder needs at least one rank > 0"),
    (profile(candidates={"bits": [4, 3]}), "candidates.bits[1]: Input should be 4, 8 or 16"),
    (profile(servers=[dict(SERVER, bits=[2])]), "servers[0] (server 'a').bits[0]: Input should be 4, 8 or 16"),
    (profile(candidates={"targets": ["qq_proj"]}), "unknown matrix type(s) ['qq_proj']"),
    (profile(servers=[]), "servers: List should have at least 1 item"),
    (profile(aggregation="fedavg"), "aggregation: Input should be 'fedit', 'hetlora', 'flora' or 'flexlora'"),
    (profile(task={"lr_schedule": "linear"}), "task.lr_schedule: Input should be 'constant' or 'cosine'"),
    ([1, 2], "expected a mapping"),
])
def test_bad_profiles_name_the_field(raw, expected):
    with pytest.raises(FedpipeError) as e:
        parse_profile(raw)
    assert expected in str(e.value)


def test_every_problem_is_reported_at_once():
    raw = profile(servers=[dict(SERVER, memory_gib=-1, tflops=0)], bogus=1)
    with pytest.raises(FedpipeError) as e:
        parse_profile(raw)
    assert len(e.value.problems) == 3


def test_unknown_model_lists_shape_cards(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump(profile(model="gpt-17")))
    p = load_profile(path)
    with pytest.raises(FedpipeError, match="llama-2-7b"):
        load_shapes(p.model, tmp_path)


def test_bad_yaml(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text("model: [unclosed\n")
    with pytest.raises(FedpipeError, match="not valid YAML"):
        load_profile(path)
