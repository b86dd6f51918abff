"""The planning instance: one hardware key, classes of identical servers, one table cache."""

from instances import random_instance

from fedpipe.planning.problem import TableCache, build_problem, group_servers, hardware_key
from fedpipe.profile import Server


def _server(**change) -> Server:
    fields = {"name": "a", "memory_gib": 4, "tflops": 1, "uplink_mbps": 10, "downlink_mbps": 20,
              "samples": 100}
    return Server(**{**fields, **change})


def test_hardware_key_ignores_name_count_and_samples_only():
    base = hardware_key(_server())
    assert hardware_key(_server(name="b", count=3, samples=7)) == base
    for change in ({"memory_gib": 5}, {"tflops": 2}, {"uplink_mbps": 11}, {"downlink_mbps": 21},
                   {"device": "cpu"}, {"bits": [4]}):
        assert hardware_key(_server(**change)) != base


def test_classes_are_hardware_and_data():
    classes = group_servers([_server(), _server(name="b"), _server(name="c", samples=5)])
    assert [[s.name for s in c.servers] for c in classes] == [["a", "b"], ["c"]]


def test_problems_sharing_a_cache_build_each_table_once():
    first = random_instance(0, 2, [0, 8])
    cache = TableCache()
    built = []

    def build() -> str:
        built.append("table")
        return "table"

    for _ in range(2):
        problem = build_problem(first.profile, first.shapes, first.importance, cache)
        assert problem.cache.get("table", build) == "table"
        problem.fixed_memory_gib(16, 1, "cuda")
    assert built == ["table"]
    assert cache.get(("fixed memory", 16, 1, "cuda"), lambda: None) == \
        first.cost.fixed_memory_gib(16, 1, "cuda")
