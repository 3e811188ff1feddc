"""Where derived data (tokenized text, label vocabularies, clusters) is cached.

Caches live in ``$XMC_CACHE`` (default ``~/.cache/xmc``), keyed by checksums of the source files,
never next to the data and never in the repository.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path


def cache_dir(*parts: str) -> Path:
    """Return (and create) ``$XMC_CACHE/<parts...>``."""
    root = Path(os.environ.get("XMC_CACHE") or Path.home() / ".cache" / "xmc").expanduser()
    path = root.joinpath(*parts)
    path.mkdir(parents=True, exist_ok=True)
    return path


def file_checksum(path: str | os.PathLike, chunk_bytes: int = 1 << 22) -> str:
    """SHA-256 hex digest of a file's bytes, read in chunks so memory stays bounded."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk_bytes):
            digest.update(block)
    return digest.hexdigest()


def key_of(*parts: object) -> str:
    """A short stable hex key for a tuple of strings and numbers (cache folder names)."""
    digest = hashlib.sha256("\x1f".join(str(p) for p in parts).encode())
    return digest.hexdigest()[:24]
