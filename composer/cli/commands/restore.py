"""`compose restore IMAGE --adapter derain [--adapter denoise] [--loras style:0.6] [--method merge] --out PATH`."""

from __future__ import annotations

import argparse
from pathlib import Path

from composer.cli import arg_types
from composer.cli.option_values import option_values
from composer.cli.reporting import add_json_option, emit_json, format_table

METHODS = ("merge", "switch", "composite")
COLUMNS = ("name", "weight", "source")


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `restore` subcommand."""
    parser = subparsers.add_parser(
        "restore",
        help="restore an image with restoration adapters (optionally composed with style adapters)",
        description=(
            "Run the model's editing pipeline (FLUX.1 Kontext; InstructPix2Pix or img2img for SD/SDXL) on IMAGE with "
            "restoration adapters composed with style adapters. The prompt is the adapters' task prompts "
            "(from their metadata) unless --task is given."
        ),
    )
    parser.add_argument("image", type=Path, metavar="IMAGE", help="the degraded input image")
    parser.add_argument(
        "--adapter",
        action="append",
        required=True,
        metavar="NAME",
        help="restoration adapter: library name or .safetensors path, optionally NAME:WEIGHT (repeatable)",
    )
    parser.add_argument("--loras", default=None, help="style adapters to compose in, e.g. 'watercolor:0.6,other'")
    parser.add_argument("--method", default="merge", choices=METHODS, help="composition method (default merge)")
    parser.add_argument("--library", type=Path, default=None, help="adapter folder (indexed incrementally)")
    parser.add_argument("--model", default="tiny-flux-kontext", help="preset, diffusers folder or hub id")
    parser.add_argument("--task", default=None, help="task prompt (default: from the adapters' metadata)")
    parser.add_argument(
        "--steps", type=arg_types.positive_int, default=None, help="denoising steps (default 28 for Kontext; 4 on tiny)"
    )
    parser.add_argument("--guidance", type=float, default=None, help="guidance scale (default 2.5 for Kontext)")
    parser.add_argument("--strength", type=float, default=None, help="img2img strength (SD img2img only)")
    parser.add_argument("--seed", type=arg_types.seed, default=0)
    parser.add_argument("--out", type=Path, default=Path("out"), help="output .png path or folder (default ./out)")
    add_json_option(parser)
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    """Restore the image and report what was composed."""
    from composer.restoration.restore import Restorer

    options = option_values(args, ("loras", "method", "task", "steps", "seed", "out"))
    options |= option_values(args, ("strength",), given_only=True)
    if args.guidance is not None:
        options["guidance_scale"] = args.guidance
    restorer = Restorer(model=args.model, library=args.library)
    result = restorer.restore(args.image, adapters=args.adapter, progress=not args.json, **options)
    if args.json:
        emit_json(result.as_dict())
        return 0
    print(format_table([a.as_dict() for a in result.adapters], COLUMNS))
    print(f"prompt: {result.prompt}")
    print(f"{result.pipeline}, {result.method}, {result.steps} steps, {result.seconds:.1f}s -> {result.paths[0]}")
    return 0
