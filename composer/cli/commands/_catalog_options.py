"""The options that name a library's catalog, shared by the commands that read one (`compose search`, `info`,
`analyze`, `train-retriever`; `index` takes ``--db`` alone): ``--library DIR`` and ``--db``, and the catalog they
open."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

DB_HELP = "catalog database (default DIR/.lora-composer/)"


def add_catalog_options(parser: argparse.ArgumentParser, *, library_help: str = "folder holding the adapters") -> None:
    """Add ``--library DIR`` (required) and ``--db FILE`` to ``parser``."""
    parser.add_argument("--library", type=Path, required=True, metavar="DIR", help=library_help)
    add_db_option(parser)


def add_db_option(parser: argparse.ArgumentParser) -> None:
    """Add ``--db FILE``, the catalog database (by default inside the library folder)."""
    parser.add_argument("--db", type=Path, default=None, help=DB_HELP)


def open_catalog(args: argparse.Namespace, *, scan: bool) -> Any:
    """The :class:`weights_index.Library` of ``--library`` (at ``--db``), first scanned incrementally when ``scan``."""
    from weights_index.catalog import Library

    library = Library(args.library, db_path=args.db)
    if scan:
        library.scan()
    return library
