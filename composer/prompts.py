"""A1111-style LoRA prompt tags: ``<lora:name:0.8>`` and the extensions artists already type.

Supported, matching the WebUI and its popular extensions:

- ``<lora:name>`` (weight 1.0, or the calibrated default weight, see :mod:`composer.calibration`), ``<lora:name:0.8>``
  (text encoder and denoiser), ``<lora:name:0.8:0.5>`` (as in A1111: the first value is the text-encoder
  multiplier and the default for the denoiser, the second overrides the denoiser's);
- named arguments ``te=0.5``, ``unet=0.8`` (A1111), ``lbw=INS`` or ``lbw=1,0,0,…`` (LoRA Block Weight),
  ``start=0.2`` / ``stop=0.8`` (step fractions or step numbers, LoRA Block Weight);
- a loractl keyframe schedule in place of the weight: ``<lora:name:0@0,1@0.5>``.

Parsing never touches weights: it returns the prompt without tags and one :class:`LoraTag` per tag.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from fusion.errors import CompositionError
from fusion.weight_range import checked_weight

TAG_PATTERN = re.compile(r"<lora:([^>]*)>", re.IGNORECASE)
_NUMBER = re.compile(r"^[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?$")
_KEYFRAMES = re.compile(r"^\s*[+-]?[\d.]+\s*@\s*[\d.]+\s*(,\s*[+-]?[\d.]+\s*@\s*[\d.]+\s*)*$")


@dataclass(frozen=True)
class LoraTag:
    """One ``<lora:…>`` tag: which adapter, with what weight (a number or a keyframe schedule) and options."""

    name: str
    weight: float | str = 1.0
    text_encoder_weight: float | None = None
    block_weights: str | None = None
    start: float | None = None
    stop: float | None = None
    weight_given: bool = True
    """False when the request names no denoiser weight (``<lora:name>``, a bare name in a list): a composer with
    calibrated defaults then uses the adapter's calibrated weight in place of ``weight``."""

    @property
    def is_scheduled(self) -> bool:
        """True when the weight is a keyframe schedule rather than a constant."""
        return isinstance(self.weight, str)


def adapter_request(
    name: str,
    weight: float = 0.8,
    schedule: str | None = None,
    block_weights: str | None = None,
    start: float | None = None,
    stop: float | None = None,
) -> LoraTag:
    """The request a form or an API call makes, as the one request type (a :class:`LoraTag`): ``schedule`` (keyframes
    ``0@0,1@0.5``) replaces the constant ``weight`` when given; blank block weights mean none."""
    keyframes = (schedule or "").replace(" ", "")
    if keyframes and "@" not in keyframes:
        raise CompositionError(
            f"adapter {name!r}: schedule {schedule!r} is not a keyframe list",
            hint="write keyframes as weight@position, e.g. 0@0,1@0.5",
        )
    return LoraTag(
        name=name,
        weight=_keyframes(keyframes, f"adapter {name!r}")
        if keyframes
        else checked_weight(weight, f"adapter {name!r}: weight"),
        block_weights=(block_weights or "").strip() or None,
        start=start,
        stop=stop,
    )


def _number(text: str, tag: str) -> float:
    if not _NUMBER.match(text.strip()):
        raise CompositionError(f"{text!r} in {tag} is not a number", hint="write weights like <lora:name:0.8>")
    return float(text)


def _keyframes(text: str, where: str) -> str:
    """A keyframe list whose weights (before each ``@``) are checked against the weight range; returned as is."""
    for item in re.split(r"[,;]", text):
        weight = item.partition("@")[0].strip()
        if weight and _NUMBER.match(weight):
            checked_weight(float(weight), f"keyframe weight in {where}")
    return text


def _weight(text: str, tag: str) -> float | str:
    value = text.strip()
    if _KEYFRAMES.match(value) and "@" in value:
        return _keyframes(value.replace(" ", ""), tag)
    return checked_weight(_number(value, tag), f"weight in {tag}")


def parse_tag(body: str) -> LoraTag:
    """Parse the inside of one tag (``name:0.8:lbw=INS``) into a :class:`LoraTag`."""
    tag = f"<lora:{body}>"
    parts = body.split(":")
    name = parts[0].strip()
    if not name:
        raise CompositionError(f"{tag} has no adapter name", hint="write <lora:name:0.8>")
    positional: list[str] = []
    named: dict[str, str] = {}
    for part in parts[1:]:
        if "=" in part:
            key, _, value = part.partition("=")
            named[key.strip().lower()] = value.strip()
        elif part.strip():
            positional.append(part)
    if len(positional) > 2:
        raise CompositionError(f"{tag} has {len(positional)} positional values; at most 2 (te, unet)")
    unknown = set(named) - {"te", "unet", "lbw", "start", "stop", "step"}
    if unknown:
        raise CompositionError(
            f"{tag} has unknown option(s) {sorted(unknown)}", hint="known: te, unet, lbw, start, stop"
        )
    weight: float | str = 1.0
    text_encoder_weight: float | None = None
    if positional:
        weight = _weight(positional[0], tag)
        if not isinstance(weight, str):
            text_encoder_weight = weight
    if len(positional) == 2:
        weight = _weight(positional[1], tag)
    if "te" in named:
        text_encoder_weight = checked_weight(_number(named["te"], tag), f"text-encoder weight in {tag}")
    if "unet" in named:
        weight = _weight(named["unet"], tag)
    if "step" in named:
        weight = _weight(named["step"], tag)
    start = _number(named["start"], tag) if "start" in named else None
    stop = _number(named["stop"], tag) if "stop" in named else None
    return LoraTag(
        name=name,
        weight=weight,
        text_encoder_weight=text_encoder_weight,
        block_weights=named.get("lbw"),
        start=start,
        stop=stop,
        weight_given=bool(positional) or any(key in named for key in ("unet", "step")),
    )


def extract_lora_tags(prompt: str) -> tuple[str, list[LoraTag]]:
    """Split a prompt into (the prompt without tags, its tags in order). A repeated name keeps the last tag."""
    tags: dict[str, LoraTag] = {}
    for match in TAG_PATTERN.finditer(prompt):
        parsed = parse_tag(match.group(1))
        tags.pop(parsed.name, None)
        tags[parsed.name] = parsed
    cleaned = TAG_PATTERN.sub("", prompt)
    cleaned = re.sub(r"\s+,", ",", re.sub(r"\s{2,}", " ", cleaned)).strip(" ,")
    return cleaned, list(tags.values())


def parse_lora_list(spec: str) -> list[LoraTag]:
    """Parse the CLI's ``--loras name:0.8,other,third:0@0,1@0.5`` list (``auto`` is handled by the caller).

    Entries are separated by commas, except commas inside a keyframe schedule (``0@0,1@0.5``), which belong to the
    preceding entry.
    """
    entries: list[str] = []
    for piece in spec.split(","):
        piece = piece.strip()
        if not piece:
            continue
        if entries and "@" in piece and ":" not in piece:
            entries[-1] = f"{entries[-1]},{piece}"
        else:
            entries.append(piece)
    return [parse_tag(entry) for entry in entries]
