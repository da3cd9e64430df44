"""What the words of a prompt say about which adapters it names, weighed by how specific each phrase is.

Every adapter (one per :class:`~weights_index.versions.VersionGroup`: versions and copies count once) is described by
phrases of several kinds. Identity kinds name the adapter: its trigger words, its title (whole, and without
parenthesised parts), its file name, other names its metadata gives (``ss_output_name``, ``modelspec.title``) and its
kohya dataset triggers (:attr:`~weights_index.metadata.AdapterMetadata.dataset_triggers`), its kohya dataset folders'
names unless generic (``10_img``) or a common word (``10_woman``), and its caption names: caption tags in (nearly) every
caption of their folder, no common word and carried by few adapters (:mod:`retrieval.caption_names` states that rule and
its thresholds). Tag kinds describe it: curated labels and caption tags. Names (title, file name, aliases) are indexed
whole and as short names: without their parenthesised parts, and by their leading words (two or more: file names lose
the parentheses that set a series name apart). A short or one-word name that some adapter also uses as a tag is a
description, not a name, and is not an identity; so is any phrase that more than ``DESCRIPTION_RATIO`` times as many
adapters use as a tag as are named by it, and a trigger word (or dataset trigger, or caption name) that other adapters
use as a tag when the adapter has another one that no other adapter uses as a tag.

Phrases and prompts are compared as bags of words (:mod:`weights_index.naming`): case, punctuation, underscores,
function words, word order, version markers and packaging words do not count. A phrase matches a run of
consecutive prompt words inside one comma-separated part that holds exactly its words; a run across a function
word must be the phrase as written ("girl with a pearl earring" matches that title, "skyline with steampunk" does
not match "Steampunk Skyline").

Specificity is an inverse document frequency over the library: a phrase carried as an identity by ``d`` adapters
and as a mere tag by ``t`` more has the effective count ``n = d + TAG_SHARE·t`` and specificity
``max(0, 1 − ln n / ln GENERIC_AT)`` — 1 for a phrase that one adapter owns, 0 for one that ``GENERIC_AT`` adapters
share. The scale is absolute, not relative to the library's size, so a small library does not make every
descriptive word look like a name. A caption name's evidence weighs its specificity by its share of the captions.

Every phrase keeps where it came from (:attr:`Phrase.source`: the trigger field, the caption counts, the title, the
file name, …), so a pick can say where each word it explains was found.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

from retrieval import caption_names
from weights_index.catalog import CatalogEntry
from weights_index.naming import content_words, name_words, prompt_runs
from weights_index.versions import VersionGroup

IDENTITY_KINDS = (
    "trigger",
    "dataset trigger",
    "caption name",
    "dataset folder",
    "title",
    "name",
    "alias",
    "short name",
)
"""Phrase kinds that name an adapter; only these can justify picking it. The others ("label", "tag") describe it:
they explain prompt words and break ties, never pick on their own."""
WORD_IDENTITY_KINDS = ("trigger", "dataset trigger", "caption name")
"""Identity kinds that keep naming an adapter even when their one word is also used as a tag ("castle" as a title
is a description when adapters are tagged "castle"; as a trigger word it was chosen to activate the adapter)."""
DESCRIPTION_RATIO = 2
"""A phrase that more than this many times as many adapters use as a tag as are named by it is a description."""
ALIAS_KEYS = ("ss_output_name", "modelspec.title")
"""Header fields that name the adapter besides its title."""
TAG_SHARE = 0.5
"""How much an adapter carrying a phrase only as a tag counts against that phrase naming another adapter."""
GENERIC_AT = 50.0
"""Effective count at which a phrase's specificity reaches 0."""
MAX_CAPTION_TAGS = 64
"""Caption tags indexed per adapter, most frequent first (big datasets list hundreds)."""
MAX_PHRASE_WORDS = 8
"""Longer phrases are not indexed (no prompt names an adapter by nine words)."""

Key = tuple[str, ...]


@dataclass(frozen=True)
class Phrase:
    """One phrase describing an adapter: its kind, the phrase as written, its words in order, where it came from and
    how much it weighs as evidence (a caption name: its share of the captions; otherwise 1)."""

    kind: str
    phrase: str
    words: tuple[str, ...]
    source: str
    weight: float = 1.0


@dataclass
class _KeyStats:
    identity: dict[int, Phrase] = field(default_factory=dict)
    """Group index → the phrase by which each group carrying this key as an identity carries it."""
    tagged: int = 0
    """How many groups carry it only as a tag."""
    described: bool = False
    """Whether any group carries it as a tag (its own included)."""
    specificity: float = 0.0
    crowded: bool = False
    """Whether caption names of it were dropped because too many adapters carry it (it is reported as generic)."""


@dataclass(frozen=True)
class Evidence:
    """One phrase of one adapter found in the prompt: which prompt words it covers and how specific it is."""

    group: int
    kind: str
    phrase: str
    words: str
    span: tuple[int, int]
    specificity: float
    carriers: int
    """How many adapters carry the phrase (as an identity or a tag)."""
    source: str = ""
    """Where the phrase came from (trigger field, caption counts, title, file name, …)."""

    @property
    def positions(self) -> range:
        """Indexes of the prompt words this evidence covers."""
        return range(*self.span)


@dataclass(frozen=True)
class GenericPhrase:
    """A phrase in the prompt that names adapters but is too widely shared to pick any of them."""

    words: str
    carriers: int
    specificity: float


@dataclass
class PromptEvidence:
    """Everything the index found in one prompt."""

    identity: dict[int, list[Evidence]]
    """Group index → its identity evidence."""
    support: dict[int, list[Evidence]]
    """Group index → tag evidence (other than its identity phrases), for the groups in ``identity``."""
    generic: list[GenericPhrase]


def specificity(identity_carriers: int, tag_carriers: int) -> float:
    """The specificity of a phrase carried as an identity by some adapters and as a tag by others (module docs)."""
    count = identity_carriers + TAG_SHARE * tag_carriers
    return 0.0 if count <= 0 else max(0.0, 1.0 - math.log(max(count, 1.0)) / math.log(GENERIC_AT))


def _trigger_source(entry: CatalogEntry) -> str:
    carriers = [name for name in entry.metadata.sources if name != "kohya"]
    return "trigger field" + (f" ({', '.join(carriers)})" if carriers else "")


def entry_phrases(entry: CatalogEntry) -> list[Phrase]:
    """Every phrase describing ``entry`` (see the module docstring)."""
    meta = entry.metadata
    found: list[Phrase] = []
    trigger_source = _trigger_source(entry)
    found += [Phrase("trigger", t, tuple(content_words(t)), trigger_source) for t in meta.trigger_words]
    names = [("title", entry.title, "title"), ("name", entry.name.rsplit("/", 1)[-1], "file name")]
    names += [("alias", alias, key) for key in ALIAS_KEYS if (alias := entry.header_metadata.get(key))]
    for kind, name, source in names:
        whole = name_words(name)
        found.append(Phrase(kind, name, whole, source))
        short = {name_words(name, keep_parentheses=False), *(whole[:length] for length in range(2, len(whole)))}
        found += [Phrase("short name", name, words, f"{source}, shortened") for words in short - {whole}]
    triggers = {t.lower() for t in meta.dataset_triggers}
    found += [
        Phrase("dataset trigger", t, tuple(content_words(t)), "kohya dataset folder name, in its captions")
        for t in meta.dataset_triggers
        if not caption_names.is_common(t)
    ]
    found += [
        Phrase("dataset folder", name, name_words(name), "kohya dataset folder name")
        for name in meta.dataset_folders
        if name.lower() not in triggers and not caption_names.is_common(name)
    ]
    for tag, presence in caption_names.caption_names(meta):
        source = f"caption counts: in {presence.describe()}"
        found.append(Phrase("caption name", tag, tuple(content_words(tag)), source, presence.share))
    found += [Phrase("label", label, tuple(content_words(label)), "labels") for label in meta.labels]
    tags = list(meta.tags)[:MAX_CAPTION_TAGS]
    found += [Phrase("tag", tag, tuple(content_words(tag)), "caption tags") for tag in tags]
    return [item for item in found if 0 < len(item.words) <= MAX_PHRASE_WORDS]


class EvidenceIndex:
    """Phrases of every group of a library, keyed by word bag, with their specificity (built once per refresh)."""

    def __init__(self, groups: list[VersionGroup]) -> None:
        self.groups = groups
        self._keys: dict[Key, _KeyStats] = {}
        self._group_tags: list[dict[Key, str]] = []
        self._ordered: set[tuple[tuple[str, bool], ...]] = set()
        """Every phrase's words in order, each with whether a function word came before it: a prompt window across
        a function word must match one of these exactly ("girl with a pearl earring")."""
        self.trigger_keys: list[set[Key]] = []
        for index, group in enumerate(groups):
            identity: dict[Key, Phrase] = {}
            tags: dict[Key, str] = {}
            triggers: set[Key] = set()
            for entry in group.members:
                for item in entry_phrases(entry):
                    self._ordered.update(tuple(run) for run in prompt_runs(item.phrase) if len(run) > 1)
                    key = tuple(sorted(item.words))
                    if item.kind in IDENTITY_KINDS:
                        identity.setdefault(key, item)
                        if item.kind == "trigger":
                            triggers.add(key)
                    else:
                        tags.setdefault(key, item.phrase)
            for key, found in identity.items():
                self._keys.setdefault(key, _KeyStats()).identity[index] = found
            for key in tags:
                stats = self._keys.setdefault(key, _KeyStats())
                stats.described = True
                stats.tagged += key not in identity
            self._group_tags.append(tags)
            self.trigger_keys.append(triggers)
        for key, stats in self._keys.items():
            self._apply_caption_rule(key, stats)
            if stats.tagged > DESCRIPTION_RATIO * len(stats.identity):
                stats.tagged += len(stats.identity)  # more adapters describe themselves with it than are named by it
                stats.identity = {}
            elif stats.described:  # a shortened or one-word name that is also a tag describes, it does not name
                stats.identity = {
                    g: found
                    for g, found in stats.identity.items()
                    if found.kind in WORD_IDENTITY_KINDS or (found.kind != "short name" and len(key) > 1)
                }
            stats.specificity = specificity(len(stats.identity), stats.tagged)
        self._demote_attributes()
        self.longest = max((len(key) for key in self._keys), default=0)

    def _apply_caption_rule(self, key: Key, stats: _KeyStats) -> None:
        """Caption names of a phrase that too many adapters carry become tags (:mod:`retrieval.caption_names`)."""
        captioned = [g for g, found in stats.identity.items() if found.kind == "caption name"]
        if not captioned or caption_names.names_its_adapter(len(stats.identity) + stats.tagged):
            return
        stats.crowded = True
        for group in captioned:
            phrase = stats.identity.pop(group).phrase
            stats.tagged += 1
            stats.described = True
            self._group_tags[group].setdefault(key, phrase)

    def _demote_attributes(self) -> None:
        """Trigger words that other adapters use as tags become tags of an adapter that also has a trigger word no
        other adapter uses as a tag ("floral hair" beside "vintaro"): they describe it, the other one names it."""
        clean: set[int] = set()
        for stats in self._keys.values():
            if stats.tagged == 0:
                clean.update(g for g, found in stats.identity.items() if found.kind in WORD_IDENTITY_KINDS)
        for key, stats in self._keys.items():
            if stats.tagged == 0:
                continue
            for group, found in list(stats.identity.items()):
                if found.kind in WORD_IDENTITY_KINDS and group in clean:
                    del stats.identity[group]
                    stats.tagged += 1
                    self._group_tags[group].setdefault(key, found.phrase)

    def specificity_of(self, phrase: str) -> float:
        """The specificity of a phrase (0 for one no adapter carries)."""
        stats = self._keys.get(tuple(sorted(content_words(phrase))))
        return 0.0 if stats is None else stats.specificity

    def match(
        self, prompt: str, least_specificity: float, allowed: Callable[[int], bool] = lambda _: True
    ) -> PromptEvidence:
        """The evidence in ``prompt`` for the groups ``allowed`` accepts (e.g. those of the pipeline's family).

        Phrases less specific than ``least_specificity`` are no evidence; those carried by several adapters are
        reported as generic.
        """
        words: list[str] = []
        windows: list[tuple[int, int]] = []
        for run in prompt_runs(prompt):
            offset = len(words)
            words += [word for word, _ in run]
            for start in range(len(run)):
                for stop in range(start + 1, min(len(run), start + self.longest) + 1):
                    if any(gap for _, gap in run[start + 1 : stop]) and (
                        ((run[start][0], False), *run[start + 1 : stop]) not in self._ordered
                    ):
                        continue  # across "with", "in", …: only a phrase written in this order
                    windows.append((offset + start, offset + stop))
        identity: dict[int, list[Evidence]] = {}
        found: dict[Key, list[tuple[int, int]]] = {}
        generic: dict[str, GenericPhrase] = {}
        for start, stop in windows:
            key = tuple(sorted(words[start:stop]))
            stats = self._keys.get(key)
            if stats is None:
                continue
            found.setdefault(key, []).append((start, stop))
            text = " ".join(words[start:stop])
            carriers = len(stats.identity) + stats.tagged
            if stats.specificity < least_specificity or (stats.crowded and not stats.identity):
                if carriers >= 2:
                    generic.setdefault(text, GenericPhrase(text, carriers, stats.specificity))
                continue
            for group, phrase in stats.identity.items():
                strength = stats.specificity * phrase.weight
                if allowed(group) and strength >= least_specificity:
                    item = Evidence(
                        group, phrase.kind, phrase.phrase, text, (start, stop), strength, carriers, phrase.source
                    )
                    identity.setdefault(group, []).append(item)
        support: dict[int, list[Evidence]] = {}
        for group, items in identity.items():
            tags = self._group_tags[group]
            named = {tuple(sorted(item.words.split())) for item in items}
            for key, spans in found.items():
                phrase = tags.get(key)
                if phrase is None or key in named:  # its own trigger word among its caption tags: no extra support
                    continue
                stats = self._keys[key]
                for span in spans:
                    item = Evidence(
                        group,
                        "tag",
                        phrase,
                        " ".join(words[span[0] : span[1]]),
                        span,
                        stats.specificity,
                        len(stats.identity) + stats.tagged,
                        "caption tags or labels",
                    )
                    support.setdefault(group, []).append(item)
        return PromptEvidence(identity, support, sorted(generic.values(), key=lambda g: -g.carriers))
