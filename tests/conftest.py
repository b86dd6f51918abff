"""Shared fixtures: a tiny random Llama (fast), the bundled SmolLM2 (converted once), a tokenizer.

Models are cached under $FEDPIPE_CACHE (default ~/.cache/fedpipe); only the bundled tokenizer is
needed for the tiny model (a few seconds the first time, then cached).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from fedpipe.models import BUNDLED, load_tokenizer, make_tiny_llama, resolve_model_dir


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer, hidden-64 random LlamaForCausalLM with the SmolLM2 tokenizer (fp32 weights).

    Session-wide and shared: load it with `load_base` (cheap) instead of editing the folder.
    """
    return make_tiny_llama(tmp_path_factory.mktemp("models") / "tiny-llama")


@pytest.fixture(scope="session")
def bundled_model_dir() -> Path:
    """SmolLM2-135M-Instruct as a plain HF folder (15-30 s the first time, then cached)."""
    return resolve_model_dir(BUNDLED)


@pytest.fixture(scope="session")
def tokenizer(tiny_model_dir: Path):
    """The bundled SmolLM2 tokenizer (the tiny model ships it), pad token set."""
    return load_tokenizer(tiny_model_dir)
