"""`compose analyze --library DIR`: measure each adapter's high-frequency shift ΔH, store it, plot the profiles."""

from __future__ import annotations

import argparse

from composer.cli import arg_types
from composer.cli.commands._catalog_options import add_catalog_options, open_catalog
from composer.cli.commands._model_options import add_model_option
from composer.cli.reporting import add_json_option, emit_json, format_table

COLUMNS = ("name", "delta_h", "band", "hf_with", "hf_without", "error")


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `analyze` subcommand."""
    parser = subparsers.add_parser(
        "analyze",
        help="frequency analysis: store each adapter's ΔH in the catalog (CMLoRA's order) and plot profiles",
        description="Generate a few prompts with and without each adapter of the library on the chosen model, "
        "score the images' high-frequency content (radial log-magnitude spectrum), store ΔH = score(with) - "
        "score(without) in the catalog and write radial-profile plots.",
    )
    add_catalog_options(parser, library_help="LoRA folder (indexed incrementally)")
    add_model_option(parser)
    parser.add_argument("--prompts", nargs="+", default=None, help="prompts to generate (default: three built-in)")
    parser.add_argument(
        "--steps", type=arg_types.positive_int, default=None, help="denoising steps (default: 4 on presets, else 20)"
    )
    parser.add_argument("--seed", type=arg_types.seed, default=0)
    parser.add_argument(
        "--size", type=arg_types.positive_int, default=None, help="image side in pixels (default: 64 on tiny presets)"
    )
    parser.add_argument("--weight", type=float, default=0.8, help="adapter weight while generating (default 0.8)")
    parser.add_argument(
        "--plot", type=arg_types.output_dir, default=None, metavar="DIR", help="write radial-profile PNGs here"
    )
    add_json_option(parser, detail="instead of a table")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    """Scan the library, analyze every adapter for the model, print the table (or one JSON document)."""
    from composer.analysis.frequency import analyze_library
    from composer.facade import PRESET_STEPS, TINY_SIZE
    from composer.presets import PRESETS, load_preset

    library = open_catalog(args, scan=True)
    preset = args.model in PRESETS
    steps = args.steps or (PRESET_STEPS if preset else 20)
    size = args.size or (TINY_SIZE if preset and args.model.startswith("tiny") else None)
    pipe = load_preset(args.model)
    report = analyze_library(
        library,
        pipe,
        model=args.model,
        prompts=args.prompts,
        steps=steps,
        seed=args.seed,
        size=size,
        weight=args.weight,
        plot_dir=args.plot,
    )
    if args.json:
        emit_json(report.to_json())
        return 0
    rows = [analysis.to_json() for analysis in report.adapters]
    print(format_table(rows, COLUMNS) if rows else f"no {report.family} adapters found in {library.root}")
    scored = sum(a.delta_h is not None for a in report.adapters)
    print(
        f"\n{scored} of {len(report.adapters)} adapters scored on {report.model} ({len(report.prompts)} prompts, "
        f"{steps} steps, seed {args.seed}); high-frequency band: radii >= {report.cut} of {report.radii[-1]}"
    )
    if report.summary_plot is not None:
        print(f"plots: {report.summary_plot.parent}")
    return 0
