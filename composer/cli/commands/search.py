"""`compose search "prompt" --library DIR`: rank a library's adapters for a prompt and show what would be picked."""

from __future__ import annotations

import argparse
from typing import Any

from composer.cli import arg_types
from composer.cli.commands._catalog_options import add_catalog_options, open_catalog
from composer.cli.commands._selection_options import add_max_loras_option
from composer.cli.reporting import add_json_option, emit_json, format_table

COLUMNS = ("rank", "name", "score", "family", "category", "signals", "pick")
SIGNAL_LABELS = {"trigger": "trigger", "metadata": "fts", "learned": "learned", "zero_shot": "zero-shot"}


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `search` subcommand."""
    parser = subparsers.add_parser(
        "search",
        help="rank a library's adapters for a prompt",
        description=(
            "Rank adapters by trigger words, metadata text, the trained retriever (if any) and, with --model, "
            "the zero-shot cross-attention response; show the selection `--loras auto` would make."
        ),
    )
    parser.add_argument("prompt", help="the prompt to retrieve adapters for")
    add_catalog_options(parser)
    parser.add_argument("--family", choices=("sd1", "sd2", "sdxl", "flux"), help="only adapters for this family")
    parser.add_argument(
        "-k", "--top", type=arg_types.positive_int, default=10, help="how many adapters to list (default 10)"
    )
    add_max_loras_option(
        parser, help_text="pick at most N adapters, as `compose --loras auto --max-loras N` would (default 5)"
    )
    parser.add_argument(
        "--model", default=None, help="pipeline (preset, folder or hub id) whose text encoder enables zero-shot scoring"
    )
    add_json_option(parser, detail="instead of a table")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    """Rank and select, then print a table with each pick's reasons (or one JSON document)."""
    from retrieval.retriever import Retriever

    pipeline = None
    if args.model:
        from composer.presets import load_preset

        pipeline = load_preset(args.model)
    retriever = Retriever(open_catalog(args, scan=False), pipe=pipeline)
    family = args.family or retriever.zero_shot_family
    hits = retriever.rank(args.prompt, family=family, k=args.top)
    picks = retriever.select(args.prompt, family=family, k=args.max_loras)
    if args.json:
        emit_json(
            {
                "prompt": args.prompt,
                "family": family,
                "notes": retriever.notes,
                "hits": [hit.to_json() for hit in hits],
                "selection": [pick.to_json() for pick in picks],
                "rejected": [item.to_json() for item in retriever.rejected],
                "generic": retriever.generic,
            }
        )
        return 0
    chosen = {pick.name: pick for pick in picks}
    rows = [_row(position, hit, chosen) for position, hit in enumerate(hits, start=1)]
    print(format_table(rows, COLUMNS) if rows else f"no adapter in {args.library} matches {args.prompt!r}")
    for note in retriever.notes:
        print(f"note: {note}")
    if not picks:
        print("\nselection: none (no adapter is named by a specific trigger word or title, none stands out by weights)")
    for pick in picks:
        extra = f", add to prompt: {', '.join(pick.missing_triggers)}" if pick.missing_triggers else ""
        print(f"\npick {pick.name} @ {pick.weight}{extra}")
        for reason in pick.reasons:
            if not reason.startswith("not used:"):
                print(f"  - {reason}")
    for item in retriever.rejected:
        hint = "; raise the cap with --max-loras" if item.capped else ""
        print(f"\nnot picked: {item.name}: {item.reason}" + (f" (kept {item.lost_to})" if item.lost_to else "") + hint)
    for phrase in retriever.generic:
        print(f"generic: {phrase}")
    return 0


def _row(position: int, hit: Any, chosen: dict[str, Any]) -> dict[str, Any]:
    signals = " ".join(f"{SIGNAL_LABELS[name]}#{verdict.rank}" for name, verdict in hit.signals.items())
    return {
        "rank": position,
        "name": hit.name,
        "score": round(hit.score, 4),
        "family": hit.family,
        "category": hit.category,
        "signals": signals,
        "pick": f"@ {chosen[hit.name].weight}" if hit.name in chosen else "",
    }
