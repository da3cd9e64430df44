"""What selection hands back: each adapter chosen for a prompt (:class:`Selection`: weight, score, why, trigger words
to add) and each candidate it did not choose (:class:`Rejected`)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

DEFAULT_WEIGHT = 0.8
"""The weight of a pick whose metadata states no preferred weight."""


@dataclass
class Selection:
    """An adapter chosen for a prompt: the weight to use, its score, why, and trigger words to add to the prompt."""

    name: str
    weight: float
    score: float
    reasons: list[str]
    missing_triggers: list[str] = field(default_factory=list)
    category: str | None = None
    trigger_words: list[str] = field(default_factory=list)
    explains: list[str] = field(default_factory=list)
    """The prompt words (as matched) that this pick accounts for."""
    sources: dict[str, str] = field(default_factory=dict)
    """Each explained phrase → where it came from (trigger field, caption counts, title, file name, …)."""

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return dict(self.__dict__)


@dataclass(frozen=True)
class Rejected:
    """An adapter that matched the prompt but was not picked, why, the pick it lost to (if any), and whether the cap
    (``max_adapters``) was the reason."""

    name: str
    reason: str
    lost_to: str | None = None
    capped: bool = False

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict (``lost_to`` only when there is one)."""
        return {key: value for key, value in self.__dict__.items() if value is not None}


def insert_triggers(prompt: str, picks: Iterable[Selection]) -> str:
    """``prompt`` with each pick's missing trigger words appended (comma-separated)."""
    extra = [t for pick in picks for t in pick.missing_triggers]
    return ", ".join([prompt, *extra]) if extra else prompt
