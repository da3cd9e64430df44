"""What one composition request chose and produced: the adapters picked (and left out, with why) and the images.

:class:`ChosenAdapter` carries the one request type (:class:`composer.prompts.LoraTag`) with where it came from and
why; :class:`CompositionResult` is what :meth:`composer.facade.Composer.run` returns and what an image's record is
written from.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from composer.prompts import LoraTag
from fusion.cfg_branches import Branches, describe_branches


@dataclass
class ChosenAdapter:
    """One adapter of a composition: the request itself (a :class:`~composer.prompts.LoraTag`, whether it came
    from a prompt tag, the CLI, the app or the API), where it came from, and why it was chosen."""

    request: LoraTag
    source: str = "explicit"
    score: float | None = None
    reasons: list[str] = field(default_factory=list)
    trigger_words: list[str] = field(default_factory=list)
    hash: str | None = None
    path: str | None = None

    @property
    def name(self) -> str:
        """The adapter's name (catalog name or file path)."""
        return self.request.name

    @property
    def weight(self) -> float | str:
        """Its weight: a number or a keyframe schedule."""
        return self.request.weight

    def as_dict(self) -> dict[str, Any]:
        """JSON-friendly view (what sidecars, ``--json`` and the app show): the request's fields, then the rest."""
        request = {k: v for k, v in dataclasses.asdict(self.request).items() if k != "weight_given"}
        fields = {**request, **{k: v for k, v in self.__dict__.items() if k != "request"}}
        return {k: v for k, v in fields.items() if v not in (None, [], "")}

    def record(self) -> dict[str, Any]:
        """What an image's record keeps of it: name, weight, file hash, where it came from and why."""
        return {key: getattr(self, key) for key in ("name", "weight", "hash", "source", "reasons")}


@dataclass(frozen=True)
class RejectedAdapter:
    """An adapter ``loras="auto"`` found named in the prompt but left out, why, the pick it lost to (if any), and
    whether the cap (``max_loras``) was the reason."""

    name: str
    reason: str
    lost_to: str | None = None
    capped: bool = False

    def as_dict(self) -> dict[str, Any]:
        """JSON-friendly view."""
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}


@dataclass
class CompositionResult:
    """What :meth:`Composer.run` produced: the images, the adapters used, and where the files went."""

    images: list[Image.Image]
    prompt: str
    adapters: list[ChosenAdapter]
    method: str
    seed: int
    steps: int
    seconds: float
    paths: list[Path] = field(default_factory=list)
    plots: dict[str, Path] = field(default_factory=dict)
    """Plot kind (``scores``, ``gates``, ``weights``) → PNG, when plots were asked for."""
    branches: Branches = "both"
    """CFG branches the adapters acted on (``"conditional"``: the unconditional prediction came from the base; a
    mapping: per adapter, a branch or the share of its weight the unconditional half carried)."""
    rejected: list[RejectedAdapter] = field(default_factory=list)
    """Adapters ``loras="auto"`` found named in the prompt but left out (the cap, the same words as a pick, a
    category already filled), each with why."""

    def as_dict(self) -> dict[str, Any]:
        """JSON-friendly summary (``plots`` only when plots were written)."""
        summary = {
            "prompt": self.prompt,
            "method": self.method,
            "seed": self.seed,
            "steps": self.steps,
            "seconds": round(self.seconds, 3),
            "adapters": [a.as_dict() for a in self.adapters],
            "images": [str(p) for p in self.paths],
        }
        if self.rejected:
            summary["rejected"] = [r.as_dict() for r in self.rejected]
        if self.branches != "both":
            summary["branches"] = self.branches
        if self.plots:
            summary["plots"] = {kind: str(path) for kind, path in self.plots.items()}
        return summary

    def record_extra(self) -> dict[str, Any]:
        """Settings an image's record adds to the A1111 ones (the CFG branches, when not both)."""
        return {"Composition branches": describe_branches(self.branches)} if self.branches != "both" else {}
