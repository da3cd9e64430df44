"""LoRA Composer's cache folder, where built presets and trained gates are kept when no other place is given."""

from __future__ import annotations

import os
from pathlib import Path

CACHE_ENV = "LORA_COMPOSER_CACHE"
"""Environment variable naming LoRA Composer's cache root (presets under ``presets/``, gates under ``gates/``)."""


def cache_root() -> Path:
    """``$LORA_COMPOSER_CACHE``, else ``~/.cache/lora-composer``."""
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "lora-composer"
