"""`compose make-pairs CLEAN_DIR --degrade noise|rain|haze|jpeg|lowlight [--sigma 25] --out DIR`."""

from __future__ import annotations

import argparse
from pathlib import Path

from composer.cli import arg_types
from composer.cli.option_values import option_values
from composer.cli.reporting import add_json_option, emit_json

DEGRADE_OPTIONS = ("sigma", "quality", "beta", "airlight", "density", "gamma", "scale")
"""The options that set the degradation's parameters (:class:`composer.restoration.degrade.DegradeOptions`)."""


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `make-pairs` subcommand."""
    from composer.restoration.degrade_names import DEGRADATIONS

    parser = subparsers.add_parser(
        "make-pairs",
        help="synthesise restoration training pairs from clean images",
        description=(
            "Degrade every image of CLEAN_DIR and write OUT/clean/ and OUT/degraded/ with matching names "
            "(the layout `compose train-restore --pairs` reads). Seeded: the same seed gives the same pairs."
        ),
    )
    parser.add_argument("clean_dir", type=Path, metavar="CLEAN_DIR", help="folder of clean images")
    parser.add_argument("--degrade", choices=DEGRADATIONS, required=True, help="degradation to apply")
    parser.add_argument("--sigma", type=float, default=25.0, help="noise σ on 0–255 (15, 25 or 50; default 25)")
    parser.add_argument("--quality", type=int, default=10, help="JPEG quality 1–95 (default 10)")
    parser.add_argument("--beta", type=float, default=1.2, help="haze scattering coefficient β (default 1.2)")
    parser.add_argument("--airlight", type=float, default=0.9, help="haze atmospheric light A in [0, 1] (default 0.9)")
    parser.add_argument("--density", type=float, default=0.02, help="rain drop density in [0, 1] (default 0.02)")
    parser.add_argument("--gamma", type=float, default=2.0, help="low-light gamma (default 2.0)")
    parser.add_argument("--scale", type=float, default=0.3, help="low-light exposure scale (default 0.3)")
    parser.add_argument("--seed", type=arg_types.seed, default=0, help="seed of the first image (image i uses seed+i)")
    parser.add_argument("--out", type=arg_types.output_dir, required=True, metavar="DIR", help="output folder")
    add_json_option(parser)
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    """Write the pairs and report how many."""
    from composer.restoration.degrade import DegradeOptions, make_pairs

    options = DegradeOptions(**option_values(args, DEGRADE_OPTIONS))
    pairs = make_pairs(args.clean_dir, args.out, args.degrade, options, seed=args.seed)
    summary = {
        "degradation": args.degrade,
        "pairs": len(pairs),
        "clean": str(args.out / "clean"),
        "degraded": str(args.out / "degraded"),
    }
    if args.json:
        emit_json(summary)
    else:
        print(f"wrote {len(pairs)} {args.degrade} pairs to {args.out} (clean/ and degraded/)")
    return 0
