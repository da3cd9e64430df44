"""What the words of a prompt say about which adapters it names, weighed by how specific each phrase is.

Every adapter (one per :class:`~weights_index.versions.VersionGroup`: versions and copies count once) is described
by phrases of several kinds. Identity kinds name the adapter: its trigger words, its title (whole, and without
parenthesised parts), its file name, other names its metadata gives (``ss_output_name``, ``modelspec.title``) and
its kohya dataset triggers (:attr:`~weights_index.metadata.AdapterMetadata.dataset_triggers`). Tag kinds describe
it: curated labels and caption tags. Names (title, file name, aliases) are indexed whole and as short names: without
their parenthesised parts, and by their leading words (two or more: file names lose the parentheses that set a
series name apart). A short or one-word name that some adapter also uses as a tag is a description, not a name, and
is not an identity; so is any phrase that more than ``DESCRIPTION_RATIO`` times as many adapters use as a tag as are
named by it, and a trigger word that other adapters use as a tag when the adapter has another trigger word that no
other adapter uses as a tag.

Phrases and prompts are compared as bags of words (:mod:`weights_index.naming`): case, punctuation, underscores,
function words, word order, version markers and packaging words do not count. A phrase matches a run of
consecutive prompt words inside one comma-separated part that holds exactly its words; a run across a function
word must be the phrase as written ("girl with a pearl earring" matches that title, "skyline with steampunk" does
not match "Steampunk Skyline").

Specificity is an inverse document frequency over the library: a phrase carried as an identity by ``d`` adapters
and as a mere tag by ``t`` more has the effective count ``n = d + TAG_SHARE·t`` and specificity
``max(0, 1 − ln n / ln GENERIC_AT)`` — 1 for a phrase that one adapter owns, 0 for one that ``GENERIC_AT`` adapters
share. The scale is absolute, not relative to the library's size, so a small library does not make every
descriptive word look like a name.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

from weights_index.catalog import CatalogEntry
from weights_index.naming import content_words, name_words, prompt_runs
from weights_index.versions import VersionGroup

IDENTITY_KINDS = ("trigger", "dataset trigger", "title", "name", "alias", "short name")
"""Phrase kinds that name an adapter; only these can justify picking it. The others ("label", "tag") describe it:
they explain prompt words and break ties, never pick on their own."""
WORD_IDENTITY_KINDS = ("trigger", "dataset trigger")
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


@dataclass
class _KeyStats:
    identity: dict[int, tuple[str, str]] = field(default_factory=dict)
    """Group index → (kind, original phrase) for the groups that carry this key as an identity."""
    tagged: int = 0
    """How many groups carry it only as a tag."""
    described: bool = False
    """Whether any group carries it as a tag (its own included)."""
    specificity: float = 0.0


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


def entry_phrases(entry: CatalogEntry) -> list[tuple[str, str, tuple[str, ...]]]:
    """(kind, phrase, words in order) of every phrase describing ``entry`` (see the module docstring)."""
    meta = entry.metadata
    found: list[tuple[str, str, tuple[str, ...]]] = []
    found += [("trigger", t, tuple(content_words(t))) for t in meta.trigger_words]
    names = [("title", entry.title), ("name", entry.name.rsplit("/", 1)[-1])]
    names += [("alias", alias) for alias in (entry.header_metadata.get(k) for k in ALIAS_KEYS) if alias]
    for kind, name in names:
        whole = name_words(name)
        found.append((kind, name, whole))
        short = {name_words(name, keep_parentheses=False), *(whole[:length] for length in range(2, len(whole)))}
        found += [("short name", name, words) for words in short - {whole}]
    found += [("dataset trigger", t, tuple(content_words(t))) for t in meta.dataset_triggers]
    found += [("label", label, tuple(content_words(label))) for label in meta.labels]
    found += [("tag", tag, tuple(content_words(tag))) for tag in list(meta.tags)[:MAX_CAPTION_TAGS]]
    return [item for item in found if 0 < len(item[2]) <= MAX_PHRASE_WORDS]


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
            identity: dict[Key, tuple[str, str]] = {}
            tags: dict[Key, str] = {}
            triggers: set[Key] = set()
            for entry in group.members:
                for kind, phrase, ordered in entry_phrases(entry):
                    self._ordered.update(tuple(run) for run in prompt_runs(phrase) if len(run) > 1)
                    key = tuple(sorted(ordered))
                    if kind in IDENTITY_KINDS:
                        identity.setdefault(key, (kind, phrase))
                        if kind == "trigger":
                            triggers.add(key)
                    else:
                        tags.setdefault(key, phrase)
            for key, found in identity.items():
                self._keys.setdefault(key, _KeyStats()).identity[index] = found
            for key in tags:
                stats = self._keys.setdefault(key, _KeyStats())
                stats.described = True
                stats.tagged += key not in identity
            self._group_tags.append(tags)
            self.trigger_keys.append(triggers)
        for key, stats in self._keys.items():
            if stats.tagged > DESCRIPTION_RATIO * len(stats.identity):
                stats.tagged += len(stats.identity)  # more adapters describe themselves with it than are named by it
                stats.identity = {}
            elif stats.described:  # a shortened or one-word name that is also a tag describes, it does not name
                stats.identity = {
                    g: found
                    for g, found in stats.identity.items()
                    if found[0] in WORD_IDENTITY_KINDS or (found[0] != "short name" and len(key) > 1)
                }
            stats.specificity = specificity(len(stats.identity), stats.tagged)
        self._demote_attributes()
        self.longest = max((len(key) for key in self._keys), default=0)

    def _demote_attributes(self) -> None:
        """Trigger words that other adapters use as tags become tags of an adapter that also has a trigger word no
        other adapter uses as a tag ("floral hair" beside "vintaro"): they describe it, the other one names it."""
        clean: set[int] = set()
        for stats in self._keys.values():
            if stats.tagged == 0:
                clean.update(g for g, (kind, _) in stats.identity.items() if kind in WORD_IDENTITY_KINDS)
        for key, stats in self._keys.items():
            if stats.tagged == 0:
                continue
            for group, (kind, phrase) in list(stats.identity.items()):
                if kind in WORD_IDENTITY_KINDS and group in clean:
                    del stats.identity[group]
                    stats.tagged += 1
                    self._group_tags[group].setdefault(key, phrase)

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
            if stats.specificity < least_specificity:
                if carriers < 2:
                    continue
                generic.setdefault(text, GenericPhrase(text, carriers, stats.specificity))
                continue
            for group, (kind, phrase) in stats.identity.items():
                if allowed(group):
                    item = Evidence(group, kind, phrase, text, (start, stop), stats.specificity, carriers)
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
                    )
                    support.setdefault(group, []).append(item)
        return PromptEvidence(identity, support, sorted(generic.values(), key=lambda g: -g.carriers))
