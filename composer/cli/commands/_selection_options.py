"""The option that caps how many adapters retrieval picks, shared by `compose generate` (with ``--loras auto``)
and `compose search` (which shows that pick), so both spell, check and default it alike."""

from __future__ import annotations

import argparse

from composer.cli import arg_types


def add_max_loras_option(parser: argparse.ArgumentParser, *, help_text: str) -> None:
    """Add ``--max-loras N`` (a positive count; None leaves the retriever's default) to ``parser``."""
    parser.add_argument("--max-loras", type=arg_types.positive_int, default=None, metavar="N", help=help_text)
