"""Choosing the smallest set of adapters whose specific evidence explains distinct parts of a prompt.

Input is the evidence :class:`~retrieval.evidence.EvidenceIndex` found with ``IDENTITY_THRESHOLD`` as the least
specificity: an adapter is a candidate when some identity phrase of it (trigger word, dataset trigger, title, name,
alias) is in the prompt that specific; tags alone never make a candidate. Candidates are taken greedily, the one
whose specific evidence explains the most prompt words (weighted by specificity) first; ties go to the one named by
a whole name rather than a shortened one, then to the one with more supporting tags in the prompt, then to the one
with a larger share of its trigger words present, then to the one named first.
A candidate is rejected when

- its specific evidence covers only words a pick already explains (two adapters for the same words: the smallest
  set keeps one);
- a pick already fills its category and its new evidence is not specific enough (``NAMES_TWO_THRESHOLD``) to say the
  prompt names a second adapter of that category;
- the limit on adapters is reached.

Every rejection is kept with its reason and the pick it lost to.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from retrieval.evidence import Evidence, PromptEvidence

IDENTITY_THRESHOLD = 0.55
"""Least specificity of an identity phrase that can justify a pick (≈ shared by at most 5 adapters)."""
NAMES_TWO_THRESHOLD = 0.8
"""Least specificity of the new evidence of a second pick in a filled category (≈ at most 2 adapters)."""


@dataclass(frozen=True)
class Choice:
    """A chosen group: the specific evidence that justified it and the tags in the prompt that support it."""

    group: int
    evidence: tuple[Evidence, ...]
    support: tuple[Evidence, ...]
    score: float


@dataclass(frozen=True)
class Rejection:
    """A candidate that was not chosen, why, the chosen group it lost to (None: no pick involved), and whether the
    cap on the number of adapters was the reason."""

    group: int
    reason: str
    lost_to: int | None = None
    capped: bool = False


def _coverage(items: Sequence[Evidence]) -> dict[int, float]:
    """Prompt word index → the highest specificity among ``items`` covering it."""
    best: dict[int, float] = {}
    for item in items:
        for position in item.positions:
            best[position] = max(best.get(position, 0.0), item.specificity)
    return best


def _quoted(items: Sequence[Evidence]) -> str:
    return ", ".join(dict.fromkeys(repr(item.words) for item in items))


def choose(
    found: PromptEvidence,
    categories: Sequence[str | None],
    trigger_counts: Sequence[int],
    limit: int,
) -> tuple[list[Choice], list[Rejection]]:
    """Pick groups for the prompt (see the module docstring); ``categories`` and ``trigger_counts`` per group."""
    ranked = []
    for group, specific in found.identity.items():
        support = found.support.get(group, [])
        triggers = {tuple(sorted(e.words.split())) for e in specific if e.kind == "trigger"}
        complete = len(triggers) / trigger_counts[group] if trigger_counts[group] else 0.0
        score = sum(_coverage(specific).values())
        whole = sum(_coverage([e for e in specific if e.kind != "short name"]).values())
        first = min(e.span[0] for e in specific)
        ranked.append((score, whole, sum(_coverage(support).values()), complete, -first, -group, specific, support))
    ranked.sort(key=lambda item: item[:6], reverse=True)
    picks: list[Choice] = []
    rejected: list[Rejection] = []
    explained: dict[int, int] = {}
    """Prompt word index → the group whose specific evidence explains it."""
    filled: dict[str, int] = {}
    for score, _, _, _, _, negative_group, specific, support in ranked:
        group = -negative_group
        new = [e for e in specific if any(p not in explained for p in e.positions)]
        if not new:
            owner = explained[specific[0].span[0]]
            rejected.append(Rejection(group, f"explains the same words ({_quoted(specific)}) as a pick", owner))
            continue
        category = categories[group]
        if category is not None and category in filled and max(e.specificity for e in new) < NAMES_TWO_THRESHOLD:
            reason = (
                f"{category} already chosen; {_quoted(new)} is shared by {max(e.carriers for e in new)} adapters, "
                "not specific enough to name a second"
            )
            rejected.append(Rejection(group, reason, filled[category]))
            continue
        if len(picks) >= limit:
            rejected.append(Rejection(group, f"limit of {limit} adapters reached", capped=True))
            continue
        picks.append(Choice(group, tuple(specific), tuple(support), score))
        for item in specific:
            for position in item.positions:
                explained.setdefault(position, group)
        if category is not None:
            filled.setdefault(category, group)
    return picks, rejected
