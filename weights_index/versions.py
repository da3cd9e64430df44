"""Versions and copies of one LoRA in a library: grouped, with one preferred member per group.

Libraries collect the same adapter several times: ``makima_v1`` and ``makima_v2`` from two Civitai versions, a
``makima (1).safetensors`` duplicate download, a renamed copy. Two entries belong to one group when they are the
same file (SHA-256), declare the same weights (kohya's ``sshs_model_hash`` or ModelSpec's ``hash_sha256``, which
hash the tensors only, so they survive metadata edits), or have the same title once case, punctuation, versions
and packaging words are ignored (:func:`weights_index.naming.name_words`) for the same base family. Near-identical
but not bit-equal weights are not compared: that would mean reading every file's tensors.

The preferred member is the highest version (from the title, else the file name), then not a duplicate-download
copy, then the newest file.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from weights_index.catalog import CatalogEntry
from weights_index.naming import is_copy_name, name_words, version_of

WEIGHT_HASH_KEYS = ("sshs_model_hash", "modelspec.hash_sha256")
"""Declared hashes of the tensors alone (metadata excluded)."""


@dataclass(frozen=True)
class VersionGroup:
    """One LoRA's entries: the one to use and every other one with why it belongs here."""

    preferred: CatalogEntry
    others: tuple[tuple[CatalogEntry, str], ...] = ()

    @property
    def members(self) -> tuple[CatalogEntry, ...]:
        """Every entry of the group, the preferred one first."""
        return (self.preferred, *(entry for entry, _ in self.others))


def entry_version(entry: CatalogEntry) -> tuple[int, ...] | None:
    """The version an entry carries in its title, else in its file name."""
    return version_of(entry.title) or version_of(entry.name.rsplit("/", 1)[-1])


def _preference(entry: CatalogEntry) -> tuple[tuple[int, ...], bool, int, str]:
    return (entry_version(entry) or (), not is_copy_name(entry.name), entry.mtime_ns, entry.name)


def _keys(entry: CatalogEntry) -> list[tuple[str, ...]]:
    keys: list[tuple[str, ...]] = []
    if entry.sha256:
        keys.append(("sha256", entry.sha256))
    for key in WEIGHT_HASH_KEYS:
        value = entry.metadata.hashes.get(key)
        if value:
            keys.append(("weights", value.lower()))
    title = name_words(entry.title)
    if title:
        keys.append(("title", entry.family, *title))
    return keys


def _why(entry: CatalogEntry, preferred: CatalogEntry) -> str:
    if entry.sha256 and entry.sha256 == preferred.sha256:
        return "identical file (same SHA-256)"
    ours, theirs = entry.metadata.hashes, preferred.metadata.hashes
    if any(ours.get(k) and ours[k].lower() == theirs.get(k, "").lower() for k in WEIGHT_HASH_KEYS):
        return "same weights (same declared tensor hash)"
    version, best = entry_version(entry), entry_version(preferred)
    if version is not None and best is not None and version != best:
        return f"older version (v{'.'.join(map(str, version))} < v{'.'.join(map(str, best))})"
    return "same title, not preferred (" + ("a copy" if is_copy_name(entry.name) else "older file") + ")"


def version_groups(entries: Iterable[CatalogEntry]) -> list[VersionGroup]:
    """Group entries that are versions or copies of one LoRA (see the module docstring); ordered by preferred name."""
    items = list(entries)
    parent = list(range(len(items)))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    first_with: dict[tuple[str, ...], int] = {}
    for index, entry in enumerate(items):
        for key in _keys(entry):
            other = first_with.setdefault(key, index)
            parent[root(index)] = root(other)
    members: dict[int, list[CatalogEntry]] = {}
    for index, entry in enumerate(items):
        members.setdefault(root(index), []).append(entry)
    groups = []
    for group in members.values():
        preferred = max(group, key=_preference)
        others = sorted((e for e in group if e is not preferred), key=_preference, reverse=True)
        groups.append(VersionGroup(preferred, tuple((e, _why(e, preferred)) for e in others)))
    return sorted(groups, key=lambda g: g.preferred.name)
