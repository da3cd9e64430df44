"""The on-disk copies of the smoke-test presets: a preset is built once and saved under the cache folder, later loads
come from disk. The cache is written to a temp folder and renamed into place, so a killed build never leaves a half
cache, and a fingerprint of the configs decides whether a cached copy is still current."""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

from composer.settings import CACHE_ENV, preset_cache_root
from composer.smoke_presets import registry
from composer.smoke_presets.registry import PresetSpec, preset_spec
from fusion.errors import PresetError

logger = logging.getLogger(__name__)

MARKER_FILE = "preset.json"
"""Written last into a preset's cache folder; names the preset and the fingerprint of the configs it was built from."""


def _is_current(folder: Path, spec: PresetSpec) -> bool:
    """Whether ``folder`` holds a complete build of ``spec`` with today's fingerprint."""
    try:
        marker = json.loads((folder / MARKER_FILE).read_text())
    except (OSError, ValueError):
        return False
    return marker == {"name": spec.name, "fingerprint": spec.fingerprint()}


def _install(built: Path, target: Path, spec: PresetSpec) -> None:
    """Move a finished build into place; a stale copy is moved aside first, a concurrent fresh one is kept."""
    stale = None
    if target.exists():
        stale = Path(tempfile.mkdtemp(prefix=f".{spec.name}.", suffix=".stale", dir=target.parent))
        os.replace(target, stale / "old")
    try:
        os.replace(built, target)
    except OSError:
        if not _is_current(target, spec):
            raise
    finally:
        if stale is not None:
            shutil.rmtree(stale, ignore_errors=True)


def ensure_preset(name: str, cache_dir: str | Path | None = None) -> Path:
    """Return the cache folder of a built-in preset, building and saving it first if it is missing or stale.

    The build goes to a hidden ``.<name>.*.partial`` folder beside the target and is renamed into place only after
    the marker file is written, so readers never see a half-written cache; leftovers of killed builds are ignored.
    """
    spec = preset_spec(name)
    root = preset_cache_root(cache_dir)
    target = root / name
    if _is_current(target, spec):
        return target
    try:
        root.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(prefix=f".{name}.", suffix=".partial", dir=root))
    except OSError as exc:
        raise PresetError(
            f"cannot write the preset cache: {exc}", path=root, hint=f"set {CACHE_ENV} or cache_dir"
        ) from exc
    logger.info("building the %s preset into %s (first use, or its cached copy is stale)", name, target)
    try:
        registry.build_preset(name).save_pretrained(work, safe_serialization=True)
        (work / MARKER_FILE).write_text(json.dumps({"name": name, "fingerprint": spec.fingerprint()}))
        _install(work, target, spec)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return target
