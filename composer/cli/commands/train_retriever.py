"""`compose train-retriever --library DIR`: train the weight-encoder retriever on the library's own metadata."""

from __future__ import annotations

import argparse

from composer.cli import arg_types
from composer.cli.commands._catalog_options import add_catalog_options, open_catalog
from composer.cli.option_values import option_values
from composer.cli.reporting import add_json_option, emit_json


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `train-retriever` subcommand."""
    parser = subparsers.add_parser(
        "train-retriever",
        help="train the weight-encoder retriever from the library's metadata",
        description=(
            "Train the AutoLoRA probe encoder (symmetric InfoNCE against text embeddings of each adapter's title, "
            "trigger words, tags and description), save it beside the catalog and embed every adapter. The text tower "
            "is an open_clip model or, with --text-model pipeline:NAME, that pipeline's own CLIP text encoder (then "
            "query with the same pipeline, e.g. compose search --model NAME)."
        ),
    )
    add_catalog_options(parser)
    parser.add_argument("--family", choices=("sd1", "sd2", "sdxl", "flux"), help="default: the most common one")
    parser.add_argument("--steps", type=arg_types.positive_int, help="optimisation steps (default 400)")
    parser.add_argument("--batch-size", type=arg_types.positive_int, help="adapters per step (default 64)")
    parser.add_argument("--lr", type=float, help="AdamW learning rate (default 1e-3)")
    parser.add_argument("--dim", type=arg_types.positive_int, help="encoder width (default 128)")
    parser.add_argument(
        "--text-model",
        help="open_clip architecture (default ViT-B-32), or pipeline:NAME for a pipeline's text encoder "
        "(preset, folder or hub id, e.g. pipeline:toy-sd)",
    )
    parser.add_argument(
        "--text-pooling", choices=("eos", "mean"), default="eos", help="with pipeline:NAME: end-of-text state or mean"
    )
    parser.add_argument("--text-weights", help="local open_clip weights file (default: random weights, offline)")
    parser.add_argument("--seed", type=arg_types.seed, help="random seed (default 0)")
    add_json_option(parser, detail="(no progress bar)")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    """Scan the library, train, and report where the checkpoint went and how the loss moved."""
    from retrieval.pipeline_text import PipelineTextEmbedder, pipeline_name
    from retrieval.training import TrainingConfig, train_retriever

    library = open_catalog(args, scan=True)
    options = ("steps", "batch_size", "lr", "dim", "text_model", "text_weights", "seed")
    config = TrainingConfig(**option_values(args, options, given_only=True))
    text = None
    name = pipeline_name(args.text_model)
    if name is not None:
        from composer.presets import load_preset

        text = PipelineTextEmbedder(load_preset(name), name=name, pooling=args.text_pooling)
    report = train_retriever(library, family=args.family, config=config, text=text, progress=not args.json)
    if args.json:
        emit_json(report.to_json())
        return 0
    print(
        f"trained the {report.family} retriever on {report.described} described adapters "
        f"({report.adapters} embedded) in {report.seconds:.1f} s; loss {report.first_loss:.3f} → "
        f"{report.final_loss:.3f}\ncheckpoint: {report.checkpoint}"
    )
    if report.validation is None:
        print("held-out check: too few described adapters to hold some out; the learned signal is used unvalidated")
    else:
        check = report.validation
        verdict = "used in rankings" if check["reliable"] else "left out of rankings (no better than chance)"
        print(
            f"held-out check: recall@3 {check['recall_at_3']:.2f} on {check['held_out']} adapters never described "
            f"in training (chance {check['chance_at_3']:.2f}, needs > {check['threshold']:.2f}) → {verdict}"
        )
    for skipped in report.skipped:
        print(f"skipped: {skipped}")
    return 0
