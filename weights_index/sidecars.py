"""Files beside an adapter that describe it: ``NAME.civitai.info``, A1111's ``NAME.json``, and preview images (found
beside the file, or embedded in its header as a ModelSpec thumbnail and written out).

A sidecar over :data:`MAX_SIDECAR_BYTES` is refused (:class:`~fusion.errors.SidecarTooLargeError`) without being
read; a malformed one is skipped and noted in the warnings.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
from pathlib import Path
from typing import Any

from fusion.errors import SidecarTooLargeError
from weights_index.text_safety import storable_json

IMAGE_EXTENSIONS = ("png", "jpg", "jpeg", "webp", "gif")
PREVIEW_PATTERNS = tuple(f"{{stem}}.preview.{ext}" for ext in IMAGE_EXTENSIONS) + tuple(
    f"{{stem}}.{ext}" for ext in IMAGE_EXTENSIONS
)
"""Preview file names A1111, Forge and Civitai Helper look for, best first."""

CIVITAI_SIDECAR = "{stem}.civitai.info"
A1111_SIDECAR = "{stem}.json"
MAX_SIDECAR_BYTES = 4 * 1024 * 1024
"""The largest sidecar read; real Civitai and A1111 files are a few kB to a few hundred kB."""
SIDECAR_SUFFIXES = tuple(p.format(stem="") for p in (CIVITAI_SIDECAR, A1111_SIDECAR, *PREVIEW_PATTERNS))
"""What follows the adapter's stem in the names of its sidecars and previews."""
_IMAGE_MAGIC = ((b"\x89PNG\r\n\x1a\n", "png"), (b"\xff\xd8\xff", "jpg"), (b"GIF8", "gif"))


def sidecar_names(stem: str) -> tuple[str, ...]:
    """File names next to an adapter whose changes change its metadata (sidecars and previews)."""
    return tuple(stem + suffix for suffix in SIDECAR_SUFFIXES)


def load_sidecar(path: Path, warnings: list[str]) -> dict[str, Any]:
    """The JSON object in the sidecar at ``path`` ({} when absent, a symlink, or malformed: noted in ``warnings``).

    Raises :class:`SidecarTooLargeError` for a sidecar over :data:`MAX_SIDECAR_BYTES`, without reading it.
    """
    if path.is_symlink() or not path.is_file():  # a symlinked sidecar could point anywhere: not followed
        return {}
    try:
        size = path.stat().st_size
        if size > MAX_SIDECAR_BYTES:
            raise SidecarTooLargeError(
                f"sidecar {path.name} is {size} bytes, over the limit of {MAX_SIDECAR_BYTES}; it is not read",
                path=path,
                hint="shrink or remove the sidecar",
            )
        data = storable_json(json.loads(path.read_text(encoding="utf-8")))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        warnings.append(f"{path.name} is unreadable ({type(exc).__name__}); skipped")
        return {}
    except RecursionError:
        warnings.append(f"{path.name} is nested too deeply; skipped")
        return {}
    if not isinstance(data, dict):
        warnings.append(f"{path.name} is not a JSON object; skipped")
        return {}
    return data


def preview_files(path: Path) -> tuple[str, ...]:
    """Preview images beside the adapter at ``path`` (symlinks not followed), best first."""
    candidates = (path.with_name(p.format(stem=path.stem)) for p in PREVIEW_PATTERNS)
    return tuple(str(c) for c in candidates if c.is_file() and not c.is_symlink())


def write_thumbnail(uri: str, directory: Path, warnings: list[str]) -> Path | None:
    """Decode a ``data:image/...;base64,`` thumbnail and store it under its content hash."""
    head, _, payload = uri.partition(",")
    if not head.startswith("data:") or ";base64" not in head:
        warnings.append("modelspec.thumbnail is not a base64 data URI; skipped")
        return None
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        warnings.append("modelspec.thumbnail holds invalid base64; skipped")
        return None
    ext = _image_extension(data)
    if ext is None:
        warnings.append("modelspec.thumbnail is not a PNG, JPEG, GIF or WebP image; skipped")
        return None
    target = directory / f"{hashlib.sha256(data).hexdigest()[:24]}.{ext}"
    if not target.exists():
        directory.mkdir(parents=True, exist_ok=True)
        partial = target.with_suffix(".partial")
        partial.write_bytes(data)
        partial.replace(target)
    return target


def _image_extension(data: bytes) -> str | None:
    for magic, ext in _IMAGE_MAGIC:
        if data.startswith(magic):
            return ext
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    return None
