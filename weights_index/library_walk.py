"""Finding a library's candidate files: a walk of the folder that stats files and opens none.

This is the whole cost of a no-change rescan, so it works on plain strings and stays lean. Every refusal that needs
no reading is decided here (symlinks leaving the library, FIFOs and other non-regular files, pickle checkpoints,
names that are not UTF-8), so such files are never opened.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path

from fusion.errors import AdapterFormatError, ComposerError, NonRegularFileError, UnsafePathError
from weights_index.metadata import SIDECAR_SUFFIXES
from weights_index.safetensors_file import PICKLE_SUFFIXES, refuse_non_regular, refuse_pickle
from weights_index.text_safety import is_valid_unicode, storable_text

ADAPTER_SUFFIXES = (".safetensors",)


@dataclass(frozen=True)
class FoundFile:
    """A candidate file seen by the walk (stat only, nothing opened), or why it is refused unread (``refusal``).

    ``sidecars`` is a signature of the sidecar files beside it: a change to one makes the file due for a rescan.
    """

    relpath: str
    path: str
    size: int
    mtime_ns: int
    sidecars: str
    refusal: ComposerError | None


def is_inside(path: Path, root: Path) -> bool:
    """True when ``path`` is ``root`` or lies below it (both resolved)."""
    return path == root or path.is_relative_to(root)


def walk(root: Path) -> dict[str, FoundFile]:
    """Every candidate file under ``root`` by relative path (hidden folders skipped, folder symlinks not followed).

    A file that vanishes while it is looked at is left out.
    """
    found: dict[str, FoundFile] = {}
    prefix = str(root) + os.sep
    pending = [str(root)]
    while pending:
        folder = pending.pop()
        try:
            with os.scandir(folder) as listing:
                entries = sorted(listing, key=lambda e: e.name)
        except OSError:
            continue
        by_name = {entry.name: entry for entry in entries}
        for entry in entries:
            if entry.name.startswith("."):
                continue
            try:
                if entry.is_dir(follow_symlinks=False):
                    pending.append(entry.path)
                    continue
            except OSError:
                continue
            stem, suffix = os.path.splitext(entry.name)
            suffix = suffix.lower()
            if suffix in ADAPTER_SUFFIXES or suffix in PICKLE_SUFFIXES:
                relpath = entry.path.removeprefix(prefix).replace(os.sep, "/")
                try:
                    item = found_file(entry, storable_text(relpath), stem, by_name, root)
                except FileNotFoundError:
                    continue
                if not is_valid_unicode(relpath):
                    item = replace(item, refusal=_not_unicode(entry.path))
                found[item.relpath] = item
    return found


def found_file(
    entry: os.DirEntry[str], relpath: str, stem: str, siblings: Mapping[str, os.DirEntry[str]], root: Path
) -> FoundFile:
    """What the walk records about one candidate file; raises FileNotFoundError when it vanished meanwhile."""
    refusal: ComposerError | None = None
    own = entry.stat(follow_symlinks=False)
    stat = own
    try:
        if entry.is_symlink():
            target = Path(os.path.realpath(entry.path))
            if not is_inside(target, root):
                refusal = UnsafePathError(
                    f"symlink points outside the library (to {target}); it is not followed",
                    path=entry.path,
                    hint="copy the file into the library, or link to a file inside it",
                )
        if refusal is None:
            stat = entry.stat(follow_symlinks=True)
            refuse_non_regular(Path(entry.path), stat)
    except FileNotFoundError as exc:
        if entry.is_symlink():
            refusal = AdapterFormatError(
                "broken symlink: its target does not exist", path=entry.path, hint="fix or remove the link"
            )
        else:
            raise exc
    except OSError as exc:
        refusal = NonRegularFileError(
            f"symlink cannot be followed ({exc.strerror or exc}); it is not opened",
            path=entry.path,
            hint="fix or remove the link",
        )
    except NonRegularFileError as exc:
        refusal = exc
    if refusal is not None:
        stat = own
    if refusal is None:
        try:
            refuse_pickle(Path(entry.path))
        except ComposerError as exc:
            refusal = exc
    return FoundFile(
        relpath=relpath,
        path=entry.path,
        size=stat.st_size,
        mtime_ns=stat.st_mtime_ns,
        sidecars=_sidecar_signature(stem, siblings),
        refusal=refusal,
    )


def _sidecar_signature(stem: str, siblings: Mapping[str, os.DirEntry[str]]) -> str:
    """``name:size:mtime_ns`` of each sidecar and preview beside the file, ``|``-joined."""
    sidecars = []
    for suffix in SIDECAR_SUFFIXES:
        sibling = siblings.get(stem + suffix)
        try:
            if sibling is not None and sibling.is_file(follow_symlinks=False):
                info = sibling.stat(follow_symlinks=False)
                sidecars.append(f"{storable_text(sibling.name)}:{info.st_size}:{info.st_mtime_ns}")
        except FileNotFoundError:
            continue
    return "|".join(sidecars)


def _not_unicode(path: str) -> UnsafePathError:
    return UnsafePathError(
        "the file name is not valid UTF-8; it is listed with the odd bytes replaced by '?' and never read",
        path=storable_text(path),
        hint="rename the file",
    )
