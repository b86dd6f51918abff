"""Training data: loading, held-out split, per-server shards, tokenising, batching, evaluation.

Examples come from the built-in task families (`fedpipe.tasks`), a user .jsonl/.json file, or a
Hugging Face dataset read offline. Each server's shard follows the profile's sample counts exactly,
IID or skewed by task family, so heterogeneous data is as easy to set up as heterogeneous hardware.
Loss is computed on answer tokens only, and evaluation reports answer loss and exact-match accuracy
of greedy generation, overall and per task family.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import tempfile
from collections import defaultdict
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F

from fedpipe.errors import FedpipeError
from fedpipe.plan import Plan
from fedpipe.tasks import FAMILIES, Example, builtin_examples

__all__ = [
    "DEFAULT_BUILTIN_N",
    "Example",
    "ExampleScores",
    "answer_budget",
    "batches",
    "cycle_batches",
    "encode",
    "evaluate",
    "load_examples",
    "partition",
    "score_examples",
    "split_holdout",
    "summarize",
]

log = logging.getLogger(__name__)

DEFAULT_BUILTIN_N = 2000
"""Examples generated for source "builtin" when no count is given."""
DEFAULT_FAMILY = "default"
"""Family of user records that name none (no `family` or `category` field)."""

ACCEPTED_FIELDS = [
    "prompt, answer [, family]",
    "Alpaca: instruction, output [, input] [, family | category]",
    "Dolly: instruction, response [, context] [, category | family]",
]
_SOURCES_HINT = (
    "sources: 'builtin', 'builtin:FAMILY,...', a .jsonl/.json file, 'hf:<dir, file or name>'"
)

# ------------------------------------------------------------------------------------------ loading


def _record_to_example(rec: Any, where: str) -> Example:
    """Map one Alpaca, Dolly or prompt/answer record to an Example; extra keys are ignored."""
    accepted = [f"accepted field sets: {s}" for s in ACCEPTED_FIELDS]
    if not isinstance(rec, Mapping):
        raise FedpipeError(f"{where}: expected an object, got {type(rec).__name__}", accepted)
    if "prompt" in rec and "answer" in rec:
        prompt_keys, answer_key = ("prompt",), "answer"
    elif "instruction" in rec and "output" in rec:
        prompt_keys, answer_key = ("instruction", "input"), "output"
    elif "instruction" in rec and "response" in rec:
        prompt_keys, answer_key = ("instruction", "context"), "response"
    else:
        keys = sorted(map(str, rec))
        raise FedpipeError(f"{where}: no accepted field set in keys {keys}", accepted)
    for key in (*prompt_keys, answer_key, "family", "category"):
        if rec.get(key) is not None and not isinstance(rec[key], str):
            raise FedpipeError(
                f"{where}: field {key!r} must be a string, got {type(rec[key]).__name__}", accepted
            )
    # Alpaca's input / Dolly's context follow the instruction after a blank line when present.
    prompt = "\n\n".join(t for k in prompt_keys if (t := (rec.get(k) or "").strip()))
    answer = (rec.get(answer_key) or "").strip()
    for key, value in ((prompt_keys[0], prompt), (answer_key, answer)):
        if not value:
            raise FedpipeError(f"{where}: field {key!r} is empty", accepted)
    family = (rec.get("family") or rec.get("category") or "").strip() or DEFAULT_FAMILY
    return Example(prompt=prompt, answer=answer, family=family)


def _file_records(path: Path) -> list[tuple[str, Any]]:
    """(location, record) pairs of a .jsonl file or a .json array (or JSON lines named .json)."""
    if not path.is_file():
        raise FedpipeError(f"data file {path.absolute()} not found", [_SOURCES_HINT])
    if path.suffix.lower() not in (".jsonl", ".json"):
        raise FedpipeError(
            f"data file {path}: unsupported extension {path.suffix!r}", [_SOURCES_HINT]
        )
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise FedpipeError(f"data file {path}: not UTF-8 text ({e.reason})") from None
    if path.suffix.lower() == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            if e.msg != "Extra data":  # "Extra data" = one object per line: read as JSON lines
                raise FedpipeError(f"{path}:{e.lineno}: invalid JSON ({e.msg})") from None
        else:
            if not isinstance(data, list):
                raise FedpipeError(
                    f"{path}: expected a JSON array of records or one record per line, "
                    f"got a {type(data).__name__}"
                )
            return [(f"{path}: record {i + 1}", rec) for i, rec in enumerate(data)]
    records = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                records.append((f"{path}:{lineno}", json.loads(line)))
            except json.JSONDecodeError as e:
                raise FedpipeError(f"{path}:{lineno}: invalid JSON ({e.msg})") from None
    return records


def _hf_records(spec: str) -> list[tuple[str, Any]]:
    """Rows of a dataset saved with save_to_disk, a local data file/folder, or a cached hub name.

    Always offline (nothing downloads at run time). A DatasetDict yields its "train" split, else its
    first split. Local files are read through a throw-away cache so nothing is left behind.
    """
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # read by datasets at import time
    import datasets

    builders = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}
    path = Path(spec)
    saved = path.is_dir() and any(
        (path / f).is_file() for f in ("state.json", "dataset_dict.json", "dataset_info.json")
    )
    offline, datasets.config.HF_HUB_OFFLINE = datasets.config.HF_HUB_OFFLINE, True
    try:
        with tempfile.TemporaryDirectory(prefix="fedpipe-hf-") as cache:
            if saved:
                ds = datasets.load_from_disk(str(path))
            elif path.is_file():
                if path.suffix.lower() not in builders:
                    raise FedpipeError(
                        f"hf:{spec}: unsupported file type {path.suffix!r}",
                        [f"supported: {', '.join(builders)}"],
                    )
                ds = datasets.load_dataset(
                    builders[path.suffix.lower()], data_files=str(path), cache_dir=cache
                )
            elif path.is_dir():
                ds = datasets.load_dataset(str(path), cache_dir=cache)
            else:
                ds = datasets.load_dataset(spec)
            if isinstance(ds, datasets.DatasetDict):
                split = "train" if "train" in ds else next(iter(ds))
                log.info("hf:%s: using split %r of %s", spec, split, list(ds))
                ds = ds[split]
            return [(f"hf:{spec} row {i + 1}", row) for i, row in enumerate(ds)]
    except FedpipeError:
        raise
    except Exception as e:  # datasets raises many types; all mean "cannot read this offline"
        raise FedpipeError(
            f"hf:{spec}: could not load the dataset offline ({type(e).__name__}: {e})",
            ["give a folder written by Dataset.save_to_disk, a local .json/.jsonl/.csv/.parquet "
             "file or data folder, or the name of a dataset already in the Hugging Face cache"],
        ) from None
    finally:
        datasets.config.HF_HUB_OFFLINE = offline


def load_examples(source: str, n: int | None = None, seed: int = 0) -> list[Example]:
    """Examples from `source`: "builtin" (or "builtin:add,sort" for some families), a .jsonl/.json
    file of Alpaca, Dolly or prompt/answer records, or "hf:<saved dir, data file/folder or name>".

    For "builtin", `n` is the exact count (default DEFAULT_BUILTIN_N). For user data `n` is an upper
    bound: a seeded random subset of n records, kept in file order; every record is validated.
    """
    if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 0):
        raise FedpipeError(f"data source {source!r}: n must be a non-negative integer, got {n!r}")
    if source == "builtin" or source.startswith("builtin:"):
        families = [f.strip() for f in source.partition(":")[2].split(",") if f.strip()]
        return builtin_examples(DEFAULT_BUILTIN_N if n is None else n, seed, families or None)
    records = _hf_records(source[3:]) if source.startswith("hf:") else _file_records(Path(source))
    examples = [_record_to_example(rec, where) for where, rec in records]
    if not examples:
        raise FedpipeError(f"data source {source!r} holds no records", ACCEPTED_FIELDS)
    if n is not None and n < len(examples):
        keep = sorted(random.Random(seed).sample(range(len(examples)), n))
        examples = [examples[i] for i in keep]
    return examples


# ------------------------------------------------------------------------ splitting, partitioning


def _apportion(weights: Sequence[float], total: int) -> list[int]:
    """Integers proportional to `weights` summing exactly to `total` (largest remainder)."""
    exact = [w * total / sum(weights) for w in weights]
    counts = [math.floor(x) for x in exact]
    by_remainder = sorted(range(len(exact)), key=lambda i: (counts[i] - exact[i], i))
    for i in by_remainder[: total - sum(counts)]:
        counts[i] += 1
    return counts


def _by_family(examples: Sequence[Example]) -> dict[str, list[Example]]:
    groups: dict[str, list[Example]] = defaultdict(list)
    for ex in examples:
        groups[ex.family].append(ex)
    return dict(sorted(groups.items()))


def split_holdout(
    examples: Sequence[Example], n_eval: int, seed: int
) -> tuple[list[Example], list[Example]]:
    """(train, held-out): n_eval examples held out, stratified by family (proportional, largest
    remainder), chosen by `seed`; both lists keep the input order."""
    total = len(examples)
    valid = isinstance(n_eval, int) and not isinstance(n_eval, bool) and 0 <= n_eval < total
    if not valid:
        raise FedpipeError(
            f"held-out split: n_eval must be an integer from 0 to {total - 1} "
            f"(one less than the {total} examples), got {n_eval!r}"
        )
    positions: dict[str, list[int]] = defaultdict(list)
    for i, ex in enumerate(examples):
        positions[ex.family].append(i)
    families = sorted(positions)
    quotas = _apportion([len(positions[f]) for f in families], n_eval)
    rng = random.Random(seed)
    held = {i for f, q in zip(families, quotas, strict=True) for i in rng.sample(positions[f], q)}
    train = [ex for i, ex in enumerate(examples) if i not in held]
    return train, [ex for i, ex in enumerate(examples) if i in held]


class _Stream:
    """Items of `pool` in successive reshuffled passes: no repeats until the pool is used up."""

    def __init__(self, pool: Sequence[Any], rng: random.Random) -> None:
        self.pool, self.rng, self.order, self.pos, self.passes = list(pool), rng, [], 0, 0
        self.taken = 0

    def take(self, k: int) -> list[Any]:
        self.taken += k
        out: list[Any] = []
        while len(out) < k:
            if self.pos == len(self.order):
                self.order, self.pos = self.rng.sample(self.pool, len(self.pool)), 0
                self.passes += 1
            m = min(k - len(out), len(self.order) - self.pos)
            out += self.order[self.pos : self.pos + m]
            self.pos += m
        return out


def partition(
    examples: Sequence[Example],
    sample_counts: dict[str, int],
    scheme: Literal["iid", "dirichlet", "family"],
    alpha: float = 0.5,
    seed: int = 0,
) -> dict[str, list[Example]]:
    """One shard per server, exactly `sample_counts[server]` examples each, deterministic in seed.

    - iid: a shuffled pool dealt out in server order.
    - dirichlet: each server's family mixture p ~ Dir(alpha, ..., alpha); its count is split over
      families by p (largest remainder). Small alpha (0.1) gives one or two families per server,
      large alpha (100) nearly the pool's uniform mix.
    - family: server i (in `sample_counts` order) gets family i mod F (families sorted by name).

    Shards are disjoint while the pool (or a family's pool) lasts. Only when more examples are
    requested than it holds are examples reused: the pool is dealt again in a fresh shuffle, so
    each example appears k or k+1 times (a warning is logged). Generate enough built-in examples
    to avoid reuse.
    """
    problems = [
        f"server {name!r}: sample count {count!r} must be a positive integer"
        for name, count in sample_counts.items()
        if isinstance(count, bool) or not isinstance(count, int) or count < 1
    ]
    if not sample_counts:
        problems.append("no servers given (sample_counts is empty)")
    if scheme not in ("iid", "dirichlet", "family"):
        problems.append(f"scheme {scheme!r} is not one of 'iid', 'dirichlet', 'family'")
    if scheme == "dirichlet" and not (isinstance(alpha, int | float) and 0 < alpha < math.inf):
        problems.append(
            f"dirichlet alpha must be a positive number (0.1: skewed, 100: near IID), got {alpha!r}"
        )
    if not examples:
        problems.append("no examples to partition")
    if problems:
        raise FedpipeError("cannot partition the data", problems)

    rng = random.Random(seed)
    groups = _by_family(examples)
    families = list(groups)
    if scheme == "iid":
        streams = {"": _Stream(examples, rng)}
        plans = {s: {"": n} for s, n in sample_counts.items()}
    elif scheme == "family":
        streams = {f: _Stream(groups[f], rng) for f in families}
        plans = {
            s: {families[i % len(families)]: n} for i, (s, n) in enumerate(sample_counts.items())
        }
        if len(sample_counts) < len(families):
            log.warning("family partition: %d servers for %d families; families %s get no server",
                        len(sample_counts), len(families), families[len(sample_counts):])
    else:
        streams = {f: _Stream(groups[f], rng) for f in families}
        gen = np.random.default_rng(seed)
        plans = {}
        for s, n in sample_counts.items():
            p = gen.dirichlet([float(alpha)] * len(families))
            if not np.isfinite(p).all() or p.sum() <= 0:  # underflow at tiny alpha: all mass on one
                p = np.eye(len(families))[gen.integers(len(families))]
            plans[s] = dict(zip(families, _apportion(p.tolist(), n), strict=True))

    shards: dict[str, list[Example]] = {}
    for server, per_family in plans.items():
        shard = [ex for f, k in per_family.items() for ex in streams[f].take(k)]
        rng.shuffle(shard)
        shards[server] = shard
    reused = [f"{f or 'all'} ({st.taken} asked of {len(st.pool)})"
              for f, st in streams.items() if st.passes > 1]
    if reused:
        log.warning("partition (%s): examples are reused across shards: %s", scheme, ", ".join(reused))
    return shards


# ----------------------------------------------------------------------- tokenising and batching


def _prompt_texts(tokenizer: Any, prompts: Sequence[str]) -> tuple[list[str], bool]:
    """Prompt strings in the model's chat format, or a plain Question/Answer format without one.

    Returns the texts and whether they already contain special tokens (chat templates do).
    """
    if getattr(tokenizer, "chat_template", None):
        texts = [
            tokenizer.apply_chat_template(
                [{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True
            )
            for p in prompts
        ]
        return texts, True
    return [f"Question: {p}\nAnswer: " for p in prompts], False


def encode(examples: Sequence[Example], tokenizer: Any, max_len: int) -> list[dict]:
    """Token ids per example: prompt (chat template) + answer + eos; labels -100 on the prompt.

    Prompt and answer are tokenised separately and concatenated, so generation at evaluation sees
    exactly the prompt tokens training saw. Sequences longer than max_len lose the start of the
    prompt (the chat template's system preamble goes first); the answer is never cut.
    Each item: {"input_ids": list[int], "labels": list[int], "family": str}.
    """
    if isinstance(max_len, bool) or not isinstance(max_len, int) or max_len < 2:
        raise FedpipeError(f"max_len must be an integer >= 2, got {max_len!r}")
    eos = tokenizer.eos_token_id
    if eos is None:
        raise FedpipeError("the tokenizer has no eos token; answers need one to mark their end")
    if not examples:
        return []
    texts, special = _prompt_texts(tokenizer, [ex.prompt for ex in examples])
    prompts = tokenizer(texts, add_special_tokens=not special)["input_ids"]
    answers = [a + [eos] for a in tokenizer([ex.answer for ex in examples],
                                            add_special_tokens=False)["input_ids"]]
    too_long = [i for i, a in enumerate(answers) if len(a) >= max_len]
    if too_long:
        worst = max(too_long, key=lambda i: len(answers[i]))
        raise FedpipeError(
            f"max_len {max_len} leaves no room for the prompt of {len(too_long)} example(s)",
            [f"example {worst} (family {examples[worst].family!r}) has an answer of "
             f"{len(answers[worst]) - 1} tokens + eos; set max_len >= {len(answers[worst]) + 1}"],
        )
    out, truncated = [], 0
    for ex, p, a in zip(examples, prompts, answers, strict=True):
        if len(p) + len(a) > max_len:
            p, truncated = p[len(p) + len(a) - max_len :], truncated + 1
        out.append({"input_ids": p + a, "labels": [-100] * len(p) + a, "family": ex.family})
    if truncated:
        log.warning("encode: %d of %d prompts cut from the left to fit max_len %d",
                    truncated, len(out), max_len)
    return out


def _collate(items: Sequence[dict], pad_id: int, left: bool = False) -> dict[str, torch.Tensor]:
    """Pad to the longest item: input_ids with pad_id, attention_mask 0 and labels -100 on pads."""
    width = max(len(it["input_ids"]) for it in items)

    def fill(row: list[int], value: int) -> list[int]:
        pad = [value] * (width - len(row))
        return pad + row if left else row + pad

    ids = [fill(list(it["input_ids"]), pad_id) for it in items]
    mask = [fill([1] * len(it["input_ids"]), 0) for it in items]
    labels = [fill(list(it.get("labels", it["input_ids"])), -100) for it in items]
    return {
        "input_ids": torch.tensor(ids, dtype=torch.long),
        "attention_mask": torch.tensor(mask, dtype=torch.long),
        "labels": torch.tensor(labels, dtype=torch.long),
    }


def _check_batching(encoded: Sequence[dict], batch_size: int) -> None:
    if not encoded:
        raise FedpipeError("no encoded examples to batch")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise FedpipeError(f"batch_size must be a positive integer, got {batch_size!r}")


def batches(
    encoded: Sequence[dict], batch_size: int, seed: int, shuffle: bool = True, pad_id: int = 0
) -> Iterator[dict[str, torch.Tensor]]:
    """One pass over `encoded` in right-padded batches (the last one may be smaller)."""
    _check_batching(encoded, batch_size)
    order = list(range(len(encoded)))
    if shuffle:
        random.Random(seed).shuffle(order)
    for start in range(0, len(order), batch_size):
        yield _collate([encoded[i] for i in order[start : start + batch_size]], pad_id)


def cycle_batches(
    encoded: Sequence[dict], batch_size: int, seed: int, pad_id: int = 0
) -> Iterator[dict[str, torch.Tensor]]:
    """Endless full batches for local steps: reshuffled passes, each item once per pass (a batch
    may span two passes, so a shard smaller than batch_size still gives full batches)."""
    _check_batching(encoded, batch_size)
    stream = _Stream(range(len(encoded)), random.Random(seed))
    while True:
        yield _collate([encoded[i] for i in stream.take(batch_size)], pad_id)


# ------------------------------------------------------------------------------------ evaluation


def _first_answer(text: str, answer: str) -> str:
    """Generated text up to the first newline (unless the reference spans lines), stripped."""
    return (text if "\n" in answer.strip() else text.split("\n", 1)[0]).strip()


@dataclass
class ExampleScores:
    """Per held-out example, in input order: the answer tokens' summed loss and count, and whether
    greedy generation matched the reference (None when accuracy was not asked for)."""

    nll: list[float]
    tokens: list[int]
    correct: list[bool] | None


def answer_budget(encoded: Sequence[dict]) -> int:
    """New tokens greedy generation needs to reproduce the longest reference answer and end it
    (its tokens + eos): more only lengthens wrong answers, which exact match rejects anyway."""
    return max(sum(1 for t in it["labels"] if t != -100) for it in encoded)


@torch.no_grad()
def score_examples(
    model: Any,
    tokenizer: Any,
    examples: Sequence[Example],
    max_len: int,
    batch_size: int = 16,
    max_new_tokens: int | None = None,
    accuracy: bool = True,
) -> ExampleScores:
    """The per-example numbers `evaluate` summarises (see there); `accuracy=False` skips greedy
    generation and scores the answer loss alone."""
    if not examples:
        raise FedpipeError("evaluate: no held-out examples")
    _check_batching(examples, batch_size)
    enc = encode(examples, tokenizer, max_len)
    budget = answer_budget(enc) if max_new_tokens is None else max_new_tokens
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    device = next(model.parameters()).device
    nll = [0.0] * len(enc)
    n_tok = [0] * len(enc)
    correct = [False] * len(enc)
    split = [it["labels"].count(-100) for it in enc]  # prompt lengths
    order = sorted(range(len(enc)), key=lambda i: (split[i], len(enc[i]["input_ids"])))
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            prompt = _collate([{"input_ids": enc[i]["input_ids"][: split[i]]} for i in idx], pad,
                              left=True)
            answer = _collate([{"input_ids": enc[i]["input_ids"][split[i] :]} for i in idx], pad)
            p_len, a_len = prompt["input_ids"].shape[1], answer["input_ids"].shape[1]
            ids = torch.cat([prompt["input_ids"], answer["input_ids"]], 1).to(device)
            mask = torch.cat([prompt["attention_mask"], answer["attention_mask"]], 1).to(device)
            out = model(
                input_ids=ids,
                attention_mask=mask,
                position_ids=(mask.cumsum(-1) - 1).clamp(min=0),
                use_cache=accuracy,
                logits_to_keep=a_len + 1,  # the last prompt position predicts the first answer token
            )
            labels = answer["labels"].to(device)
            keep = labels != -100
            token_nll = F.cross_entropy(out.logits[:, :-1][keep].float(), labels[keep],
                                        reduction="none")
            sums = torch.zeros(len(idx), device=device).index_add_(0, keep.nonzero()[:, 0], token_nll)
            for j, i in enumerate(idx):
                nll[i], n_tok[i] = sums[j].item(), int(keep[j].sum())
            if not accuracy:
                continue

            # transformers 5.2x renamed past_key_values to cache (the old name warns on every run)
            cache_name = "cache" if "cache" in out else "past_key_values"
            cache = out[cache_name]
            # keep p_len - 1 positions (a negative count works on old and new transformers):
            # generate re-reads the last prompt token, then continues
            cache.crop(-(a_len + 1))
            generated = model.generate(
                input_ids=ids[:, :p_len],
                attention_mask=mask[:, :p_len],
                **{cache_name: cache},
                max_new_tokens=budget,
                do_sample=False,
                pad_token_id=pad,
                eos_token_id=eos,
            )
            for j, i in enumerate(idx):
                new = generated[j, p_len:].tolist()
                new = new[: new.index(eos)] if eos in new else new
                text = tokenizer.decode(new, skip_special_tokens=True)
                correct[i] = _first_answer(text, examples[i].answer) == examples[i].answer.strip()
    finally:
        model.train(was_training)
    return ExampleScores(nll, n_tok, correct if accuracy else None)


def summarize(examples: Sequence[Example], scores: ExampleScores,
              members: Sequence[int] | None = None) -> dict:
    """Pooled answer loss and exact match (with its Wilson 95% interval) over `members` (default:
    all), overall and per family; accuracy keys are None when generation was skipped."""
    members = range(len(examples)) if members is None else members

    def summary(group: list[int]) -> dict:
        tokens = sum(scores.tokens[i] for i in group)
        result = {"loss": sum(scores.nll[i] for i in group) / max(tokens, 1), "accuracy": None,
                  "accuracy_ci95": None, "n": len(group)}
        if scores.correct is not None:
            right = sum(scores.correct[i] for i in group)
            result |= {"accuracy": right / len(group), "accuracy_ci95": wilson_interval(right, len(group))}
        return result

    families: dict[str, list[int]] = defaultdict(list)
    for i in members:
        families[examples[i].family].append(i)
    result = summary(list(members))
    result["per_family"] = {f: summary(m) for f, m in sorted(families.items())}
    return result


def evaluate(
    model: Any,
    tokenizer: Any,
    examples: Sequence[Example],
    max_len: int,
    batch_size: int = 16,
    max_new_tokens: int | None = None,
    accuracy: bool = True,
) -> dict:
    """Answer-token loss and exact-match accuracy of greedy generation, overall and per family.

    Loss is the mean cross-entropy over answer tokens (eos included), pooled over tokens as in
    training. Accuracy compares the generated text, up to eos and the first newline, stripped,
    with the stripped answer; generation gets `max_new_tokens`, by default the longest reference
    answer's tokens + eos (`answer_budget`). `accuracy=False` skips generation (loss only; the
    accuracy keys are None). Works on a base or peft Hugging Face causal LM on any device; the
    model's train/eval mode is restored afterwards. Examples are batched by length, prompts
    left-padded and answers right-padded: one forward pass gives the answer loss and, cropped to
    the prompt, the KV cache that greedy generation continues from, so each prompt is encoded
    once (on SmolLM2-135M, CPU: 20-35% faster than a loss pass plus a separate generation, with
    the same loss to 1e-6).
    Returns {"loss", "accuracy", "accuracy_ci95", "n", "per_family": {family: the same, less
    per_family}}.
    """
    scores = score_examples(model, tokenizer, examples, max_len, batch_size, max_new_tokens, accuracy)
    return summarize(examples, scores)


def wilson_interval(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a proportion: how far exact match on n held-out examples can be
    trusted (50 examples at 0.4 give about 0.28-0.54), so a smaller eval set is an informed choice."""
    if n == 0:
        return (0.0, 1.0)
    p, z2 = successes / n, z * z
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / (1 + z2 / n)
    return (max(0.0, centre - half), min(1.0, centre + half))


def plan_data(plan: Plan, n_eval: int) -> tuple[dict[str, list[Example]], list[Example]]:
    """(each training member's shard, the held-out split): a function of the plan, its seed and
    data only, so every transport and machine rebuilds the same."""
    task = plan.task
    members = plan.training_members()
    # generated data: enough of every family that a skewed (non-IID) shard never repeats examples
    needed = (sum(entry.samples for _, entry in members) + n_eval) * len(FAMILIES)
    examples = load_examples(task.dataset, n=needed if task.dataset.startswith("builtin") else None,
                             seed=task.seed)
    train_pool, held_out = split_holdout(examples, n_eval, task.seed)
    shards = partition(train_pool, {m: entry.samples for m, entry in members}, task.partition,
                       task.dirichlet_alpha, task.seed)
    return shards, held_out
