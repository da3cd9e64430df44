"""Where a named adapter comes from — its file or its library entry — decided without torch.

The facade loads adapters through :func:`locate`, and the command line calls :func:`refuse_unknown` before it imports
the model stack, so a mistyped name is refused in a fraction of a second rather than after the model loads.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

from composer.prompts import extract_lora_tags, parse_lora_list
from fusion.errors import AdapterFormatError, CompositionError, UnsafePathError


def refuse_paths(name: str) -> None:
    """Where only library adapters may be named (``library_only``), refuse anything shaped like a file path (absolute,
    ``..``, a drive or backslash) before any file is looked at: the answer is the same whether it exists or not."""
    parts = name.replace("\\", "/").split("/")
    if name.startswith(("/", "~")) or "\\" in name or ":" in name or ".." in parts:
        raise UnsafePathError(
            "adapters are named from the library here; file paths are not accepted",
            hint="pick an adapter from the Library tab by its name",
        )


def library_entry(library: Any, name: str, *, library_only: bool = False) -> Any:
    """The readable catalog entry named ``name``; a typed error when no library is open, the name is unknown
    (:class:`~fusion.errors.UnknownAdapterError`) or its file was broken when indexed."""
    if library is None and library_only:
        raise CompositionError("no library is open, so no adapter can be named", hint="serve with a library")
    if library is None:
        raise CompositionError(
            f"adapter {name!r} is not a file and no library is open",
            hint="pass a .safetensors path, or library=DIR (CLI: --library DIR)",
        )
    entry = library.get(name)
    if not entry.ok:
        raise AdapterFormatError(
            f"adapter {entry.name!r} could not be read when the library was indexed ({entry.error_type}: "
            f"{entry.error})",
            hint="fix or remove the file; `compose index DIR` lists every broken file",
        )
    return entry


def locate(name: str, library: Any, *, library_only: bool = False) -> Path | Any:
    """Where the adapter ``name`` comes from: its file (a path, unless ``library_only``) or its readable catalog
    entry; a typed error for a path-shaped name under ``library_only``, an unknown name or a broken file."""
    path = Path(name)
    if library_only:
        refuse_paths(name)
    elif path.suffix and path.is_file():
        return path
    return library_entry(library, name, library_only=library_only)


def named_adapters(prompt: str, loras: str | None) -> list[str]:
    """The adapter names a request spells out: its ``<lora:…>`` prompt tags and an explicit ``loras`` list (none for
    ``"auto"``, whose picks come from the library itself)."""
    names = [tag.name for tag in extract_lora_tags(prompt)[1]]
    if loras and loras.strip().lower() != "auto":
        names += [tag.name for tag in parse_lora_list(loras)]
    return names


def refuse_unknown(
    names: Iterable[str], library: Any, *, known: Iterable[str] = (), library_only: bool = False
) -> None:
    """Raise the typed error of the first name in ``names`` that is neither in ``known`` (adapters registered on a
    pipeline), an adapter file, nor a readable library entry."""
    registered = set(known)
    for name in names:
        if name not in registered:
            locate(name, library, library_only=library_only)
