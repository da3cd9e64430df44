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
