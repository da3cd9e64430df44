"""Checkpoint files in a models folder, as the app's model picker lists them (no torch import: headers only).

A folder may be laid out as A1111 keeps it (``models/Stable-diffusion/``, sub-folders allowed), as ComfyUI does
(``models/checkpoints/``, FLUX transformer files in ``models/unet/`` or ``models/diffusion_models/``), be one of those
folders itself, or just hold checkpoints. Files directly in the folder and anywhere under the known layout folders
are read by header; only SD 1.x / SD 2.x / SDXL / FLUX.1 text-to-image checkpoints are listed (LoRAs, VAEs, broken
files, SD 3.x, transformers in diffusers' layout and inpainting / pix2pix / FLUX Fill, Depth and Canny variants are
not).
"""

from __future__ import annotations

import logging
from pathlib import Path

from composer.checkpoints.layout import CHECKPOINT_SUFFIXES, describe_checkpoint
from fusion.errors import ComposerError

logger = logging.getLogger(__name__)

LAYOUT_FOLDERS = (
    "models/Stable-diffusion",
    "Stable-diffusion",
    "models/checkpoints",
    "checkpoints",
    "models/unet",
    "unet",
    "models/diffusion_models",
    "diffusion_models",
)
"""Where A1111 and ComfyUI keep base models, relative to their root (or to the models folder)."""


def _candidates(root: Path) -> list[Path]:
    found = [p for p in root.iterdir() if p.is_file()]
    for name in LAYOUT_FOLDERS:
        folder = root / name
        if folder.is_dir():
            found += [p for p in folder.rglob("*") if p.is_file()]
    return [p for p in found if p.suffix.lower() in CHECKPOINT_SUFFIXES]


def list_model_files(root: str | Path) -> list[Path]:
    """The base-model checkpoints under ``root`` (see the module docstring), sorted by path; [] if it is no folder."""
    root = Path(root).expanduser()
    if not root.is_dir():
        return []
    listed = []
    for path in sorted({p.resolve() for p in _candidates(root)}):
        try:
            describe_checkpoint(path)
        except ComposerError as exc:
            logger.debug("not a base-model checkpoint: %s (%s)", path, exc)
            continue
        listed.append(path)
    return listed
