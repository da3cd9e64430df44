"""`compose export "<prompt with <lora:…> tags>" --out FILE [--format kohya|diffusers] [--rank R | --energy E]`."""

from __future__ import annotations

import argparse
from pathlib import Path

from composer.cli import arg_types
from composer.cli.commands._model_options import add_model_option
from composer.cli.reporting import add_json_option, emit_json, format_table

COLUMNS = ("layer", "rank_in", "rank", "retained")


def add_squeeze_options(parser: argparse.ArgumentParser) -> None:
    """--format, --rank / --energy (shared by `export` and `convert --to lora`)."""
    parser.add_argument("--format", choices=("kohya", "diffusers"), default="kohya", help="file layout (kohya)")
    size = parser.add_mutually_exclusive_group()
    size.add_argument(
        "--rank", type=arg_types.positive_int, default=None, help="keep this many singular values per layer"
    )
    size.add_argument("--energy", type=float, default=None, help="keep this fraction of each layer's ‖ΔW‖²")


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `export` subcommand."""
    parser = subparsers.add_parser(
        "export",
        help="write a static composition as one ordinary LoRA file",
        description=(
            "Compose the adapters the prompt's <lora:name:weight> tags name (weights, lbw= block vectors and te= "
            "weights included) exactly as `compose` merges them, and write the merged update as ONE ordinary LoRA "
            "file that diffusers' load_lora_weights, A1111/ComfyUI and LoRA Composer load. Exact at full rank (the "
            "default); --rank/--energy keep the top singular values per layer (exact QR-core SVD) and report the "
            "retained energy."
        ),
    )
    parser.add_argument("prompt", help="a prompt with <lora:name:weight> tags (or give --loras)")
    parser.add_argument("--loras", default=None, help="extra adapters: name:0.8,other (paths or library names)")
    parser.add_argument(
        "--out", type=arg_types.output_file, required=True, metavar="FILE", help="the LoRA file to write"
    )
    add_model_option(parser)
    parser.add_argument("--library", type=Path, default=None, help="LoRA folder the tags' names refer to")
    add_squeeze_options(parser)
    add_json_option(parser)
    parser.set_defaults(handler=run)


def report(result, as_json: bool) -> None:
    """Print a :class:`composer.export.SqueezeReport` as a table or one JSON document."""
    if as_json:
        emit_json(
            {
                "out": str(result.out),
                "format": result.format,
                "family": result.family,
                "sources": result.sources,
                "retained": result.retained,
                "bytes": result.file_size,
                "layers": result.rows(),
            }
        )
        return
    print(format_table(result.rows(), COLUMNS))
    print(
        f"\nretained energy {result.retained:.6f} over {len(result.layers)} layers; "
        f"{result.file_size:,} bytes ({result.format}, {result.family}) -> {result.out}"
    )


def run(args: argparse.Namespace) -> int:
    """Compose, squeeze, write and report."""
    from composer.export import export_composition
    from composer.facade import Composer

    composer = Composer(model=args.model, library=args.library)
    result = export_composition(
        composer, args.prompt, args.out, loras=args.loras, format=args.format, rank=args.rank, energy=args.energy
    )
    report(result, args.json)
    return 0
