"""The options that name the base model: ``--model`` (a preset, single-file checkpoint, diffusers folder or hub id)
and, for checkpoints, ``--vae`` and ``--text-encoders``, shared by `compose generate` and `compose app`; and ``--model``
alone, for the other commands that load a pipeline."""

from __future__ import annotations

import argparse
from pathlib import Path

from composer.settings import BUILT_IN_DEFAULT, MODEL_ENV, default_model

DEFAULT_NOTE = f"(default {BUILT_IN_DEFAULT} or ${MODEL_ENV})"
"""How a ``--model`` help names its default, :func:`composer.settings.default_model`."""

CHECKPOINT_FORMS = "preset name, .safetensors checkpoint (SD 1.x/2.x, SDXL, FLUX.1), diffusers folder or hub id"
PIPELINE_FORMS = "preset name, diffusers folder or hub id"


def add_model_option(parser: argparse.ArgumentParser, *, forms: str = PIPELINE_FORMS) -> None:
    """Add ``--model``, defaulting to :func:`~composer.settings.default_model`; ``forms`` starts its help with
    what the option accepts, :data:`DEFAULT_NOTE` ends it."""
    parser.add_argument("--model", default=default_model(), help=f"{forms} {DEFAULT_NOTE}")


def add_model_options(parser: argparse.ArgumentParser) -> None:
    """Add ``--model`` (any of :data:`CHECKPOINT_FORMS`), ``--vae`` and ``--text-encoders`` to ``parser``."""
    add_model_option(parser, forms=CHECKPOINT_FORMS)
    parser.add_argument(
        "--vae",
        type=Path,
        default=None,
        metavar="FILE",
        help="autoencoder for a checkpoint --model: a VAE .safetensors in the original layout (e.g. ae.safetensors) "
        "or a diffusers folder; overrides one baked into the checkpoint",
    )
    parser.add_argument(
        "--text-encoders",
        type=Path,
        default=None,
        metavar="DIR",
        help="diffusers folder with text_encoder/, text_encoder_2/ and their tokenizers (e.g. a FLUX.1 repository) "
        "for a checkpoint that lacks them, such as a FLUX transformer file",
    )


def model_argv(args: argparse.Namespace) -> list[str]:
    """The command-line arguments that reproduce the model options in ``args``."""
    argv = ["--model", args.model]
    if args.vae is not None:
        argv += ["--vae", str(args.vae)]
    if args.text_encoders is not None:
        argv += ["--text-encoders", str(args.text_encoders)]
    return argv
