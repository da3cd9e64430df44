"""The `compose` command line: `compose "prompt" [options]` or `compose SUBCOMMAND ...`.

Subcommands live one per file in :mod:`composer.cli.commands`; each module exposes ``register(subparsers)``
which adds its parser and sets ``handler`` to a function ``(args) -> exit code``. Exit codes: 0 success,
1 a :class:`~fusion.errors.ComposerError` (message printed, no traceback), 2 bad usage.
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys
from collections.abc import Sequence

from composer.cli import commands
from composer.cli.verbosity import configure_logging
from fusion.errors import ComposerError
from weights_index.text_safety import is_valid_unicode

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2

VERBOSITY_FLAGS = frozenset({"-v", "-vv", "-vvv", "--verbose", "-q", "-qq", "--quiet"})
"""Flags that may come before a bare prompt (``compose -v "prompt"``)."""


def build_parser() -> argparse.ArgumentParser:
    """The full parser with every subcommand found in :mod:`composer.cli.commands`."""
    return _parser_and_subcommands()[0]


def _parser_and_subcommands() -> tuple[argparse.ArgumentParser, frozenset[str]]:
    """The full parser and the names of its subcommands."""
    parser = argparse.ArgumentParser(
        prog="compose",
        description="Retrieve and compose LoRA adapters in diffusers pipelines.",
    )
    add_verbosity(parser, default=0)
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for info in sorted(pkgutil.iter_modules(commands.__path__), key=lambda m: m.name):
        if info.name.startswith("_"):
            continue
        module = importlib.import_module(f"{commands.__name__}.{info.name}")
        module.register(subparsers)
    for subparser in subparsers.choices.values():
        add_verbosity(subparser, default=argparse.SUPPRESS)  # before or after the subcommand alike
    return parser, frozenset(subparsers.choices)


def add_verbosity(parser: argparse.ArgumentParser, default: object) -> None:
    """``-v`` (repeatable: progress notes, then debug details) and ``-q`` (errors only) on stderr."""
    group = parser.add_argument_group("diagnostics")
    group.add_argument("-v", "--verbose", action="count", default=default, help="report more on stderr (-vv: debug)")
    group.add_argument("-q", "--quiet", action="count", default=default, help="report only errors on stderr")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `compose` console script; returns the process exit code."""
    args_list = list(sys.argv[1:] if argv is None else argv)
    parser, subcommands = _parser_and_subcommands()
    first = next((i for i, arg in enumerate(args_list) if arg not in VERBOSITY_FLAGS), len(args_list))
    if first < len(args_list) and args_list[first] not in subcommands and not args_list[first].startswith("-"):
        args_list.insert(first, "generate")
    odd = next((arg for arg in args_list if not is_valid_unicode(arg)), None)
    if odd is not None:
        parser.error(f"argument {odd!a} is not valid UTF-8 text")
    args = parser.parse_args(args_list)
    configure_logging(args.verbose, args.quiet)
    if getattr(args, "handler", None) is None:
        parser.print_help()
        return EXIT_USAGE
    try:
        return int(args.handler(args) or EXIT_OK)
    except ComposerError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except OSError as exc:  # the file system said no (disk full, a folder made read-only meanwhile): one line
        print(f"error: {exc.strerror or exc}: {exc.filename or ''}".rstrip(": "), file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
