"""Where a library's learned-retrieval files live (beside its catalog); importable without torch, so a retriever
can tell whether a family has a trained encoder before loading one."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from weights_index.catalog import Library


def checkpoint_path(library: Library, family: str) -> Path:
    """Where the retriever checkpoint for ``family`` lives: beside the library's catalog."""
    return library.db_path.parent / f"retriever-{family}.safetensors"


def vectors_path(library: Library, family: str) -> Path:
    """Where the family's adapter vectors live."""
    return library.db_path.parent / f"retriever-{family}.vectors.npz"
