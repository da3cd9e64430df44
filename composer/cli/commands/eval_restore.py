"""`compose eval-restore --restored DIR --reference DIR [--clip-model M --clip-weights FILE | --no-iqa] [--json]`."""

from __future__ import annotations

import argparse
import warnings
from pathlib import Path

from composer.cli.reporting import add_json_option, emit_json, format_table


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `eval-restore` subcommand."""
    parser = subparsers.add_parser(
        "eval-restore",
        help="score restored images: PSNR, SSIM and CLIP-IQA",
        description=(
            "PSNR and SSIM (torchmetrics) of each restored image against the reference with the same name, plus a "
            "CLIP-IQA no-reference score from an open_clip model. Without --clip-weights the CLIP model has random "
            "offline weights and its score is meaningless (machinery only)."
        ),
    )
    parser.add_argument("--restored", type=Path, required=True, metavar="DIR", help="restored images")
    parser.add_argument("--reference", type=Path, required=True, metavar="DIR", help="clean reference images")
    parser.add_argument("--clip-model", default="ViT-B-32", help="open_clip architecture for CLIP-IQA")
    parser.add_argument("--clip-weights", type=Path, default=None, metavar="FILE", help="local open_clip checkpoint")
    parser.add_argument("--no-iqa", action="store_true", help="skip the CLIP-IQA score")
    add_json_option(parser)
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    """Compute the metrics and print a table (or JSON)."""
    from composer.restoration.metrics import ClipIQA, evaluate_folders, summarise
    from fusion.warning_categories import MeaninglessScoreWarning

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", MeaninglessScoreWarning)  # said below, in the command's own output
        iqa = None if args.no_iqa else ClipIQA(args.clip_model, weights=args.clip_weights)
    report = evaluate_folders(args.restored, args.reference, iqa=iqa)
    if args.json:
        emit_json(report.as_dict())
        return 0
    columns = ["name", "psnr", "ssim"] + (["clip_iqa"] if iqa is not None else [])
    print(format_table(report.images, columns))
    print(f"mean over {len(report.images)}: {summarise(report.means)}")
    if iqa is not None and not iqa.pretrained:
        print("note: CLIP-IQA ran with random weights (no --clip-weights): its score is not a quality measure")
    return 0
