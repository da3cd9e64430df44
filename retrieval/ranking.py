"""Ranking adapters by several signals and fusing the rankings: each signal's ranks and confidences, and reciprocal-rank
fusion (Σ 1/(k + rank) over the signals that ranked an adapter).
"""

from __future__ import annotations

import statistics
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

SIGNALS = ("trigger", "metadata", "learned", "zero_shot")
WEIGHT_SIGNALS = ("learned", "zero_shot")
"""Signals computed from the weights (or learned from them); they alone can justify a pick without trigger words."""
RRF_K = 60
MIN_SCORED_FOR_CONFIDENCE = 5


@dataclass(frozen=True)
class SignalScore:
    """One signal's verdict on one adapter: its rank among the adapters that signal scored, and the raw score."""

    rank: int
    score: float
    confidence: float | None = None
    """Robust z-score of ``score`` among every adapter the signal scored (weight signals only)."""


@dataclass
class RankedHit:
    """One adapter in a ranking: fused score, per-signal ranks/scores, and why it is there."""

    name: str
    id: int
    family: str
    score: float
    signals: dict[str, SignalScore]
    reasons: list[str]
    trigger_words: tuple[str, ...]
    triggers_in_prompt: list[str]
    category: str | None
    preferred_weight: float | None

    @property
    def confidence(self) -> float:
        """The strongest weight-signal z-score (0 when no weight signal scored it)."""
        values = [s.confidence for name, s in self.signals.items() if name in WEIGHT_SIGNALS and s.confidence]
        return max(values, default=0.0)

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return {
            "name": self.name,
            "id": self.id,
            "family": self.family,
            "score": self.score,
            "signals": {k: v.__dict__ for k, v in self.signals.items()},
            "reasons": self.reasons,
            "trigger_words": list(self.trigger_words),
            "triggers_in_prompt": self.triggers_in_prompt,
            "category": self.category,
            "preferred_weight": self.preferred_weight,
        }


def robust_z(scores: dict[Any, float]) -> dict[Any, float]:
    """(score − median) / (1.4826 · MAD) for each key; zeros when fewer than a handful were scored."""
    if len(scores) < MIN_SCORED_FOR_CONFIDENCE:
        return dict.fromkeys(scores, 0.0)
    values = list(scores.values())
    median = statistics.median(values)
    spread = 1.4826 * statistics.median(abs(v - median) for v in values)
    spread = spread if spread > 1e-12 else (statistics.pstdev(values) or 1.0)
    return {key: (value - median) / spread for key, value in scores.items()}


def reciprocal_rank_fusion(rankings: Iterable[dict[Any, float]], k: int = RRF_K) -> dict[Any, float]:
    """Σ 1/(k + rank) over the rankings that rank each key; each ranking maps key → score (higher is better)."""
    fused: dict[Any, float] = {}
    for scores in rankings:
        for rank, (key, _) in enumerate(sorted(scores.items(), key=lambda kv: -kv[1]), start=1):
            fused[key] = fused.get(key, 0.0) + 1.0 / (k + rank)
    return fused


def signal_ranks(scores: dict[int, float], confidence: bool, cap: bool = False) -> dict[int, SignalScore]:
    """Rank by score; with ``confidence``, attach each score's robust z in the library (``cap``: at most the score
    itself, for scores that are already z-scores against a baseline)."""
    z = robust_z(scores) if confidence else {}
    if cap:
        z = {key: min(value, scores[key]) for key, value in z.items()}
    ordered = sorted(scores.items(), key=lambda kv: -kv[1])
    return {key: SignalScore(rank, value, z.get(key)) for rank, (key, value) in enumerate(ordered, start=1)}
