"""`compose calibrate --library DIR`: measure and store each adapter's calibrated default weight on the model.

A command of its own rather than an ``index`` option: indexing reads file headers and never loads a model (it stays
torch-free and fast), while calibration runs the base model; composing with calibrated defaults calibrates whatever is
missing anyway, so this command only does that work ahead of time, for the whole library at once.
"""

from __future__ import annotations

import argparse
from typing import Any

from composer.cli.commands._catalog_options import add_catalog_options, open_catalog
from composer.cli.commands._model_options import add_model_options
from composer.cli.reporting import add_json_option, emit_json, format_table

COLUMNS = ("name", "weight", "ratio_at_one", "ratio", "capped", "stored", "error")


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `calibrate` subcommand."""
    parser = subparsers.add_parser(
        "calibrate",
        help="store each adapter's calibrated default weight for the model in the catalog",
        description="For every adapter of the library made for the model's family, measure the weight at which its "
        "effect on the denoiser's prediction is the calibration target times the guidance signal (see "
        "docs/methods.md#calibration) and store it in the catalog with the file's hash and the model's identity. "
        "Adapters already calibrated for this file content and model are listed, not measured again. "
        "Composer(..., calibrated_defaults=True) gives requests that name no weight the stored weight.",
    )
    add_catalog_options(parser, library_help="LoRA folder (indexed incrementally)")
    add_model_options(parser)
    add_json_option(parser, detail="instead of a table")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    """Scan the library, calibrate every adapter of the model's family, print the table (or one JSON document)."""
    from composer.calibration import Calibrator, catalog_calibration
    from composer.calibration_store import model_identity, stored
    from composer.mixin import make_composable
    from composer.presets import load_preset, preset_family
    from fusion.errors import ComposerError

    library = open_catalog(args, scan=True)
    pipe = make_composable(load_preset(args.model, vae=args.vae, text_encoders=args.text_encoders))
    pipe.set_progress_bar_config(disable=True)
    family = preset_family(pipe)
    calibrator = Calibrator(pipe)
    identity = model_identity(pipe, args.model)
    rows: list[dict[str, Any]] = []
    for entry in library.entries():
        if entry.family not in (family, "unknown"):
            continue
        row: dict[str, Any] = {"name": entry.name, "stored": stored(entry, identity) is not None}
        rows.append(row)
        if not entry.ok:
            row["error"] = f"{entry.error_type}: {entry.error}"
            continue
        try:
            row.update(catalog_calibration(calibrator, library, entry, identity).to_json())
        except ComposerError as error:
            row["error"] = str(error)
    if args.json:
        emit_json({"model": identity, "adapters": rows})
        return 0
    print(format_table(rows, COLUMNS) if rows else f"no {family} adapters found in {library.root}")
    done = sum("weight" in row for row in rows)
    print(f"\n{done} of {len(rows)} adapters calibrated on {identity} ({sum(r['stored'] for r in rows)} were stored)")
    return 0
