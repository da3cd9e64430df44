"""The model every command and the facade use when none is named: ``toy-sd``, or ``$LORA_COMPOSER_MODEL``.

Kept free of heavy imports so that parsers (``compose --help``) can show it without loading torch.
"""

from __future__ import annotations

import os

MODEL_ENV = "LORA_COMPOSER_MODEL"
BUILT_IN_DEFAULT = "toy-sd"


def default_model() -> str:
    """``$LORA_COMPOSER_MODEL`` when set (a preset, diffusers folder or hub id), else the trained ``toy-sd``."""
    return os.environ.get(MODEL_ENV) or BUILT_IN_DEFAULT
