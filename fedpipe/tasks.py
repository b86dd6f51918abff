"""Built-in instruction task families with checkable answers, generated offline from a seed.

No small instruction dataset can be downloaded here, so fedpipe makes its own. Each family has a
single correct short answer, so exact-match accuracy is meaningful, and each was chosen because
SmolLM2-135M with LoRA learns it within a few hundred CPU steps (see environment.md): sorting short
digit lists, powers-of-ten unit conversions, 2-3 digit addition, uppercasing, and an ISO date to
DD/MM/YYYY rewrite. Families that barely move at this scale (subtraction, conversions by 60 or 12,
reversing words) are deliberately left out: federated runs should show learning within a few rounds.
"""

from __future__ import annotations

import datetime as dt
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from decimal import Decimal

from fedpipe.errors import FedpipeError


@dataclass(frozen=True)
class Example:
    """One instruction example; `family` groups examples for partitioning and per-family metrics."""

    prompt: str
    answer: str
    family: str


def _sort(rng: random.Random) -> Example:
    digits = [rng.randrange(10) for _ in range(rng.randint(3, 6))]
    return Example(
        prompt="Sort in ascending order: " + " ".join(map(str, digits)),
        answer=" ".join(map(str, sorted(digits))),
        family="sort",
    )


# (larger unit, smaller unit, power of ten between them): conversions are exact decimal shifts.
_UNIT_PAIRS = [
    ("km", "m", 3),
    ("m", "cm", 2),
    ("m", "mm", 3),
    ("cm", "mm", 1),
    ("kg", "g", 3),
    ("g", "mg", 3),
    ("L", "mL", 3),
    ("t", "kg", 3),
]


def _fmt(value: Decimal) -> str:
    """Plain decimal notation without exponent or trailing zeros: 3500, 0.25, 7."""
    return format(value.normalize(), "f")


def _unit(rng: random.Random) -> Example:
    big, small, power = rng.choice(_UNIT_PAIRS)
    if rng.random() < 0.5:  # larger -> smaller: multiply; value may carry one decimal
        value = Decimal(rng.randint(1, 99))
        if rng.random() < 0.4:
            value /= 10
        src, dst, answer = big, small, value.scaleb(power)
    else:  # smaller -> larger: divide
        value = Decimal(rng.randint(1, 9999))
        src, dst, answer = small, big, value.scaleb(-power)
    prompt = f"Convert {_fmt(value)} {src} to {dst}."
    return Example(prompt=prompt, answer=_fmt(answer), family="unit")


def _add(rng: random.Random) -> Example:
    a, b = (rng.randint(10, 99) if rng.random() < 0.5 else rng.randint(100, 999) for _ in range(2))
    return Example(prompt=f"What is {a} + {b}?", answer=str(a + b), family="add")


_WORDS = (
    "apple river stone light garden window paper music forest silver cloud green table water "
    "orange yellow bridge candle planet winter summer spring autumn coffee bread butter castle "
    "dragon engine flower guitar hammer island jacket kettle lemon market number ocean pencil "
    "rabbit saddle tiger umbrella valley wagon yogurt zebra anchor basket cotton desert eagle "
    "falcon ginger harbor iron jungle kitten ladder meadow needle olive pepper quiet rocket "
    "sugar tunnel velvet walnut bottle carpet doctor energy fabric gentle honey insect jelly "
    "knight lantern mirror nickel orbit pillow rain shadow thunder violet whisper copper "
    "marble cherry dolphin feather glacier helmet ivory lizard mango noodle oyster parrot "
    "pirate salmon tomato turtle wizard blue red small happy fast cold warm bright dark soft "
    "sweet tall old young deep wild calm brave proud"
).split()


def _upper(rng: random.Random) -> Example:
    text = " ".join(rng.choice(_WORDS) for _ in range(rng.randint(1, 2)))
    return Example(prompt=f"Uppercase: {text}", answer=text.upper(), family="upper")


_FIRST_DAY = dt.date(1950, 1, 1).toordinal()
_LAST_DAY = dt.date(2049, 12, 31).toordinal()


def _date(rng: random.Random) -> Example:
    day = dt.date.fromordinal(rng.randint(_FIRST_DAY, _LAST_DAY))
    return Example(
        prompt=f"Write the date {day.isoformat()} as DD/MM/YYYY.",
        answer=day.strftime("%d/%m/%Y"),
        family="date",
    )


FAMILIES: dict[str, Callable[[random.Random], Example]] = {
    "sort": _sort,
    "unit": _unit,
    "add": _add,
    "upper": _upper,
    "date": _date,
}


def builtin_examples(n: int, seed: int, families: Sequence[str] | None = None) -> list[Example]:
    """`n` distinct examples, balanced over `families` (all by default), deterministic in `seed`.

    Families get n // F examples each, the first n % F one more, interleaved round-robin so any
    prefix stays balanced. Each family draws from its own generator seeded by (seed, family), so a
    family's examples do not depend on which other families are selected. Prompts are unique within
    one call, so split one call into train and held-out sets rather than making two calls (two
    seeds may share examples).
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise FedpipeError(f"builtin examples: n must be a non-negative integer, got {n!r}")
    names = list(dict.fromkeys(FAMILIES if families is None else families))
    unknown = [f for f in names if f not in FAMILIES]
    if unknown or not names:
        raise FedpipeError(
            f"builtin examples: unknown or empty task families {unknown or names}",
            [f"valid families: {', '.join(FAMILIES)}"],
        )
    per_family: list[list[Example]] = []
    for i, name in enumerate(names):
        quota = n // len(names) + (1 if i < n % len(names) else 0)
        rng = random.Random(f"fedpipe:{seed}:{name}")
        seen: set[str] = set()
        drawn: list[Example] = []
        for _ in range(50 * quota + 1000):
            if len(drawn) == quota:
                break
            ex = FAMILIES[name](rng)
            if ex.prompt not in seen:
                seen.add(ex.prompt)
                drawn.append(ex)
        if len(drawn) < quota:
            raise FedpipeError(
                f"builtin examples: family {name!r} ran out of distinct examples "
                f"({len(drawn)} of {quota} requested)",
                ["ask for fewer examples or add families"],
            )
        per_family.append(drawn)
    return [fam[j] for j in range(max(map(len, per_family))) for fam in per_family if j < len(fam)]
