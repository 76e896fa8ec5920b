"""What a directory holds, for tests that check a command left a store untouched."""

from __future__ import annotations

import hashlib
from pathlib import Path


def tree_digest(root: Path) -> str:
    """sha256 over every file's relative path and bytes below ``root`` (lock files left out)."""
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        if p.is_file() and not p.name.endswith(".lock"):
            h.update(str(p.relative_to(root)).encode() + p.read_bytes())
    return h.hexdigest()
