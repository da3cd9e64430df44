"""The environment settings users may set: which model runs when none is named and where caches live.

Kept free of heavy imports so that parsers (``compose --help``) can show the defaults without loading torch.
"""

from __future__ import annotations

import os
from pathlib import Path

MODEL_ENV = "LORA_COMPOSER_MODEL"
"""Environment variable naming the model every command and the facade use when none is named."""
BUILT_IN_DEFAULT = "toy-sd"
"""The model used when neither a command nor :data:`MODEL_ENV` names one."""
CACHE_ENV = "LORA_COMPOSER_CACHE"
"""Environment variable naming LoRA Composer's cache root (presets under ``presets/``, gates under ``gates/``)."""


def default_model() -> str:
    """``$LORA_COMPOSER_MODEL`` when set (a preset, diffusers folder or hub id), else the trained ``toy-sd``."""
    return os.environ.get(MODEL_ENV) or BUILT_IN_DEFAULT


def cache_root() -> Path:
    """Where built presets and trained gates are kept when no other place is given: ``$LORA_COMPOSER_CACHE``, else
    ``~/.cache/lora-composer``."""
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "lora-composer"


def preset_cache_root(cache_dir: str | Path | None = None) -> Path:
    """Where presets are cached: ``cache_dir``, else ``$LORA_COMPOSER_CACHE/presets``, else the user's cache. Kept
    here, free of heavy imports, so that callers which only need the path (test fixtures, parsers) load no torch.

    The user's cache is ``~/.cache/lora-composer/presets``; each preset gets a folder named after it inside.
    """
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    return cache_root() / "presets"
