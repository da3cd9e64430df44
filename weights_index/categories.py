"""What an adapter mainly adds to an image (character, clothing, style, background, object), from its metadata."""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping

CATEGORIES = ("character", "clothing", "style", "background", "object")
"""What an adapter mainly adds to an image; retrieval balances picks across these."""

_CATEGORY_WORDS = {
    "character": ("character", "characters", "celebrity", "person", "people", "oc", "original character"),
    "clothing": ("clothing", "clothes", "outfit", "outfits", "costume", "costumes", "dress", "fashion", "uniform"),
    "style": ("style", "styles", "art style", "artstyle", "artist style", "aesthetic", "painting style"),
    "background": ("background", "backgrounds", "scenery", "landscape", "environment", "buildings", "cityscape"),
    "object": ("object", "objects", "item", "items", "prop", "props", "vehicle", "vehicles", "weapon", "weapons"),
}


def infer_category(labels: Iterable[str], title: str | None, description: str | None = None) -> str | None:
    """The adapter's category: a curated label naming one wins, then category words in the title/description."""
    synonyms = {word: category for category, words in _CATEGORY_WORDS.items() for word in words}
    for label in labels:
        category = synonyms.get(label.strip().lower())
        if category:
            return category
    for text in (title, description):
        words = re.findall(r"[a-z]+", (text or "").lower())
        for word in words:
            if word in synonyms:
                return synonyms[word]
    return None


def explicit_category(meta: Mapping[str, str]) -> str | None:
    """Our own ``category`` header key (written by our tools), when it names a known category."""
    value = meta.get("category", "").strip().lower()
    return value if value in CATEGORIES else None
