"""`compose index DIR`: scan a LoRA folder into its catalog (incrementally) and list what is in it."""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

from composer.cli.commands._catalog_options import add_db_option
from composer.cli.reporting import add_json_option, emit_json, format_table

COLUMNS = ("name", "family", "format", "rank", "triggers", "error")
MAX_TRIGGERS_SHOWN = 3
MAX_ERROR_CHARS = 90


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `index` subcommand."""
    parser = subparsers.add_parser(
        "index",
        help="scan a LoRA folder into its catalog and list it",
        description="Scan DIR (incrementally: unchanged files are not reopened) and print the catalog.",
    )
    parser.add_argument("directory", metavar="DIR", type=Path, help="folder holding the adapter files")
    add_db_option(parser)
    add_json_option(parser, detail="instead of a table")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    """Scan, then print the catalog table and a one-line summary (or one JSON document)."""
    from weights_index.catalog import Library

    library = Library(args.directory, db_path=args.db)
    report = library.scan()
    entries = library.entries()
    if args.json:
        emit_json(
            {
                "library": str(library.root),
                "database": str(library.db_path),
                "scan": report.to_json(),
                "entries": [entry.to_json() for entry in entries],
            }
        )
        return 0
    rows = [_row(entry) for entry in entries]
    print(format_table(rows, COLUMNS) if rows else f"no adapter files found in {library.root}")
    print(
        f"\n{len(entries)} adapters ({len(report.broken)} broken) in {library.root}; this scan: "
        f"{len(report.added)} added, {len(report.updated)} updated, {report.unchanged} unchanged, "
        f"{len(report.removed)} removed, {len(report.renamed)} renamed in {report.seconds:.2f} s"
    )
    return 0


def _row(entry: Any) -> dict[str, Any]:
    triggers = list(entry.trigger_words)
    shown = ", ".join(triggers[:MAX_TRIGGERS_SHOWN]) + (" …" if len(triggers) > MAX_TRIGGERS_SHOWN else "")
    return {
        "name": entry.name,
        "family": entry.family,
        "format": entry.format,
        "rank": entry.rank,
        "triggers": shown,
        "error": _short_error(entry),
    }


def _short_error(entry: Any) -> str | None:
    """The error without the (long) path prefix, truncated to fit a table cell."""
    if entry.error is None:
        return None
    text = entry.error
    for prefix in (f"{entry.path}: ", f"{os.path.realpath(entry.path)}: "):  # realpath: never fails on a link loop
        text = text.removeprefix(prefix)
    text = f"{entry.error_type}: {text}"
    return text if len(text) <= MAX_ERROR_CHARS else text[: MAX_ERROR_CHARS - 1] + "…"
