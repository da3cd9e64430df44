"""How consistently each caption tag occurs in its kohya dataset folder, and what the folders are called.

kohya sd-scripts writes ``ss_tag_frequency`` (``{folder: {tag: captions holding it}}``) and ``ss_dataset_dirs``
(``{folder: {"n_repeats": …, "img_count": …}}``). A tag in (nearly) every caption of a folder is what the trainer
wrote into every caption: usually the token the LoRA was trained to answer to, sometimes an attribute every image
shares. Whether it names the adapter depends on how many other adapters carry it, which only the library knows
(:mod:`retrieval.caption_names` decides); this module only reads the counts.

kohya lists the regularization folders (class images such as ``1_woman``, captioned with the class word alone) in
``ss_reg_dataset_dirs``; they show what the base model already draws, not what was trained, so their captions and
names are left out here (:func:`reg_folders`).

A folder's caption count is its ``img_count`` from ``ss_dataset_dirs`` when given (never less than its most frequent
tag's count), else the count of its most frequent tag. Folder names are kohya's ``<repeats>_<name>``; the name is
kept unless it is a word trainers use for any dataset (``img``, ``data``, ``train``, …).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from typing import Any

KEEP_SHARE = 0.5
"""Tags in fewer than this share of their folder's captions are not kept (they are counted in the tag totals)."""
MAX_KEPT = 64
"""Most tags kept per adapter (highest share first)."""
GENERIC_FOLDER_NAMES = frozenset(
    {
        "img",
        "imgs",
        "image",
        "images",
        "data",
        "dataset",
        "train",
        "training",
        "pics",
        "photos",
        "raw",
        "reg",
        "regularization",
        "class",
        "concept",
        "lora",
        "output",
        "input",
    }
)
"""Folder names that say nothing about what was trained."""

_FOLDER = re.compile(r"^\d+_(.+)$")


@dataclass(frozen=True)
class CaptionPresence:
    """A tag's presence in one dataset folder: in ``count`` of its ``captions`` captions."""

    count: int
    captions: int
    folder: str

    @property
    def share(self) -> float:
        """The share of the folder's captions holding the tag."""
        return self.count / self.captions if self.captions else 0.0

    def describe(self) -> str:
        """``"20 of 20 captions of '10_img'"``."""
        return f"{self.count} of {self.captions} captions of {self.folder!r}"


def _load(raw: str | None) -> dict[str, Any]:
    if not raw:
        return {}
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, RecursionError):
        return {}
    return data if isinstance(data, dict) else {}


def _count(value: object) -> int | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        return None
    return int(value)


def reg_folders(reg_dataset_dirs: str | None) -> frozenset[str]:
    """Names of the regularization folders ``ss_reg_dataset_dirs`` lists (``{folder: {"n_repeats": …, …}}``)."""
    return frozenset(str(folder) for folder in _load(reg_dataset_dirs))


def caption_presence(
    tag_frequency: str | None, dataset_dirs: str | None = None, skip: frozenset[str] = frozenset()
) -> dict[str, CaptionPresence]:
    """Tag → its presence in the folder where it is most consistent (ties: the bigger folder), for tags in at least
    :data:`KEEP_SHARE` of that folder's captions; at most :data:`MAX_KEPT`, highest share first. Folders in ``skip``
    (the regularization folders) are left out."""
    folders = _load(tag_frequency)
    sizes = _load(dataset_dirs)
    best: dict[str, CaptionPresence] = {}
    for folder, tags in folders.items():
        if not isinstance(tags, dict) or str(folder) in skip:
            continue
        counts = {str(tag).strip(): c for tag, raw in tags.items() if (c := _count(raw)) is not None}
        counts = {tag: c for tag, c in counts.items() if tag}
        if not counts:
            continue
        most = max(counts.values())
        info = sizes.get(folder)
        declared = _count(info.get("img_count")) if isinstance(info, dict) else None
        captions = max(most, declared or 0)
        for tag, count in counts.items():
            found = CaptionPresence(count, captions, str(folder))
            if found.share < KEEP_SHARE:
                continue
            key = tag.lower()
            held = best.get(key)
            if held is None or (found.share, found.captions) > (held.share, held.captions):
                best[key] = found
    ranked = sorted(best.items(), key=lambda item: (-item[1].share, -item[1].captions, item[0]))
    return dict(ranked[:MAX_KEPT])


def folder_names(tag_frequency: str | None, skip: frozenset[str] = frozenset()) -> tuple[str, ...]:
    """Names of the ``<repeats>_<name>`` dataset folders, generic ones (:data:`GENERIC_FOLDER_NAMES`) and those in
    ``skip`` (the regularization folders) left out."""
    names: list[str] = []
    for folder in _load(tag_frequency):
        match = None if str(folder) in skip else _FOLDER.match(str(folder))
        if not match:
            continue
        name = match.group(1).strip()
        if name and name.lower() not in GENERIC_FOLDER_NAMES and name.lower() not in (n.lower() for n in names):
            names.append(name)
    return tuple(names)
