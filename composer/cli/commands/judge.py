"""`compose judge IMAGE...` (toy world only): what the toy world's judge sees in images made with ``toy-sd``, against
their prompt. It reads nothing but the toy world's 64×64 pictures; it is no judge of real models' images."""

from __future__ import annotations

import argparse
from pathlib import Path

from composer.cli.reporting import add_json_option, emit_json, format_table


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `judge` subcommand."""
    parser = subparsers.add_parser(
        "judge",
        help="toy world only: read toy-sd images with the toy world's judge and check each composed concept",
        description=(
            "Toy world only: it reads images of --model toy-sd and cannot judge other models' images. Read 64×64 "
            "images written by `compose --model toy-sd` with the toy world's judge: the background, character shape "
            "and colour, clothing, style and object it sees (or `unsure` where the evidence does not settle it), and "
            "for each toy concept composed into the image (from the PNG's JSON sidecar) whether it is found, unsure "
            "or not found. Exit code 3 when an expected attribute is not found for sure."
        ),
    )
    parser.add_argument("images", nargs="+", type=Path, metavar="IMAGE", help="PNG files with their JSON sidecars")
    add_json_option(parser)
    parser.set_defaults(handler=run)


def _mark(expected: str | None, seen: str) -> str:
    """The ok column: blank when nothing was expected, yes, unsure, or NO."""
    from composer.toyworld.reader import UNSURE

    if expected is None:
        return ""
    return "yes" if seen == expected else ("unsure" if seen == UNSURE else "NO")


def run(args: argparse.Namespace) -> int:
    """Judge every image; print a table (or JSON); exit 3 if an expected attribute is not seen."""
    from composer.toyworld.verdict import judge_file

    verdicts = {str(path): judge_file(path) for path in args.images}
    if args.json:
        emit_json({path: verdict.as_dict() for path, verdict in verdicts.items()})
    else:
        for path, verdict in verdicts.items():
            rows = [
                {
                    "attribute": attr,
                    "seen": seen,
                    "expected": verdict.expected.get(attr, ""),
                    "ok": _mark(verdict.expected.get(attr), seen),
                }
                for attr, seen in verdict.seen.items()
            ]
            print(f"{path}:")
            print(format_table(rows, ["attribute", "seen", "expected", "ok"]))
            for name in verdict.concepts:
                state = verdict.concept_state(name)
                print(f"  concept {name}: {'NOT found' if state == 'missing' else state}")
            print(f"  all expected attributes found: {'yes' if verdict.all_found else 'no'}")
    return 0 if all(v.all_found for v in verdicts.values()) else 3
