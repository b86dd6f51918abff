"""`fedpipe export`: a tiny run's global adapter cut to rank 16 (error as reported), loaded by peft
with its base found from the config, and merged into a model folder that generates the same tokens."""

import json
from pathlib import Path

import pytest
import torch
import yaml
from peft import AutoPeftModelForCausalLM, PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer
from typer.testing import CliRunner

from fedpipe.cli import app
from fedpipe.export import cut_rank, export_run
from fedpipe.federation.inprocess import run_plan
from fedpipe.models import load_adapter, load_base
from fedpipe.plan import save_plan
from fedpipe.planning.strategies import make_plan

runner = CliRunner()


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, tiny_model_dir) -> Path:
    """One flexlora round of two servers at ranks 16 and 12: the global update has rank 28."""
    tmp = tmp_path_factory.mktemp("export")
    profile = {
        "name": "tiny", "model": str(tiny_model_dir), "aggregation": "flexlora",
        "task": {"seq_len": 48, "local_steps": 2, "rounds": 1, "eval_samples": 8, "learning_rate": 5e-3},
        "candidates": {"ranks": [0, 8, 16], "bits": [16], "batch_sizes": [2]},
        "calibration": {"runtime_overhead_gib": 0.0},
        "servers": [{"name": n, "memory_gib": 4, "tflops": 10, "uplink_mbps": 100, "downlink_mbps": 100,
                     "samples": 8, "device": "cpu"} for n in ("edge", "hub")],
    }
    (tmp / "tiny.yaml").write_text(yaml.safe_dump(profile))
    plan = make_plan(tmp / "tiny.yaml")
    names = [f"model.layers.{i}.{m}" for i in range(2) for m in ("self_attn.q_proj", "mlp.down_proj")]
    servers = [s.model_copy(update={"rank_pattern": {n: r for n in names}})
               for s, r in zip(plan.servers, (12, 16), strict=True)]
    plan_path = save_plan(plan.model_copy(update={"servers": servers}), tmp / "tiny.plan.yaml")
    run_plan(plan_path, out=tmp / "run")
    return tmp / "run"


def test_cut_rank_by_rank_and_energy():
    S = [4.0, 2.0, 1.0, 0.5]
    assert cut_rank(S, 2, None) == 2 and cut_rank(S, 10, None) == 4
    assert cut_rank(S, None, 0.75) == 1 and cut_rank(S, None, 0.94) == 2 and cut_rank(S, None, 0.95) == 3 and cut_rank(S, 1, 0.99) == 1


def test_export_rank_16_loads_in_peft_within_the_reported_error(run_dir, tiny_model_dir, tmp_path):
    result = runner.invoke(app, ["export", str(run_dir), "-o", str(tmp_path / "r16"), "--rank", "16"])
    assert result.exit_code == 0, result.output
    assert "rank <= 28" in result.output and "cut to rank <= 16" in result.output
    config = json.loads((tmp_path / "r16" / "adapter_config.json").read_text())
    assert max(config["rank_pattern"].values()) == 16
    assert config["base_model_name_or_path"] == str(tiny_model_dir.resolve())

    exported = export_run(run_dir, tmp_path / "api16", rank=16)
    full, _ = load_adapter(run_dir / "adapter")
    cut, _ = load_adapter(tmp_path / "api16")
    assert 0 < exported.rel_error < 1
    for m in exported.modules:  # each module's output moves by at most the largest dropped sigma
        f, c = full.factors[m.name], cut.factors[m.name]
        x = torch.randn(f.A.shape[1], 5)
        moved = (f.B @ (f.A @ x) - c.B @ (c.A @ x)).norm(dim=0)
        assert (moved <= m.sigma_dropped * x.norm(dim=0) * (1 + 1e-4) + 1e-6).all()
        assert m.rank_before == 28 and m.rank_after == 16

    # AutoPeftModelForCausalLM finds the base from the config; its outputs are the cut update's
    model = AutoPeftModelForCausalLM.from_pretrained(tmp_path / "r16")
    AutoTokenizer.from_pretrained(tmp_path / "r16")  # the tokenizer travels with the adapter
    reference = PeftModel.from_pretrained(load_base(tiny_model_dir, 16), run_dir / "adapter")
    base = load_base(tiny_model_dir, 16)
    ids = torch.randint(0, 1000, (2, 12))
    with torch.no_grad():
        got, want, plain = model(ids).logits, reference(ids).logits, base(ids).logits
    # the cut moves the logits by a small share of what the whole update moves them
    assert (got - want).norm() <= 2 * exported.rel_error * (want - plain).norm()


def test_export_merge_generates_the_same_tokens(run_dir, tiny_model_dir, tmp_path):
    result = runner.invoke(app, ["export", str(run_dir), "-o", str(tmp_path / "merged"), "--merge"])
    assert result.exit_code == 0, result.output
    assert list((tmp_path / "merged").glob("*.safetensors"))
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    adapted = PeftModel.from_pretrained(load_base(tiny_model_dir, 16), run_dir / "adapter")
    ids = torch.randint(0, 1000, (2, 6))
    with torch.no_grad():
        a = merged.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=0)
        b = adapted.generate(input_ids=ids, max_new_tokens=8, do_sample=False, pad_token_id=0)
    assert torch.equal(a, b)


def test_export_errors_name_the_path(tmp_path):
    result = runner.invoke(app, ["export", str(tmp_path / "nope"), "-o", str(tmp_path / "x")])
    assert result.exit_code == 2 and str((tmp_path / "nope" / "adapter").absolute()) in result.output


def test_readme_snippet_loads_the_run_adapter_with_the_chat_template(run_dir, capsys):
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    snippet = readme.split("### Using the trained model")[1].split("```python\n")[1].split("```")[0]
    assert len(snippet.strip().splitlines()) <= 6 and "apply_chat_template" in snippet
    exec(snippet.replace("runs/quickstart/adapter", str(run_dir / "adapter")), {})  # noqa: S102
    assert capsys.readouterr().out.strip() is not None
