"""`compose judge IMAGE...`: what the toy world's judge sees in images made with ``toy-sd``, against their prompt."""

from __future__ import annotations

import argparse
from pathlib import Path

from composer.reporting import emit_json, format_table


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `judge` subcommand."""
    parser = subparsers.add_parser(
        "judge",
        help="read toy-sd images with the toy world's judge and check each composed concept",
        description=(
            "Read 64×64 images written by `compose --model toy-sd` with the toy world's judge: the background, "
            "character shape and colour, clothing, style and object it sees, and for each toy concept composed "
            "into the image (from the PNG's JSON sidecar) whether it is there. Exit code 3 when one is missing."
        ),
    )
    parser.add_argument("images", nargs="+", type=Path, metavar="IMAGE", help="PNG files with their JSON sidecars")
    parser.add_argument("--json", action="store_true", help="print one JSON document")
    parser.set_defaults(handler=run)


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
                    "ok": "" if attr not in verdict.expected else ("yes" if verdict.expected[attr] == seen else "NO"),
                }
                for attr, seen in verdict.seen.items()
            ]
            print(f"{path}:")
            print(format_table(rows, ["attribute", "seen", "expected", "ok"]))
            for name, found in verdict.concepts.items():
                print(f"  concept {name}: {'found' if found else 'NOT found'}")
            print(f"  all expected attributes found: {'yes' if verdict.all_found else 'no'}")
    return 0 if all(v.all_found for v in verdicts.values()) else 3
