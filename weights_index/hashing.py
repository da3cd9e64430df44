"""File hashes the way model sites and web UIs show them, so catalog rows can be matched to Civitai pages.

``sha256`` is the full-file digest; ``AutoV2`` is its first 10 hex digits (what A1111 and Civitai display).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from fusion.errors import AdapterFormatError

CHUNK_BYTES = 1 << 20
AUTOV2_DIGITS = 10


def file_sha256(path: str | Path) -> str:
    """Lower-case hex SHA-256 of the whole file, read in 1 MiB chunks (constant memory)."""
    digest = hashlib.sha256()
    try:
        with Path(path).open("rb") as handle:
            while chunk := handle.read(CHUNK_BYTES):
                digest.update(chunk)
    except OSError as exc:
        raise AdapterFormatError(f"cannot read file: {exc}", path=path) from exc
    return digest.hexdigest()


def autov2(sha256: str) -> str:
    """Civitai/A1111 "AutoV2" short hash: the first 10 hex digits of the file SHA-256, upper-case as Civitai shows."""
    return sha256[:AUTOV2_DIGITS].upper()
