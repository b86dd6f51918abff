"""The sha256 of a file: what a plan records of its profile, a node checks of its plan, and a
cached importance report keys on (a model's config, a dataset file)."""

from __future__ import annotations

import hashlib
from pathlib import Path

_CHUNK = 1 << 20  # read large files (datasets) a MiB at a time, not whole


def file_sha256(path: str | Path) -> str:
    """Hex sha256 of the file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()
