"""Built-in tasks, loading, partitioning, encoding, batching and evaluation (fedpipe.tasks/data)."""

from __future__ import annotations

import datetime as dt
import random
from decimal import Decimal

import pytest

from fedpipe.errors import FedpipeError
from fedpipe.tasks import FAMILIES, Example, builtin_examples

# ---------------------------------------------------------------- built-in task families


def _check_answer(ex: Example) -> None:
    """Recompute each family's answer independently of the generator."""
    p = ex.prompt
    if ex.family == "sort":
        digits = [int(t) for t in p.split(":")[1].split()]
        got = [int(t) for t in ex.answer.split()]
        assert got == sorted(digits) and all(a <= b for a, b in zip(got, got[1:], strict=False))
    elif ex.family == "unit":
        _, value, src, _, dst = p.rstrip(".").split()
        factor = {"km": 1000, "m": 1, "cm": Decimal("0.01"), "mm": Decimal("0.001"),
                  "t": 1000, "kg": 1, "g": Decimal("0.001"), "mg": Decimal("0.000001"),
                  "L": 1, "mL": Decimal("0.001")}
        assert Decimal(ex.answer) == Decimal(value) * factor[src] / factor[dst]
        assert "E" not in ex.answer and not (ex.answer.endswith("0") and "." in ex.answer)
    elif ex.family == "add":
        a, b = p.removeprefix("What is ").rstrip("?").split(" + ")
        assert 10 <= int(a) <= 999 and 10 <= int(b) <= 999 and int(ex.answer) == int(a) + int(b)
    elif ex.family == "upper":
        text = p.removeprefix("Uppercase: ")
        assert ex.answer == text.upper() and ex.answer.isupper()
    elif ex.family == "date":
        iso = p.split()[3]
        assert dt.datetime.strptime(ex.answer, "%d/%m/%Y").date() == dt.date.fromisoformat(iso)
    else:
        raise AssertionError(ex.family)


def test_every_family_answer_is_correct():
    assert 5 <= len(FAMILIES) <= 6
    for name, gen in FAMILIES.items():
        rng = random.Random(name)
        for _ in range(300):
            ex = gen(rng)
            assert ex.family == name and ex.prompt and ex.answer == ex.answer.strip()
            _check_answer(ex)


def test_builtin_balanced_deterministic_unique():
    a = builtin_examples(503, seed=7)
    assert a == builtin_examples(503, seed=7)
    assert a != builtin_examples(503, seed=8)
    counts = {f: sum(e.family == f for e in a) for f in FAMILIES}
    assert max(counts.values()) - min(counts.values()) <= 1 and sum(counts.values()) == 503
    assert len({e.prompt for e in a}) == 503
    assert [e.family for e in a[:10]] == list(FAMILIES) * 2  # round-robin: prefixes stay balanced
    # a family's examples do not depend on which other families are selected
    only = builtin_examples(200, seed=7, families=["add", "sort"])
    assert [e for e in only if e.family == "add"] == [e for e in a if e.family == "add"][:100]
    assert builtin_examples(0, seed=1) == []


@pytest.mark.parametrize("kwargs", [{"n": -1}, {"n": 2.5}, {"n": 5, "families": ["nope"]},
                                    {"n": 5, "families": []}])
def test_builtin_bad_requests(kwargs):
    with pytest.raises(FedpipeError):
        builtin_examples(seed=0, **kwargs)
