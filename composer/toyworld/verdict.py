"""What a toy-world image should show and whether it does: expectations from a prompt and the adapters composed
into it, checked by the judge. Used by ``compose judge`` (and so by ``make demo``) and by the quality benchmark.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import torch

from composer.toyworld.reader import UNSURE, Reader
from composer.toyworld.world import CONCEPTS

MAX_SIDECAR_BYTES = 1024 * 1024
"""The largest image sidecar read (compose writes a few kB)."""

_WORDS: dict[str, dict[str, str]] = {
    "shape": {"circle": "circle", "square": "square", "triangle": "triangle"},
    "colour": {"red": "red", "blue": "blue", "green": "green", "yellow": "yellow"},
    "clothing": {"hat": "hat", "scarf": "scarf"},
    "object": {"ball": "ball", "box": "box"},
    "style": {"striped": "striped", "stripes": "striped", "outlined": "outlined", "outline": "outlined"},
    "background": {
        "sky": "sky",
        "grass": "grass",
        "meadow": "grass",
        "night": "night",
        "snow": "snow",
        "snowy": "snow",
    },
}
"""Base-vocabulary words of the world's captions and the attribute value each names."""


@dataclass
class Verdict:
    """The judge's reading of one image against what its prompt and adapters ask for. A reading of
    :data:`~composer.toyworld.reader.UNSURE` never matches an expectation: an unsure concept is not found."""

    seen: dict[str, str]
    expected: dict[str, str]
    concepts: dict[str, bool] = field(default_factory=dict)
    sets: dict[str, dict[str, str]] = field(default_factory=dict)

    @property
    def all_found(self) -> bool:
        """Every expected attribute was seen."""
        return all(self.seen[attr] == value for attr, value in self.expected.items())

    @property
    def unsure(self) -> list[str]:
        """The expected attributes the judge could not settle."""
        return [attr for attr in self.expected if self.seen[attr] == UNSURE]

    def concept_state(self, name: str) -> str:
        """``found``, ``unsure`` (nothing it sets was seen otherwise, but something was unsure) or ``missing``."""
        if self.concepts[name]:
            return "found"
        values = self.sets.get(name, {})
        if any(self.seen[a] == UNSURE for a in values) and all(self.seen[a] in (v, UNSURE) for a, v in values.items()):
            return "unsure"
        return "missing"

    def as_dict(self) -> dict:
        """JSON-able form."""
        return {
            "seen": self.seen,
            "expected": self.expected,
            "concepts": self.concepts,
            "concept_states": {name: self.concept_state(name) for name in self.concepts},
            "unsure": self.unsure,
            "all_found": self.all_found,
        }


def expected_attributes(prompt: str, adapters: list[str]) -> tuple[dict[str, str], dict[str, dict[str, str]]]:
    """Attributes the prompt names in base-vocabulary words, overridden by the toy concepts among ``adapters``.

    Returns (all expected attributes, per concept the attributes it sets). A background mentioned with "blue sky"
    is read as a background, not a colour; the concepts and the later words win.
    """
    expected: dict[str, str] = {}
    words = re.findall(r"[a-z]+", prompt.lower().replace("blue sky", "sky"))
    for attr, table in _WORDS.items():
        for word in words:
            if word in table:
                expected[attr] = table[word]
    concepts = {name: dict(CONCEPTS[name].sets) for name in adapters if name in CONCEPTS}
    for sets in concepts.values():
        expected.update(sets)
    return expected, concepts


@lru_cache(maxsize=1)
def shipped_judge() -> Reader:
    """The judge that ships with the model: its network, and the calibration fitted on images labelled by eye."""
    from composer.toyworld.model import WEIGHTS_DIR

    return Reader.load(WEIGHTS_DIR.parent)


def judge_images(images: torch.Tensor, prompts: list[str], adapters: list[list[str]]) -> list[Verdict]:
    """Verdicts for images (B, 3, 64, 64) in [0, 1] with the prompt and adapter names each was made with."""
    seen = shipped_judge().read(images)
    verdicts = []
    for reading, prompt, names in zip(seen, prompts, adapters):
        expected, concepts = expected_attributes(prompt, names)
        found = {name: all(reading[a] == v for a, v in sets.items()) for name, sets in concepts.items()}
        verdicts.append(Verdict(reading, expected, found, concepts))
    return verdicts


def judge_file(path: Path) -> Verdict:
    """Judge a PNG written by ``compose``: its JSON sidecar says the prompt and the composed adapters."""
    import numpy as np
    from PIL import Image

    from fusion.errors import ComposerError

    sidecar = path.with_suffix(".json")
    if not sidecar.is_file():
        raise ComposerError(f"{path} has no JSON sidecar, so what it should show is unknown", path=sidecar)
    prompt, names = _read_record(sidecar)
    try:
        with Image.open(path) as opened:
            if opened.size != (64, 64):  # read from the header: a decompression bomb is never decoded
                raise ComposerError(
                    f"the image is {opened.size[0]}×{opened.size[1]}; the judge reads toy-world images (64×64 from "
                    "toy-sd)",
                    path=path,
                )
            image = opened.convert("RGB")
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise ComposerError(
            f"not a readable image ({type(exc).__name__})", path=path, hint="give a PNG written by compose"
        ) from exc
    tensor = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)[None]
    return judge_images(tensor, [prompt], [names])[0]


def _read_record(sidecar: Path) -> tuple[str, list[str]]:
    """The prompt and adapter names of a compose image's JSON sidecar; :class:`ComposerError` when it is not one."""
    from fusion.errors import ComposerError

    def refuse(why: str) -> ComposerError:
        return ComposerError(
            f"the sidecar {why}", path=sidecar, hint="give the .json that compose wrote beside the PNG"
        )

    if sidecar.stat().st_size > MAX_SIDECAR_BYTES:
        raise refuse(f"is over {MAX_SIDECAR_BYTES} bytes")
    try:
        record = json.loads(sidecar.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise refuse(f"is not JSON ({type(exc).__name__})") from exc
    if not isinstance(record, dict):
        raise refuse("is not a JSON object")
    prompt, adapters = record.get("prompt", ""), record.get("adapters", [])
    if not isinstance(prompt, str):
        raise refuse("has a prompt that is not text")
    if not isinstance(adapters, list) or not all(
        isinstance(item, dict) and isinstance(item.get("name"), str) for item in adapters
    ):
        raise refuse("has an adapter list that is not a list of named adapters")
    return prompt, [item["name"] for item in adapters]
