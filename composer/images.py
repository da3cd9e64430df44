"""Saving generated images the way A1111 users expect: a ``parameters`` PNG text chunk plus a JSON sidecar.

The ``parameters`` text follows the WebUI's layout (prompt line, ``Negative prompt:`` line, then comma-separated
``Key: value`` pairs with ``Lora hashes: "name: hash, …"``) so Civitai, the WebUI's PNG Info tab and ComfyUI
loaders read it. The sidecar holds the same facts machine-readably, plus the composition and why each adapter
was chosen.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image, PngImagePlugin


@dataclass
class GenerationRecord:
    """Everything needed to reproduce one image: prompt, settings, and the adapters with weights and hashes."""

    prompt: str
    negative_prompt: str = ""
    steps: int = 20
    guidance_scale: float | None = None
    seed: int | None = None
    width: int = 0
    height: int = 0
    model: str = ""
    sampler: str = ""
    method: str = "merge"
    adapters: Sequence[Mapping[str, Any]] = field(default_factory=list)
    extra: Mapping[str, Any] = field(default_factory=dict)


def _quote(value: str) -> str:
    return f'"{value}"' if re.search(r"[,:\"]", value) else value


def a1111_parameters(record: GenerationRecord) -> str:
    """The A1111 ``parameters`` text for ``record`` (prompt carries ``<lora:name:w>`` tags for its adapters)."""
    tags = " ".join(
        f"<lora:{a['name']}:{a['weight']}>" for a in record.adapters if f"<lora:{a['name']}:" not in record.prompt
    )
    lines = [f"{record.prompt} {tags}".strip()]
    if record.negative_prompt:
        lines.append(f"Negative prompt: {record.negative_prompt}")
    pairs: list[tuple[str, Any]] = [("Steps", record.steps)]
    if record.sampler:
        pairs.append(("Sampler", record.sampler))
    if record.guidance_scale is not None:
        pairs.append(("CFG scale", f"{record.guidance_scale:g}"))
    if record.seed is not None:
        pairs.append(("Seed", record.seed))
    if record.width and record.height:
        pairs.append(("Size", f"{record.width}x{record.height}"))
    if record.model:
        pairs.append(("Model", record.model))
    hashes = ", ".join(f"{a['name']}: {a['hash']}" for a in record.adapters if a.get("hash"))
    if hashes:
        pairs.append(("Lora hashes", f'"{hashes}"'))
    pairs.append(("Composition", record.method))
    pairs.extend(record.extra.items())
    lines.append(", ".join(f"{key}: {_quote(str(value)) if key != 'Lora hashes' else value}" for key, value in pairs))
    return "\n".join(lines)


def save_image(image: Image.Image, path: str | Path, record: GenerationRecord) -> tuple[Path, Path]:
    """Write ``image`` as PNG with the ``parameters`` chunk, and ``<path>.json`` beside it; returns both paths.

    Both files are written to temporary names and renamed, so a crash never leaves a half-written image.
    """
    path = Path(path).with_suffix(".png")
    path.parent.mkdir(parents=True, exist_ok=True)
    info = PngImagePlugin.PngInfo()
    parameters = a1111_parameters(record)
    info.add_text("parameters", parameters)
    sidecar = path.with_suffix(".json")
    document = {
        "prompt": record.prompt,
        "negative_prompt": record.negative_prompt,
        "steps": record.steps,
        "guidance_scale": record.guidance_scale,
        "seed": record.seed,
        "width": record.width,
        "height": record.height,
        "model": record.model,
        "sampler": record.sampler,
        "method": record.method,
        "adapters": [dict(a) for a in record.adapters],
        "extra": dict(record.extra),
        "parameters": parameters,
    }
    _atomic_write(path, lambda handle: image.save(handle, format="PNG", pnginfo=info))
    _atomic_write(sidecar, lambda handle: handle.write(json.dumps(document, indent=2, default=str).encode()))
    return path, sidecar


def _atomic_write(path: Path, write: Any) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
