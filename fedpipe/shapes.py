"""Model shapes without weights: every adaptable linear matrix, read from a config alone.

Planning needs the shape (d_out x d_in) of each weight matrix and the parameter counts, never
the weights, so a 70B model can be planned on a laptop. Shapes come from a shipped shape card
(``fedpipe/shape_cards/NAME.json``, a subset of the model's ``config.json``) or from the
``config.json`` of a local Hugging Face folder. Llama-style decoders (Llama, Mistral, Qwen2,
SmolLM2, TinyLlama) share the module layout below.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from fedpipe.errors import FedpipeError

CARDS_DIR = Path(__file__).parent / "shape_cards"

ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")
MATRIX_TYPES = ATTENTION + MLP
SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")


@dataclass(frozen=True)
class Matrix:
    """One adaptable linear layer: its full module name, type, layer index and shape."""

    name: str
    kind: str
    layer: int
    d_out: int
    d_in: int

    @property
    def params(self) -> int:
        return self.d_out * self.d_in

    def lora_params(self, rank: int) -> int:
        """LoRA adds A (rank x d_in) and B (d_out x rank)."""
        return rank * (self.d_out + self.d_in)


@dataclass(frozen=True)
class ModelShapes:
    """The dimensions of a decoder-only transformer and its linear matrices."""

    name: str
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied_embeddings: bool
    max_positions: int

    @cached_property
    def matrices(self) -> tuple[Matrix, ...]:
        """Every q/k/v/o/gate/up/down matrix, in layer order, keyed by its full module name."""
        q, kv = self.heads * self.head_dim, self.kv_heads * self.head_dim
        h, i = self.hidden, self.intermediate
        dims = {"q_proj": (q, h), "k_proj": (kv, h), "v_proj": (kv, h), "o_proj": (h, q),
                "gate_proj": (i, h), "up_proj": (i, h), "down_proj": (h, i)}
        out = []
        for layer in range(self.layers):
            for kind in MATRIX_TYPES:
                block = "self_attn" if kind in ATTENTION else "mlp"
                d_out, d_in = dims[kind]
                out.append(Matrix(f"model.layers.{layer}.{block}.{kind}", kind, layer, d_out, d_in))
        return tuple(out)

    def candidates(self, targets: list[str] | tuple[str, ...]) -> tuple[Matrix, ...]:
        """The matrices of the given types, the planner's candidate sites."""
        return tuple(m for m in self.matrices if m.kind in targets)

    @cached_property
    def linear_params(self) -> int:
        """Parameters in the decoder's linear layers: the part that bitsandbytes quantizes."""
        return sum(m.params for m in self.matrices)

    @cached_property
    def other_params(self) -> int:
        """Embeddings, lm_head (when untied) and norms: kept in the compute dtype."""
        embed = self.vocab * self.hidden
        lm_head = 0 if self.tied_embeddings else self.vocab * self.hidden
        norms = (2 * self.layers + 1) * self.hidden
        return embed + lm_head + norms

    @property
    def total_params(self) -> int:
        return self.linear_params + self.other_params


def shape_card_names() -> list[str]:
    return sorted(p.stem for p in CARDS_DIR.glob("*.json"))


def shapes_from_config(config: dict, name: str) -> ModelShapes:
    """Build shapes from a Hugging Face ``config.json`` dict; errors name the missing field."""
    archs = config.get("architectures") or []
    if archs and not set(archs) & set(SUPPORTED_ARCHITECTURES):
        raise FedpipeError(f"model {name!r}: architecture {archs} is not supported",
                           [f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}"])
    required = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "vocab_size")
    missing = [k for k in required if not isinstance(config.get(k), int)]
    if missing:
        raise FedpipeError(f"model {name!r}: config lacks integer field(s) {', '.join(missing)}")
    heads = config["num_attention_heads"]
    return ModelShapes(
        name=name,
        hidden=config["hidden_size"],
        intermediate=config["intermediate_size"],
        layers=config["num_hidden_layers"],
        heads=heads,
        kv_heads=config.get("num_key_value_heads") or heads,
        head_dim=config.get("head_dim") or config["hidden_size"] // heads,
        vocab=config["vocab_size"],
        tied_embeddings=bool(config.get("tie_word_embeddings", False)),
        max_positions=config.get("max_position_embeddings") or 2048,
    )


def load_shapes(model: str, base_dir: Path | None = None) -> ModelShapes:
    """Shapes for a shape-card name (case-insensitive) or a local folder with ``config.json``.

    A relative folder is looked up against `base_dir` (the profile's folder) and then the
    current directory.
    """
    card = CARDS_DIR / f"{model.lower()}.json"
    if card.is_file():
        return shapes_from_config(json.loads(card.read_text()), model.lower())
    for folder in ([base_dir / model] if base_dir else []) + [Path(model)]:
        config_file = folder / "config.json"
        if config_file.is_file():
            try:
                config = json.loads(config_file.read_text())
            except json.JSONDecodeError as e:
                raise FedpipeError(f"model: {config_file} is not valid JSON ({e})") from None
            return shapes_from_config(config, str(folder))
    raise FedpipeError(
        f"model: {model!r} is neither a shape card nor a folder with config.json",
        [f"shape cards: {', '.join(shape_card_names())}"],
    )
