"""`compose train-shira --model M --images DIR --prompt "…" --mask snip --r 32 --steps N --out FILE`."""

from __future__ import annotations

import argparse
from pathlib import Path

from composer.cli import arg_types
from composer.cli.commands import _training_options as training
from fusion.mask_types import MASK_TYPES


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `train-shira` subcommand."""
    parser = subparsers.add_parser(
        "train-shira",
        help="train a SHiRA sparse adapter on a folder of images",
        description=(
            "DreamBooth-style SHiRA training of the denoiser's attention projections (PEFT ShiraConfig + accelerate). "
            "Saves our SHiRA safetensors layout with the base family, mask type, r and a base-weights fingerprint."
        ),
    )
    parser.add_argument("--images", type=Path, required=True, metavar="DIR", help="training images (+ optional .txt)")
    parser.add_argument("--prompt", required=True, help="instance prompt for images without a .txt caption")
    parser.add_argument("--mask", choices=MASK_TYPES, default="snip", help="SHiRA mask type (default snip)")
    parser.add_argument(
        "--r", type=arg_types.positive_int, default=32, help="budget: K = r·(out+in) entries per layer (default 32)"
    )
    training.add_options(
        parser,
        model_help="preset, local diffusers folder or hub id (SD 1.x/2.x/XL)",
        steps=500,
        learning_rate=1e-4,
        examples="images",
        seeded="masks, noise and batches",
    )
    parser.add_argument(
        "--calibration-batches", type=arg_types.positive_int, default=8, help="batches for grad/snip masks (default 8)"
    )
    training.add_adapter_output(parser)
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    """Load the model, train, save, and report the loss before/after."""
    from composer.training.shira import ShiraTrainConfig, train_shira

    own = ("images", "prompt", "out", "mask", "r", "calibration_batches")
    result = training.train(args, train_shira, ShiraTrainConfig, own)
    return training.report_adapter(
        args,
        result,
        "sparse values",
        f"({args.mask} mask, r={args.r})",
        family=result.adapter.family,
        mask=args.mask,
        r=args.r,
    )
