"""How adapters are named: titles and file names reduced to comparable word bags, and the versions they carry.

Community LoRAs reach a library as ``Makima (Chainsaw Man) v2``, ``makima_chainsaw_man-v1.5.safetensors``,
``MakimaChainsawMan_v20`` or ``makima (1).safetensors`` (a browser's duplicate download). :func:`name_words` turns any
of these into the same lower-case words without the version, the packaging words ("lora", "locon", "sdxl", …) and
the small function words, so they compare equal whatever the case, punctuation, underscores or word order.
:func:`version_of` reads the version such a name carries.
"""

from __future__ import annotations

import functools
import re

FUNCTION_WORDS = frozenset(
    {
        "a",
        "an",
        "the",
        "of",
        "in",
        "on",
        "at",
        "by",
        "for",
        "to",
        "and",
        "with",
        "from",
        "into",
        "onto",
        "over",
        "under",
        "as",
        "is",
        "are",
        "this",
        "that",
        "its",
        "her",
        "his",
        "their",
    }
)
"""Words that never identify anything; dropped from names and from prompts before they are compared."""

PACKAGING_WORDS = frozenset(
    {
        "lora",
        "loras",
        "locon",
        "loha",
        "lokr",
        "lycoris",
        "lyco",
        "ia3",
        "sd",
        "sd1",
        "sd15",
        "sd2",
        "sd21",
        "sdxl",
        "xl",
        "flux",
        "pony",
        "illustrious",
        "noobai",
    }
)
"""Words that say how or for which base an adapter was packaged, not what it is."""
GLUED_PACKAGING = ("lora", "locon")
"""Packaging words that Civitai page names and file names glue to the word before ("umbrellalora")."""
MIN_GLUED_STEM = 4
"""Least length of what stays of a word when a glued packaging word is cut off ("flora" stays "flora")."""

_WORD = re.compile(r"[^\W_]+", re.UNICODE)
_HAS_CAMEL = re.compile(r"[a-z][A-Z]|[A-Z][A-Z][a-z]")
_CAMEL = re.compile(r"(?<=[a-z])(?=[A-Z])|(?<=[A-Z])(?=[A-Z][a-z])")
_VERSION_WORD = re.compile(r"^(v|ver|version)(\d+)$")
_VERSION_SPLIT = re.compile(r"^(v|ver|version)$")
_COPY_MARK = re.compile(r"(\s*\((\d+|copy)\)|\s+-\s+copy(\s*\(\d+\))?|\s+copy\s+\d+)\s*$", re.IGNORECASE)
_PROMPT_PARTS = re.compile(r"[,;|\n]")
_PARENTHESES = re.compile(r"[(\[{][^)\]}]*[)\]}]")


def words(text: str) -> list[str]:
    """Lower-case words of ``text`` (letters and digits; underscores, hyphens and punctuation separate)."""
    return _WORD.findall(text.lower())


def prompt_runs(text: str) -> list[list[tuple[str, bool]]]:
    """A prompt's content words, per comma-separated part (also ``;``, ``|``, new lines), each with whether a
    function word came right before it inside its part ("a fox with a hat" → fox, (hat, True))."""
    runs = []
    for part in _PROMPT_PARTS.split(text):
        run: list[tuple[str, bool]] = []
        gap = False
        for word in map(_unglued, words(split_camel(part))):
            if word in FUNCTION_WORDS:
                gap = bool(run)
                continue
            run.append((word, gap))
            gap = False
        if run:
            runs.append(run)
    return runs


def content_words(text: str) -> list[str]:
    """:func:`words` without :data:`FUNCTION_WORDS` (how prompts and tags are compared); camelCase is split, so a
    file name pasted into a prompt ("brightHoodie") reads as its words, and a glued packaging word is cut off as in
    :func:`name_words`, so a prompt writing a name as it is spelt ("angelora") reads as that name does."""
    return [w for w in map(_unglued, words(split_camel(text))) if w not in FUNCTION_WORDS]


def _split_versions(tokens: list[str]) -> tuple[list[str], tuple[int, ...] | None]:
    """Remove version markers ("v2", "v1 5" from "v1.5", "ver 3", "version 2") and return the version found."""
    kept: list[str] = []
    version: tuple[int, ...] | None = None
    i = 0
    while i < len(tokens):
        joined = _VERSION_WORD.match(tokens[i])
        if joined or (_VERSION_SPLIT.match(tokens[i]) and i + 1 < len(tokens) and tokens[i + 1].isdigit()):
            number = [int(joined.group(2))] if joined else [int(tokens[i + 1])]
            i += 1 if joined else 2
            while i < len(tokens) and tokens[i].isdigit() and len(tokens[i]) <= 2:
                number.append(int(tokens[i]))
                i += 1
            version = tuple(number)
            continue
        kept.append(tokens[i])
        i += 1
    return kept, version


def split_camel(text: str) -> str:
    """camelCase words split ("brightHoodie" → "bright Hoodie"); packaging words such as "LoRA" left whole."""

    def split(match: re.Match[str]) -> str:
        word = match.group(0)
        return word if word.lower() in PACKAGING_WORDS else _CAMEL.sub(" ", word)

    return _WORD.sub(split, text) if _HAS_CAMEL.search(text) else text


def _prepared(name: str) -> str:
    """The name without a duplicate-download mark ("(1)", "- Copy") and with camelCase split into words."""
    return split_camel(_COPY_MARK.sub("", name.strip()))


@functools.lru_cache(maxsize=1 << 16)
def name_words(name: str, *, keep_parentheses: bool = True) -> tuple[str, ...]:
    """The words that identify an adapter named ``name`` (a title or a file stem), in order.

    Case, punctuation, underscores, camelCase, version markers, duplicate-download marks, packaging words (also
    glued to a word's end: "umbrellalora") and function words do not count; ``keep_parentheses=False`` also drops
    parenthesised parts ("Makima (Chainsaw Man)" → ``("makima",)``). When nothing but packaging words is left, those
    are kept (a file called "lora" is "lora").
    """
    text = _prepared(name)
    if not keep_parentheses:
        text = _PARENTHESES.sub(" ", text)
    tokens, _ = _split_versions(words(text))
    content = [t for t in tokens if t not in FUNCTION_WORDS]
    content = [_unglued(t) for t in content]
    kept: list[str] = []
    after_packaging = False
    for token in content:
        if token in PACKAGING_WORDS or (after_packaging and token.isdigit() and len(token) <= 2):
            after_packaging = True  # "SD 1.5", "Flux.1": the number belongs to the base model
            continue
        after_packaging = False
        kept.append(token)
    return tuple(kept or content)


def _unglued(token: str) -> str:
    """A word with a packaging word glued to its end ("umbrellalora", "johanssonlora") → the word alone. Names,
    prompts and tags all go through it, so a word that merely ends like one ("Angelora" → "ange") still compares
    equal to itself."""
    for suffix in GLUED_PACKAGING:
        if token.endswith(suffix) and len(token) - len(suffix) >= MIN_GLUED_STEM:
            return token[: -len(suffix)]
    return token


@functools.lru_cache(maxsize=1 << 16)
def version_of(name: str) -> tuple[int, ...] | None:
    """The version a title or file name carries ("v2" → (2,), "_v1.5" → (1, 5), "ver 3" → (3,)), or None."""
    return _split_versions(words(_prepared(name)))[1]


def is_copy_name(name: str) -> bool:
    """True for names a duplicate download or a file manager gives a copy ("x (1)", "x - Copy")."""
    return _COPY_MARK.search(name.strip()) is not None
