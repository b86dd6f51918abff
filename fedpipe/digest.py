"""Content digests: the one way fedpipe names a file's bytes (plans, profiles, data)."""

from __future__ import annotations

import hashlib
from pathlib import Path

from fedpipe.errors import FedpipeError


def sha256_file(path: str | Path) -> str:
    """sha256 of the file's bytes, hex."""
    path = Path(path)
    if not path.is_file():
        raise FedpipeError(f"no such file {path.resolve()}")
    return hashlib.sha256(path.read_bytes()).hexdigest()
