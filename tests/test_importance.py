"""Importance scoring: the formulas, the federation (shards, weighting, cache), the CLI and plan.

Everything runs on the tiny random Llama (2 layers, 14 candidate matrices) with 2 x 2 calibration
batches, so the whole file takes seconds; the bundled SmolLM2 is exercised by
benchmarks/bench_importance.py.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
import yaml
from typer.testing import CliRunner

from fedpipe.cli import app
from fedpipe.errors import FedpipeError
from fedpipe.gradients import (
    AnswerLoss,
    FisherAccumulator,
    SensitivityAccumulator,
    pack_rows,
    score_server,
)
from fedpipe.importance import (
    ImportanceReport,
    ScoringRequest,
    compute_report,
    depth_prior,
    importance_for_plan,
    load_report,
    save_report,
    score_shards,
    server_shards,
)
from fedpipe.importance_view import save_heatmap
from fedpipe.models import load_base
from fedpipe.plan import BUILTIN_PRIOR_SOURCE, load_plan
from fedpipe.scorers import SCORERS, combine, get_scorer
from fedpipe.shapes import load_shapes
from fedpipe.tasks import builtin_examples

runner = CliRunner()
FAST = ["--batches", "2", "--batch-size", "2"]


def _profile(tmp_path: Path, model: str, **task) -> Path:
    raw = {
        "name": "tinyfed",
        "model": model,
        "task": {"seq_len": 64, "eval_samples": 10, "partition": "dirichlet", "seed": 0, **task},
        "candidates": {"ranks": [0, 4, 8], "bits": [16], "batch_sizes": [2]},
        "servers": [
            {"name": "a", "memory_gib": 4, "tflops": 1, "uplink_mbps": 10, "downlink_mbps": 10,
             "samples": 30, "device": "cpu"},
            {"name": "b", "memory_gib": 4, "tflops": 2, "uplink_mbps": 20, "downlink_mbps": 20,
             "samples": 10, "count": 3, "device": "cpu"},
        ],
    }
    path = tmp_path / "tinyfed.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("FEDPIPE_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture(scope="module")
def scored(tiny_model_dir, tmp_path_factory):
    """One sensitivity run on the tiny federation (profile, result, its cache folder)."""
    root = tmp_path_factory.mktemp("scored")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FEDPIPE_CACHE", str(root / "cache"))
        profile = _profile(root, str(tiny_model_dir))
        result = compute_report(ScoringRequest.make(profile, batches=2, batch_size=2))
    return profile, result, root / "cache"


# ----------------------------------------------------------------------------- formulas


def test_registry_is_lowercase_and_unknown_scorer_lists_valid_ones():
    assert {"sensitivity", "fisher", "prior"} <= set(SCORERS)
    assert all(name == name.lower() == s.name for name, s in SCORERS.items())
    assert get_scorer("Fisher").name == "fisher"
    assert not get_scorer("prior").needs_weights and get_scorer("sensitivity").needs_weights
    with pytest.raises(FedpipeError) as e:
        get_scorer("magic")
    assert "magic" in str(e.value) and all(name in str(e.value) for name in SCORERS)


def test_sensitivity_is_adalora_smoothed_sensitivity_times_uncertainty():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(3, 4, generator=g)
    grads = [torch.randn(3, 4, generator=g) for _ in range(3)]
    acc = SensitivityAccumulator(beta1=0.85, beta2=0.85)
    avg = unc = torch.zeros(3, 4)
    for grad in grads:
        acc.update("m", w, grad)
        ipt = (w * grad).abs()
        avg = 0.85 * avg + 0.15 * ipt
        unc = 0.85 * unc + 0.15 * (ipt - avg).abs()
    assert acc.scores()["m"] == pytest.approx(float((avg * unc).sum()), rel=1e-5)


def test_fisher_is_mean_squared_gradient():
    acc = FisherAccumulator()
    acc.update("m", torch.ones(2, 2), torch.full((2, 2), 1.0))
    acc.update("m", torch.ones(2, 2), torch.full((2, 2), 3.0))
    assert acc.scores() == {"m": pytest.approx((4 * 1 + 4 * 9) / 2)}


def test_combine_normalises_each_server_then_weights_by_samples():
    out = combine({"s1": {"x": 10.0, "y": 30.0}, "s2": {"x": 1.0, "y": 0.0}}, {"s1": 1, "s2": 3})
    assert out == {"x": pytest.approx(0.25 * 0.25 + 0.75 * 1.0), "y": pytest.approx(0.25 * 0.75)}
    assert sum(out.values()) == pytest.approx(1.0)


def test_score_server_uses_true_gradients_of_candidates_only(tiny_model_dir, tokenizer):
    from fedpipe.data import _collate, encode

    model = load_base(tiny_model_dir, 16)
    batch = _collate(encode(builtin_examples(3, 0), tokenizer, 64), tokenizer.pad_token_id)
    names = ["model.layers.1.mlp.up_proj", "model.layers.0.self_attn.v_proj"]
    scores = score_server(model, [batch], names, FisherAccumulator())
    assert set(scores) == set(names)
    assert all(not p.requires_grad and p.grad is None for p in model.parameters())
    weight = model.get_submodule(names[0]).weight
    weight.requires_grad_(True)
    model(**batch).loss.backward()
    assert scores[names[0]] == pytest.approx(float(weight.grad.pow(2).sum()), rel=1e-4)


def _candidate_grads(model, loss_of, batch, names) -> tuple[float, dict[str, torch.Tensor]]:
    weights = {n: model.get_submodule(n).weight for n in names}
    for w in weights.values():
        w.requires_grad_(True)
    loss = loss_of(batch)
    loss.backward()
    grads = {n: w.grad.clone() for n, w in weights.items()}
    for w in weights.values():
        w.requires_grad_(False)
        w.grad = None
    return loss.item(), grads


@pytest.mark.parametrize("rows, left", [(4, False), (4, True), (1, False)])
def test_packed_loss_and_gradients_equal_the_plain_pass(tiny_model_dir, tokenizer, rows, left):
    """Shared prefix once, no padding, logits only at answers: the same function of the weights."""
    from fedpipe.data import _collate, encode

    model = load_base(tiny_model_dir, 16).eval()
    batch = _collate(encode(builtin_examples(rows, 5), tokenizer, 64), tokenizer.pad_token_id, left)
    names = ["model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"]
    plain = _candidate_grads(model, lambda b: model(**b, use_cache=False).loss, batch, names)
    packed = _candidate_grads(model, AnswerLoss(model)._packed, batch, names)
    assert packed[0] == pytest.approx(plain[0], rel=1e-5)
    for name in names:
        torch.testing.assert_close(packed[1][name], plain[1][name], rtol=1e-4, atol=1e-7)
    layout = pack_rows(batch["input_ids"], batch["attention_mask"], batch["labels"])
    real = int(batch["attention_mask"].sum())
    if rows > 1 and not left:  # the chat template's preamble is shared and sent once
        assert len(layout.tokens) < real - (rows - 1) * 10
    else:
        assert len(layout.tokens) == real


def test_packing_only_where_it_costs_less(tiny_model_dir, tokenizer):
    """Short prompts with a shared preamble pack; many long rows with nothing shared and no
    padding stay a padded batch (a packed sequence's attention is quadratic in all its tokens)."""
    from fedpipe.data import _collate, encode

    loss = AnswerLoss(load_base(tiny_model_dir, 16))
    assert loss.packing_pays(_collate(encode(builtin_examples(4, 5), tokenizer, 64),
                                      tokenizer.pad_token_id))
    ids = torch.randint(5, 1000, (16, 64), generator=torch.Generator().manual_seed(0))
    assert not loss.packing_pays({"input_ids": ids, "attention_mask": torch.ones_like(ids),
                                  "labels": ids})


def test_shared_scoring_equals_per_server_plain_scoring(scored, tiny_model_dir, tokenizer, monkeypatch):
    """One model and packed batches for all servers give the scores that each server scoring
    alone, on its own copy of the model, with the plain loss, gives (up to float noise)."""
    profile, result, _ = scored
    request = ScoringRequest.make(profile, batches=2, batch_size=2)
    shards, weights = server_shards(request), request.sample_weights()
    packed_calls = []
    real_packed = AnswerLoss._packed
    monkeypatch.setattr(AnswerLoss, "_packed", lambda self, b: packed_calls.append(1) or real_packed(self, b))
    settings = dict(batches=2, batch_size=2, seq_len=64, seed=0)
    shared = score_shards(load_base(tiny_model_dir, 16), tokenizer, shards, weights,
                          request.candidates, request.scorer, **settings)
    assert len(packed_calls) == 1 + 2 * len(shards)  # the first batch's check, then every batch
    assert shared == pytest.approx(result.report.scores, rel=1e-6)

    monkeypatch.setattr(AnswerLoss, "_shortcut_agrees", lambda self, batch: False)
    alone = {server: score_shards(load_base(tiny_model_dir, 16), tokenizer, {server: shard},
                                  {server: 1}, request.candidates, request.scorer, **settings)
             for server, shard in shards.items()}
    assert len(packed_calls) == 1 + 2 * len(shards)  # the plain pass did all of that
    reference = combine(alone, weights)
    assert shared == pytest.approx(reference, rel=1e-4, abs=1e-9)
    assert max(shared, key=shared.get) == max(reference, key=reference.get)


def test_progress_hears_every_batch_and_a_line_per_server(tiny_model_dir, cache, tmp_path):
    class Record:
        def __init__(self):
            self.batches, self.servers = [], []

        def batch_done(self, server):
            self.batches.append(server)

        def server_done(self, server, batches, seconds):
            self.servers.append((server, batches))
            assert seconds > 0

    record = Record()
    compute_report(ScoringRequest.make(_profile(tmp_path, str(tiny_model_dir)), "fisher", batches=2,
                                       batch_size=2), progress=record)
    assert record.batches == ["a", "a", "b", "b"] and record.servers == [("a", 2), ("b", 2)]


# ----------------------------------------------------------------------------- federation


def test_report_scores_every_candidate_weighted_by_samples(scored):
    profile, result, _ = scored
    report = result.report
    shapes = load_shapes(yaml.safe_load(profile.read_text())["model"])
    assert list(report.scores) == [m.name for m in shapes.matrices]
    assert all(v >= 0 for v in report.scores.values())
    assert sum(report.scores.values()) == pytest.approx(1.0)
    assert report.scorer == "sensitivity" and report.servers == {"a": 30, "b": 30}
    assert report.settings["batches"] == 2 and report.settings["seq_len"] == 64
    assert "dirichlet" in report.data and not result.cached
    assert result.cache_path.is_file()


def test_cache_hit_and_key_depends_on_scorer_seed_and_data(scored, tiny_model_dir, monkeypatch):
    profile, result, cache_root = scored
    monkeypatch.setenv("FEDPIPE_CACHE", str(cache_root))
    again = compute_report(ScoringRequest.make(profile, batches=2, batch_size=2))
    assert again.cached and again.report.digest() == result.report.digest()
    keys = {ScoringRequest.make(profile, scorer, batches=2, batch_size=2, seed=seed).key(tiny_model_dir)
            for scorer in ("sensitivity", "fisher") for seed in (0, 1)}
    raw = yaml.safe_load(profile.read_text())
    raw["servers"][0]["samples"] = 31
    other = profile.with_name("other.yaml")
    other.write_text(yaml.safe_dump(raw))
    keys.add(ScoringRequest.make(other, batches=2, batch_size=2).key(tiny_model_dir))
    assert len(keys) == 5


def test_entry_data_is_union_of_its_members_shards(scored):
    profile, _, _ = scored
    shards = server_shards(ScoringRequest.make(profile))
    assert {k: len(v) for k, v in shards.items()} == {"a": 30, "b": 30}


def test_server_without_data_is_named(tiny_model_dir, tokenizer):
    model = load_base(tiny_model_dir, 16)
    with pytest.raises(FedpipeError, match="no data for server.*'edge'"):
        score_shards(model, tokenizer, {"hub": builtin_examples(4, 0), "edge": []},
                     {"hub": 4, "edge": 1}, ["model.layers.0.self_attn.q_proj"],
                     get_scorer("fisher"), batches=1, batch_size=2, seq_len=64, seed=0)


def test_bad_settings_and_too_long_sequences_are_refused(tmp_path, tiny_model_dir, cache):
    profile = _profile(tmp_path, str(tiny_model_dir), seq_len=4096)
    with pytest.raises(FedpipeError, match="seq_len 4096 is longer than the context.*2048"):
        compute_report(ScoringRequest.make(profile))
    with pytest.raises(FedpipeError, match="batches must be a whole number"):
        ScoringRequest.make(profile, batches=0)


def test_shape_card_gets_prior_and_gradient_scorers_point_to_it(tmp_path, cache):
    profile = _profile(tmp_path, "llama-2-70b")
    result = compute_report(ScoringRequest.make(profile, "prior"))
    assert result.report.scorer == "prior" and len(result.report.scores) == 80 * 7
    with pytest.raises(FedpipeError, match="(?s)needs the weights.*--scorer prior"):
        compute_report(ScoringRequest.make(profile, "fisher"))


def test_prior_digest_unchanged_by_the_new_optional_fields():
    report = depth_prior(load_shapes("smollm2-135m"))
    old = {"scorer": report.scorer, "model": report.model, "data": None, "scores": report.scores}
    expected = hashlib.sha256(json.dumps(old, sort_keys=True).encode()).hexdigest()[:16]
    assert report.digest() == expected


def test_report_files_round_trip_and_heatmap_is_png(scored, tmp_path):
    report = scored[1].report
    for name in ("r.yaml", "r.json"):
        assert load_report(save_report(report, tmp_path / name)) == report
    json.loads((tmp_path / "r.json").read_text())
    png = save_heatmap(report, tmp_path / "h.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ----------------------------------------------------------------------------- CLI and plan


def test_cli_importance_prints_table_writes_report_and_heatmap(tmp_path, tiny_model_dir, cache):
    profile = _profile(tmp_path, str(tiny_model_dir))
    out = tmp_path / "imp.json"
    result = runner.invoke(app, ["importance", str(profile), "--scorer", "fisher", "-o", str(out),
                                 "--top", "3", *FAST])
    assert result.exit_code == 0, result.output
    for word in ("rank", "share", "share per type", "computed in", "digest",
                 "scored a: 2 batches in", "scored b: 2 batches in"):
        assert word in result.output
    report = load_report(out)
    assert report.scorer == "fisher" and out.with_suffix(".png").is_file()
    again = runner.invoke(app, ["importance", str(profile), "--scorer", "fisher", "-o", str(out),
                                *FAST])
    assert "from cache" in again.output


@pytest.mark.parametrize("args, message", [
    (["--scorer", "magic"], "unknown scorer 'magic'"),
    (["--seq-len", "9999"], "longer than the context"),
    (["--batches", "0"], "batches must be"),
])
def test_cli_importance_bad_input_exit_2(tmp_path, tiny_model_dir, cache, args, message):
    result = runner.invoke(app, ["importance", str(_profile(tmp_path, str(tiny_model_dir))), *args])
    assert result.exit_code == 2 and message in result.output
    assert "Traceback" not in result.output


def test_plan_records_scorer_digest_and_source(scored, tmp_path, monkeypatch):
    profile, result, cache_root = scored
    monkeypatch.setenv("FEDPIPE_CACHE", str(tmp_path / "empty-cache"))
    plans = {}
    report_file = save_report(result.report, tmp_path / "rep.yaml")
    for choice in ("auto", str(report_file), "prior"):
        out = tmp_path / f"{len(plans)}.plan.yaml"
        run = runner.invoke(app, ["plan", str(profile), "-o", str(out), "--importance", choice])
        assert run.exit_code == 0, run.output
        plans[choice] = load_plan(out).importance
    assert plans["auto"].scorer == "prior" and plans["auto"].source == BUILTIN_PRIOR_SOURCE
    assert plans["prior"].scorer == "prior"
    assert plans[str(report_file)].scorer == "sensitivity"
    assert plans[str(report_file)].digest == result.report.digest()
    assert "--importance auto plans with" not in run.output  # the prior: nothing to say
    monkeypatch.setenv("FEDPIPE_CACHE", str(cache_root))
    report, source = importance_for_plan(profile, None)  # auto finds the cached default report
    assert report.digest() == result.report.digest() and source == str(result.cache_path)
    run = runner.invoke(app, ["plan", str(profile), "-o", str(tmp_path / "auto.plan.yaml")])
    assert run.exit_code == 0, run.output
    assert "--importance auto plans with the sensitivity report cached at" in run.output
    assert "2 x 2 examples per server, seed 0" in run.output
    assert load_plan(tmp_path / "auto.plan.yaml").importance.digest == result.report.digest()


def test_plan_refuses_bad_importance(scored, tmp_path, cache):
    profile = scored[0]
    partial = ImportanceReport(scorer="fisher", model="x", scores={"model.layers.0.mlp.up_proj": 1.0})
    for choice, message in ((str(save_report(partial, tmp_path / "p.yaml")), "no score for 13"),
                            ("nonsense", "neither a report file nor a scorer")):
        run = runner.invoke(app, ["plan", str(profile), "-o", str(tmp_path / "x.yaml"),
                                  "--importance", choice])
        assert run.exit_code == 2 and message in run.output, run.output
