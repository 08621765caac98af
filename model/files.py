"""File helpers shared by the model and the indexer."""

from __future__ import annotations

import hashlib
from pathlib import Path

_BLOCK_SIZE = 1 << 20  # 1 MiB: large files are hashed in constant memory


def file_sha256(path: Path) -> str:
    """Hex sha256 of a file's bytes, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        while block := stream.read(_BLOCK_SIZE):
            digest.update(block)
    return digest.hexdigest()
