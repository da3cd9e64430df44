"""Terminal output shared by the CLI commands: aligned tables for people, one JSON document for scripts."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Mapping, Sequence
from typing import Any, TextIO


def format_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> str:
    """Rows as a left-aligned text table with a header line; missing cells are blank."""
    cells = [[_cell(row.get(col)) for col in columns] for row in rows]
    widths = [max([len(col), *(len(r[i]) for r in cells)]) for i, col in enumerate(columns)]
    lines = ["  ".join(col.ljust(w) for col, w in zip(columns, widths)).rstrip()]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in cells]
    return "\n".join(lines)


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (list, tuple)):
        return ", ".join(_cell(v) for v in value)
    return str(value)


def emit_json(document: Any, stream: TextIO | None = None) -> None:
    """Write exactly one JSON document (plus newline) to stdout."""
    out = stream or sys.stdout
    json.dump(document, out, indent=2, default=str, ensure_ascii=False)
    out.write("\n")


def add_json_option(parser: argparse.ArgumentParser, *, detail: str = "") -> None:
    """Add ``--json``, which prints one JSON document (see :func:`emit_json`); ``detail`` ends its help (e.g.
    "instead of a table")."""
    parser.add_argument("--json", action="store_true", help=f"print one JSON document {detail}".rstrip())
