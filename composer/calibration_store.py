"""Calibrated default weights kept in the library catalog, keyed by the adapter file's content and the base model.

A calibration (:mod:`composer.calibration`) depends on two things only: the adapter file and the base model. The
catalog keeps it in the entry's ``scores`` under ``"calibration"``, one record per base model (its
:func:`model_identity`), each with the file's SHA-256 and the measure's version. A scan that finds the file's content
changed clears the entry's scores; a record whose hash, version or target differs from the current ones is ignored
(and replaced when calibrated again), so a stale weight is never used. This module imports no torch: ``compose info``
reads the records without loading a model.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from typing import Any

CATALOG_KEY = "calibration"
"""The key of an entry's ``scores`` under which its calibrations are kept."""
VERSION = 1
"""Changes whenever the measure changes, so calibrations stored by another version are computed again."""
TARGET = 1.5
"""The ratio (adapter effect / guidance signal) every adapter is calibrated to; chosen on tuning scenes only
(docs/methods.md#calibration)."""
_SAMPLED_VALUES = 64
"""Values per parameter tensor that enter a model's identity."""


@dataclass(frozen=True)
class Calibration:
    """One adapter's calibration on one base model: the weight, the ratio at weight 1 and at that weight, the target,
    whether the weight hit an end of the search range (``capped``) and the probe prompts."""

    weight: float
    ratio_at_one: float
    ratio: float
    target: float
    capped: bool
    probes: tuple[str, ...]
    version: int = VERSION

    def to_json(self) -> dict[str, Any]:
        """JSON-ready view (what the catalog stores)."""
        return {**asdict(self), "probes": list(self.probes)}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Calibration:
        """The calibration :meth:`to_json` wrote."""
        return cls(
            weight=float(data["weight"]),
            ratio_at_one=float(data["ratio_at_one"]),
            ratio=float(data["ratio"]),
            target=float(data["target"]),
            capped=bool(data["capped"]),
            probes=tuple(data.get("probes", ())),
            version=int(data.get("version", 0)),
        )

    def describe(self) -> str:
        """One line for reasons and ``compose info``: the weight and what it was solved from."""
        cap = " (capped at the search range's end)" if self.capped else ""
        return (
            f"calibrated weight {self.weight:g}: effect/guidance {self.ratio:.2f} at it (target {self.target:g}), "
            f"{self.ratio_at_one:.2f} at weight 1{cap}"
        )


def model_identity(pipe: Any, label: str | None = None) -> str:
    """The base model's identity: ``label@digest``, the digest over the denoiser's and text encoders' classes, configs
    and a sample of every parameter's values (rounded to bfloat16, so the same weights in another dtype or on another
    device give the same identity). Computed once per pipeline object."""
    cached = pipe.__dict__.get("_calibration_identity")
    if cached is not None:
        return cached
    import torch

    digest = hashlib.sha256()
    for part in ("unet", "transformer", "text_encoder", "text_encoder_2"):
        module = getattr(pipe, part, None)
        if module is None:
            continue
        config = getattr(module, "config", None)
        config_dict = config.to_dict() if hasattr(config, "to_dict") else dict(config or {})
        digest.update(f"{part}:{type(module).__name__}:{json.dumps(config_dict, sort_keys=True, default=str)}".encode())
        with torch.no_grad():
            for name, parameter in module.named_parameters():
                sample = parameter.detach().flatten()[:_SAMPLED_VALUES].to("cpu", torch.bfloat16).float()
                digest.update(name.encode())
                digest.update(sample.numpy().tobytes())
    name = label or str(getattr(pipe, "name_or_path", "") or type(pipe).__name__)
    identity = f"{name}@{digest.hexdigest()[:16]}"
    pipe.__dict__["_calibration_identity"] = identity
    return identity


def stored(entry: Any, identity: str) -> Calibration | None:
    """The calibration the catalog holds for ``entry`` on the model ``identity``, or None when it holds none that is
    current (same file content, measure version and target)."""
    record = (entry.scores.get(CATALOG_KEY) or {}).get(identity)
    if not record or record.get("sha256") != entry.sha256 or entry.sha256 is None:
        return None
    calibration = Calibration.from_json(record)
    if calibration.version != VERSION or calibration.target != TARGET:
        return None
    return calibration


def store(library: Any, entry: Any, identity: str, calibration: Calibration) -> None:
    """Keep ``calibration`` for ``entry`` on the model ``identity`` (other models' records kept)."""
    records = dict(library.get(entry.id).scores.get(CATALOG_KEY) or {})
    records[identity] = {**calibration.to_json(), "sha256": entry.sha256}
    library.update_scores(entry.id, {CATALOG_KEY: records})


def stored_lines(entry: Any) -> list[str]:
    """``compose info``'s lines: one per base model with a current calibration of ``entry``."""
    lines = []
    for identity in sorted(entry.scores.get(CATALOG_KEY) or {}):
        calibration = stored(entry, identity)
        if calibration is not None:
            lines.append(f"{calibration.describe()} on {identity}")
    return lines
