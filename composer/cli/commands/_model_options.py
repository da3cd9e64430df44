"""The options that name the base model: ``--model`` (a preset, single-file checkpoint, diffusers folder or hub id)
and, for checkpoints, ``--vae`` and ``--text-encoders``, shared by `compose generate` and `compose app`; and ``--model``
alone, shared by `compose analyze` and `compose export`."""

from __future__ import annotations

import argparse
from pathlib import Path

from composer.model_default import default_model

MODEL_HELP = (
    "preset name, .safetensors checkpoint (SD 1.x/2.x, SDXL, FLUX.1), diffusers folder or hub id "
    "(default toy-sd or $LORA_COMPOSER_MODEL)"
)

PIPELINE_MODEL_HELP = "preset name, diffusers folder or hub id (default toy-sd or $LORA_COMPOSER_MODEL)"


def add_model_options(parser: argparse.ArgumentParser) -> None:
    """Add ``--model``, ``--vae`` and ``--text-encoders`` to ``parser``."""
    parser.add_argument("--model", default=default_model(), help=MODEL_HELP)
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


def add_pipeline_model_option(parser: argparse.ArgumentParser) -> None:
    """Add ``--model`` alone, with the same default as :func:`add_model_options` and the help
    :data:`PIPELINE_MODEL_HELP`."""
    parser.add_argument("--model", default=default_model(), help=PIPELINE_MODEL_HELP)


def model_argv(args: argparse.Namespace) -> list[str]:
    """The command-line arguments that reproduce the model options in ``args``."""
    argv = ["--model", args.model]
    if args.vae is not None:
        argv += ["--vae", str(args.vae)]
    if args.text_encoders is not None:
        argv += ["--text-encoders", str(args.text_encoders)]
    return argv
