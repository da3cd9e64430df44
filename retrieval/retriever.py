"""Prompt → ranked adapters: reciprocal-rank fusion of metadata, learned-encoder and zero-shot signals; selection.

Signals (each ranks the adapters it can say something about):

- ``trigger`` — adapters whose trigger word or phrase occurs in the prompt (whole words, any case);
- ``metadata`` — SQLite FTS5 bm25 over names, titles, trigger words, tags and descriptions;
- ``learned`` — cosine of the prompt's text embedding with the trained probe encoder's adapter embeddings (FAISS),
  for families with a checkpoint beside the catalog;
- ``zero_shot`` — cross-attention response z-score (:mod:`retrieval.zero_shot`), when a pipeline or token
  encoder is given: works for adapters without any metadata.

The fused score is Σ 1/(rrf_k + rank) over the signals that ranked an adapter.

Selection does not use the ranking's metadata signals: it explains the prompt. Versions and copies of one LoRA count
once (:mod:`weights_index.versions`; the newest is used, the others named in its reasons). The words of the prompt
are matched against every adapter's trigger words, titles, names and tags, each weighed by how many adapters in the
library carry it (:mod:`retrieval.evidence`), and the smallest set of adapters whose specific evidence explains
distinct parts of the prompt is chosen (:mod:`retrieval.selection`): a generic tag shared by many adapters picks
none of them, a title picks its adapter, at most one adapter per category unless the prompt names two, at most
``max_adapters``. When a weight signal is available, adapters it singles out (a robust z-score of at least
``min_confidence`` against the rest of the library) fill categories the words left empty. Each pick's reasons say
which words it explains, what supports it, and what it was preferred to; :attr:`Retriever.rejected` and
:attr:`Retriever.generic` say what was not picked and why. A signal that is unavailable is skipped and said so in
:attr:`Retriever.notes` and in every pick's reasons.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from fusion.errors import ComposerError
from retrieval.checkpoints import checkpoint_path
from retrieval.evidence import Evidence, EvidenceIndex
from retrieval.picks import DEFAULT_WEIGHT, Rejected, Selection, insert_triggers
from retrieval.ranking import RRF_K, RankedHit, SignalScore, reciprocal_rank_fusion, robust_z, signal_ranks
from retrieval.selection import IDENTITY_THRESHOLD, Choice, Rejection, choose
from weights_index.catalog import CatalogEntry, Library
from weights_index.categories import CATEGORIES, infer_category
from weights_index.families import pipeline_family
from weights_index.naming import content_words
from weights_index.versions import version_groups

__all__ = [
    "DEFAULT_MAX_ADAPTERS",
    "DEFAULT_WEIGHT",
    "RankedHit",
    "Rejected",
    "Retriever",
    "Selection",
    "insert_triggers",
    "reciprocal_rank_fusion",
    "robust_z",
]

logger = logging.getLogger(__name__)

if TYPE_CHECKING:
    from retrieval.learned_index import LearnedIndex
    from retrieval.text import TextTower
    from retrieval.zero_shot import TokenEncoder, ZeroShotScorer

DEFAULT_MAX_ADAPTERS = 5
"""Most adapters ``select`` picks by default: one per category of a composition (character, clothing, style,
background, object), so a prompt naming one of each keeps them all; beyond it the rest are left out and listed."""
MIN_CONFIDENCE = 3.5
LEARNED_POOL = 2000
"""How many nearest adapters the learned signal ranks (and measures confidence against) per query."""


def _category(entry: CatalogEntry) -> str | None:
    meta = entry.metadata
    notes = " ".join(text for text in (meta.description, meta.notes) if text)
    category = meta.category or infer_category([*meta.labels, *meta.tags], entry.title, notes or None)
    return category if category in CATEGORIES else None


def _adapters(count: int) -> str:
    return f"{count} adapter" + ("" if count == 1 else "s")


def _by_words(items: Iterable[Evidence]) -> list[Evidence]:
    """One evidence item per matched prompt phrase."""
    return list({item.words: item for item in items}.values())


def _group_category(entries: Iterable[CatalogEntry]) -> str | None:
    """The category of a LoRA's versions: the first member (the preferred one) that has one decides."""
    return next((c for c in map(_category, entries) if c is not None), None)


def _trigger_pattern(trigger: str) -> re.Pattern[str] | None:
    words = trigger.strip().split()
    if not words:
        return None
    return re.compile(r"(?<!\w)" + r"\s+".join(re.escape(w) for w in words) + r"(?!\w)", re.IGNORECASE)


class Retriever:
    """Ranks and selects a library's adapters for prompts; see the module docstring for the signals.

    ``pipe`` (any SD/SDXL/Flux diffusers pipeline) enables the zero-shot signal with its own text encoder(s);
    alternatively pass ``token_encoder`` and ``zero_shot_family``. ``text`` overrides the text embedder the
    learned signal would otherwise rebuild from the checkpoint. ``scan`` rescans the library first (incremental),
    and the learned vectors are then brought in line with the catalog.
    """

    def __init__(
        self,
        library: Library,
        *,
        pipe: Any = None,
        token_encoder: TokenEncoder | None = None,
        zero_shot_family: str | None = None,
        text: TextTower | None = None,
        scan: bool = True,
        rrf_k: int = RRF_K,
        min_confidence: float = MIN_CONFIDENCE,
        max_adapters: int = DEFAULT_MAX_ADAPTERS,
        candidates: int = 100,
    ) -> None:
        self.library = library
        self.rrf_k = rrf_k
        self.min_confidence = min_confidence
        self.max_adapters = max_adapters
        self.candidates = candidates
        self._text = text
        self._pipe = pipe
        if pipe is not None and token_encoder is None:
            from retrieval.zero_shot import pipeline_token_encoder

            token_encoder = pipeline_token_encoder(pipe)
            zero_shot_family = zero_shot_family or pipeline_family(pipe)
        self._token_encoder = token_encoder
        self.zero_shot_family = zero_shot_family
        self._scorer: ZeroShotScorer | None = None
        self._scored: dict[int, str | None] = {}
        """Catalog id → content hash of every adapter the zero-shot scorer has seen (None: could not be scored)."""
        self._learned: dict[str, LearnedIndex | None] = {}
        self.notes: list[str] = []
        self.rejected: list[Rejected] = []
        """Candidates the last :meth:`select` did not pick, with why."""
        self.generic: list[str] = []
        """Phrases of the last :meth:`select`'s prompt that name adapters but are too widely shared to pick any."""
        self.refresh(scan=scan)

    def refresh(self, *, scan: bool = True) -> None:
        """Rescan the library (optionally) and bring every cached signal in line with the catalog."""
        if scan:
            self.library.scan()
        self._entries = {e.id: e for e in self.library.entries() if e.ok}
        self._patterns = {
            e.id: [(t, p) for t in e.trigger_words if (p := _trigger_pattern(t)) is not None]
            for e in self._entries.values()
        }
        self._groups = version_groups(self._entries.values())
        self._group_of = {entry.id: index for index, group in enumerate(self._groups) for entry in group.members}
        self._group_categories = [_group_category(group.members) for group in self._groups]
        self._evidence = EvidenceIndex(self._groups)
        self.notes = []
        for family in sorted({e.family for e in self._entries.values()}):
            index = None
            if checkpoint_path(self.library, family).exists():  # torch and the encoder load only for a checkpoint
                from retrieval.learned_index import LearnedIndex

                index = LearnedIndex.open(self.library, family, text=self._text, pipe=self._pipe)
            if index is not None:
                index.sync()
            self._learned[family] = index
        missing = [f for f, index in self._learned.items() if index is None]
        for family, index in self._learned.items():
            if index is None:
                continue
            problem = index.text_problem()
            if problem is not None:
                self.notes.append(f"learned encoder ({family}): {problem}; left out of the ranking")
                self._learned[family] = None
        for family, index in self._learned.items():
            if index is not None and not index.reliable:
                assert index.validation is not None
                self.notes.append(
                    f"learned encoder ({family}): held-out recall@3 {index.validation['recall_at_3']:.2f} is not above "
                    f"chance (needs > {index.validation['threshold']:.2f}); left out of the ranking"
                )
        if missing:
            self.notes.append(
                f"learned encoder: no trained checkpoint for {', '.join(missing)} (run compose train-retriever)"
            )
        if self._token_encoder is None:
            self.notes.append("zero-shot: no pipeline given, cross-attention response not used")
        for note in self.notes:
            logger.info("%s", note)
        for item_id, sha256 in list(self._scored.items()):
            entry = self._entries.get(item_id)
            if entry is None or entry.sha256 != sha256:
                del self._scored[item_id]
                if self._scorer is not None:
                    self._scorer.remove(str(item_id))

    # ------------------------------------------------------------------------------------------------ signals
    def _in_scope(self, entry: CatalogEntry, family: str | None) -> bool:
        return family is None or entry.family == family

    def _trigger_signal(self, prompt: str, family: str | None) -> tuple[dict[int, float], dict[int, list[str]]]:
        matched: dict[int, list[str]] = {}
        for item_id, patterns in self._patterns.items():
            if not self._in_scope(self._entries[item_id], family):
                continue
            found = [t for t, pattern in patterns if pattern.search(prompt)]
            if found:
                matched[item_id] = found
        return {i: float(max(len(t) for t in found)) for i, found in matched.items()}, matched

    def _metadata_signal(self, prompt: str, family: str | None) -> dict[int, float]:
        hits = self.library.search(prompt, limit=self.candidates)
        return {h.entry.id: h.score for h in hits if h.entry.id in self._entries and self._in_scope(h.entry, family)}

    def _learned_signal(self, prompt: str, family: str | None) -> dict[int, float]:
        indexes = [
            index for f, index in self._learned.items() if index is not None and index.reliable and family in (None, f)
        ]
        if not indexes:
            return {}
        scores: dict[int, float] = {}
        for index in indexes:
            vector = index.text.encode([prompt])[0]
            scores.update(index.query_vector(vector, max(1, min(len(index.store), LEARNED_POOL))))
        return {i: s for i, s in scores.items() if i in self._entries}

    def _zero_shot_signal(self, prompt: str, family: str | None) -> dict[int, float]:
        if self._token_encoder is None or (family is not None and family != self.zero_shot_family):
            return {}
        scorer = self._zero_shot_scorer()
        return {int(name): score for name, score in scorer.scores(prompt).items() if int(name) in self._entries}

    def _zero_shot_scorer(self) -> ZeroShotScorer:
        """The scorer, with every in-family adapter not yet seen read and added (unscorable ones remembered)."""
        assert self._token_encoder is not None
        if self._scorer is None:
            from retrieval.zero_shot import ZeroShotScorer

            self._scorer = ZeroShotScorer(self._token_encoder)
        for item_id, entry in self._entries.items():
            if item_id in self._scored:
                continue
            self._scored[item_id] = entry.sha256
            if self.zero_shot_family is not None and entry.family != self.zero_shot_family:
                continue
            try:
                self._scorer.add(str(item_id), self.library.read(item_id))
            except ComposerError:
                continue
        return self._scorer

    # ----------------------------------------------------------------------------------------------- ranking
    def rank(self, prompt: str, family: str | None = None, k: int = 10) -> list[RankedHit]:
        """The top-``k`` adapters for ``prompt`` (only ``family`` ones when given), best first."""
        triggers, matched = self._trigger_signal(prompt, family)
        per_signal = {
            "trigger": signal_ranks(triggers, confidence=False),
            "metadata": signal_ranks(self._metadata_signal(prompt, family), confidence=False),
            "learned": signal_ranks(self._learned_signal(prompt, family), confidence=True),
            "zero_shot": signal_ranks(self._zero_shot_signal(prompt, family), confidence=True, cap=True),
        }
        rankings = [{i: -float(v.rank) for i, v in ranks.items()} for ranks in per_signal.values()]
        fused = reciprocal_rank_fusion(rankings, self.rrf_k)
        ordered = sorted(fused.items(), key=lambda kv: (-kv[1], self._entries[kv[0]].name))[:k]
        return [self._hit(item_id, score, per_signal, matched.get(item_id, [])) for item_id, score in ordered]

    def _hit(
        self, item_id: int, score: float, per_signal: dict[str, dict[int, SignalScore]], matched: list[str]
    ) -> RankedHit:
        entry = self._entries[item_id]
        signals = {name: ranks[item_id] for name, ranks in per_signal.items() if item_id in ranks}
        return RankedHit(
            name=entry.name,
            id=item_id,
            family=entry.family,
            score=score,
            signals=signals,
            reasons=self._reasons(signals, matched),
            trigger_words=entry.trigger_words,
            triggers_in_prompt=matched,
            category=_category(entry),
            preferred_weight=entry.metadata.preferred_weight,
        )

    def _reasons(self, signals: dict[str, SignalScore], matched: list[str]) -> list[str]:
        reasons = []
        if matched:
            reasons.append("trigger word in prompt: " + ", ".join(repr(t) for t in matched))
        if "metadata" in signals:
            s = signals["metadata"]
            reasons.append(f"metadata text match (rank {s.rank}, bm25 {s.score:.2f})")
        if "learned" in signals:
            s = signals["learned"]
            reasons.append(f"learned encoder: cosine {s.score:.3f} (rank {s.rank}, z {s.confidence or 0.0:.1f})")
        if "zero_shot" in signals:
            s = signals["zero_shot"]
            reasons.append(
                f"cross-attention response z {s.score:.1f} vs ordinary prompts (rank {s.rank}, "
                f"library z {s.confidence or 0.0:.1f})"
            )
        return reasons + [f"not used: {note}" for note in self.notes]

    # --------------------------------------------------------------------------------------------- selection
    def select(self, prompt: str, family: str | None = None, k: int | None = None) -> list[Selection]:
        """The adapters to compose for ``prompt``: see the module docstring for the rules.

        Afterwards :attr:`rejected` lists the candidates that were not chosen and why, and :attr:`generic` the
        prompt phrases that name adapters but are too widely shared to pick any.
        """
        limit = self.max_adapters if k is None else k

        def allowed(group: int) -> bool:
            return self._in_scope(self._groups[group].preferred, family)

        found = self._evidence.match(prompt, IDENTITY_THRESHOLD, allowed)
        trigger_counts = [len(keys) for keys in self._evidence.trigger_keys]
        choices, rejections = choose(found, self._group_categories, trigger_counts, limit)
        self.generic = [f"{g.words!r} is on {_adapters(g.carriers)}: too generic to pick any" for g in found.generic]
        self.rejected = [
            Rejected(self._groups[r.group].preferred.name, r.reason, self._lost_to(r), r.capped) for r in rejections
        ]
        picks = [self._selection(choice, rejections) for choice in choices]
        if self._has_weight_signals and len(picks) < limit:
            taken = {choice.group for choice in choices}
            picks += self._weight_picks(prompt, family, taken, {p.category for p in picks}, limit - len(picks))
        logger.debug("selected %s for %r", [p.name for p in picks] or "nothing", prompt)
        for rejected in self.rejected:
            logger.debug("not selected: %s (%s)", rejected.name, rejected.reason)
        return picks

    @property
    def _has_weight_signals(self) -> bool:
        """True when a weight signal (zero-shot, or a reliable learned encoder) can single out adapters."""
        reliable = any(index is not None and index.reliable for index in self._learned.values())
        return self._token_encoder is not None or reliable

    def _lost_to(self, rejection: Rejection) -> str | None:
        return None if rejection.lost_to is None else self._groups[rejection.lost_to].preferred.name

    def _selection(self, choice: Choice, rejections: list[Rejection]) -> Selection:
        group = self._groups[choice.group]
        entry = group.preferred
        triggers = [e for e in choice.evidence if e.kind == "trigger"]
        reasons = []
        if triggers:
            reasons.append("trigger word in prompt: " + ", ".join(dict.fromkeys(repr(e.phrase) for e in triggers)))
        for item in choice.evidence:
            if item.kind != "trigger":
                reasons.append(f"{item.kind} {item.phrase!r} in prompt (as {item.words!r})")
        explains = list(dict.fromkeys(e.words for e in choice.evidence))
        carried = ", ".join(f"{e.words!r} on {_adapters(e.carriers)}" for e in _by_words(choice.evidence))
        reasons.append(f"explains {', '.join(repr(w) for w in explains)} (specific: {carried})")
        sources = {e.words: e.source for e in _by_words(reversed(choice.evidence)) if e.source}
        sources = {words: sources[words] for words in explains if words in sources}
        if sources:
            reasons.append("found in: " + "; ".join(f"{words!r} from {where}" for words, where in sources.items()))
        if choice.support:
            support = ", ".join(f"{e.words!r} ({_adapters(e.carriers)})" for e in _by_words(choice.support))
            reasons.append(f"also fits tags in the prompt: {support}")
        for other, why in group.others:
            reasons.append(f"preferred over {other.name}: {why}")
        for rejection in rejections:
            if rejection.lost_to == choice.group:
                reasons.append(f"rejected {self._groups[rejection.group].preferred.name}: {rejection.reason}")
        weight = entry.metadata.preferred_weight
        reasons.append(
            f"weight {weight if weight is not None else DEFAULT_WEIGHT} "
            f"({'preferred weight' if weight is not None else 'default'})"
        )
        reasons += [f"not used: {note}" for note in self.notes]
        present = {tuple(sorted(e.words.split())) for e in choice.evidence}
        missing = [] if triggers else self._best_trigger(choice.group, present)
        return Selection(
            entry.name,
            weight if weight is not None else DEFAULT_WEIGHT,
            choice.score,
            reasons,
            missing,
            self._group_categories[choice.group],
            list(entry.trigger_words),
            explains,
            sources,
        )

    def _best_trigger(self, group: int, present: set[tuple[str, ...]]) -> list[str]:
        """The most specific trigger word of a group picked without one (to add to the prompt)."""
        entry = self._groups[group].preferred
        words = [t for t in entry.trigger_words if tuple(sorted(content_words(t))) not in present]
        if not words:
            return []
        return [max(words, key=lambda t: (self._evidence.specificity_of(t), -entry.trigger_words.index(t)))]

    def _weight_picks(
        self, prompt: str, family: str | None, taken: set[int], categories: set[str | None], room: int
    ) -> list[Selection]:
        """Adapters a weight signal singles out (z ≥ ``min_confidence``) that the words did not already pick, at most
        one per category not yet filled."""
        extra: list[Selection] = []
        for hit in self.rank(prompt, family, k=self.candidates):
            if len(extra) >= room:
                break
            group = self._group_of[hit.id]
            if hit.confidence < self.min_confidence or group in taken:
                continue
            if hit.category is not None and hit.category in categories:
                continue
            taken.add(group)
            if hit.category is not None:
                categories.add(hit.category)
            reasons = [f"weights single it out (z {hit.confidence:.1f} ≥ {self.min_confidence})", *hit.reasons]
            weight = hit.preferred_weight if hit.preferred_weight is not None else DEFAULT_WEIGHT
            reasons.append(f"weight {weight} ({'preferred weight' if hit.preferred_weight is not None else 'default'})")
            missing = [hit.trigger_words[0]] if hit.trigger_words and not hit.triggers_in_prompt else []
            extra.append(
                Selection(hit.name, weight, hit.score, reasons, missing, hit.category, list(hit.trigger_words))
            )
        return extra
