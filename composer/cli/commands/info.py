"""`compose info NAME --library DIR`: everything the catalog knows about one adapter."""

from __future__ import annotations

import argparse
from typing import Any

from composer.calibration_store import CATALOG_KEY, stored_lines
from composer.cli.commands._catalog_options import add_catalog_options, open_catalog
from composer.cli.reporting import add_json_option, emit_json

MAX_TAGS_SHOWN = 15


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `info` subcommand."""
    parser = subparsers.add_parser(
        "info",
        help="show everything known about one adapter",
        description="Show one adapter's catalog entry: file facts, metadata, sidecars, hashes and errors.",
    )
    parser.add_argument("name", metavar="NAME", help="adapter name, id, relative path or title")
    add_catalog_options(parser)
    parser.add_argument("--no-scan", action="store_true", help="use the catalog as is, without an incremental scan")
    parser.add_argument(
        "--overlap",
        metavar="OTHER",
        default=None,
        help="also report SHiRA support overlap (AWOM/AWOR) between NAME and OTHER (both sparse adapters)",
    )
    add_json_option(parser)
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    """Scan (unless --no-scan), look the adapter up and print it."""
    library = open_catalog(args, scan=not args.no_scan)
    entry = library.get(args.name)
    overlap = _overlap(library, entry.name, args.overlap) if args.overlap else None
    if args.json:
        emit_json({**entry.to_json(), **({"overlap": overlap} if overlap is not None else {})})
        return 0
    for label, value in _fields(entry):
        if value not in (None, "", [], (), {}):
            print(f"{label + ':':<17}{value}")
    if overlap is not None:
        print(
            f"{'overlap:':<17}with {overlap['other']}: mean AWOR {overlap['mean_awor']:.6f}, "
            f"mean AWOM {overlap['mean_awom']:.4g}, max AWOM {overlap['max_awom']:.4g}, "
            f"shared support {overlap['mean_shared']:.2%} over {len(overlap['layers'])} layers"
        )
    return 0


def _overlap(library: Any, name: str, other: str) -> dict[str, Any]:
    """AWOM/AWOR between two catalogued SHiRA adapters (docs/methods.md#shira)."""
    from fusion.errors import CompositionError
    from fusion.sparse import adapter_overlap

    first, second = library.read(name), library.read(other)
    summary = adapter_overlap(first, second)
    if not summary.layers:
        raise CompositionError(
            f"{name!r} and {other!r} share no sparse layers, so there is no overlap to measure",
            hint="overlap compares SHiRA adapters; convert LoRAs first with `compose convert LORA --to shira`",
        )
    return {"other": library.get(other).name, **summary.to_json()}


def _fields(entry: Any) -> list[tuple[str, Any]]:
    meta = entry.metadata
    tags = ", ".join(f"{tag} ({count})" for tag, count in list(meta.tags.items())[:MAX_TAGS_SHOWN])
    if len(meta.tags) > MAX_TAGS_SHOWN:
        tags += f", … ({len(meta.tags)} tags)"
    network = ", ".join(
        f"{key} {value}"
        for key, value in (("module", meta.network_module), ("dim", meta.network_dim), ("alpha", meta.network_alpha))
        if value is not None
    )
    return [
        ("name", entry.name),
        ("title", entry.title),
        ("id", entry.id),
        ("path", entry.path),
        ("error", entry.error and f"{entry.error_type}: {entry.error}"),
        ("family", entry.family),
        ("base model", meta.base_model),
        ("format", entry.format),
        ("rank", ", ".join(str(r) for r in entry.ranks)),
        ("layers", entry.num_layers),
        ("text encoder", "yes" if entry.has_text_encoder else ("no" if entry.ok else None)),
        ("network", network),
        ("category", meta.category),
        ("triggers", ", ".join(meta.trigger_words)),
        ("preferred weight", meta.preferred_weight),
        ("calibrated", "; ".join(stored_lines(entry))),
        ("negative text", meta.negative_text),
        ("labels", ", ".join(meta.labels)),
        ("tags", tags),
        ("author", meta.author),
        ("description", meta.description),
        ("notes", meta.notes),
        ("size", f"{entry.file_size / 1e6:.2f} MB"),
        ("sha256", entry.sha256),
        ("AutoV2", meta.hashes.get("AutoV2")),
        ("hashes", ", ".join(f"{k} {v}" for k, v in meta.hashes.items() if k not in ("sha256", "AutoV2"))),
        ("previews", ", ".join(meta.previews)),
        ("source", meta.source_url),
        ("scores", {key: value for key, value in entry.scores.items() if key != CATALOG_KEY}),
        ("metadata from", ", ".join(meta.sources)),
        ("warnings", "; ".join(meta.warnings)),
    ]
