"""`compose train-restore --pairs DIR --task "remove the rain from the image" [--pairs DIR2 --task …] --out FILE`."""

from __future__ import annotations

import argparse
from pathlib import Path

from composer.cli import arg_types
from composer.cli.commands import _training_options as training


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `train-restore` subcommand."""
    parser = subparsers.add_parser(
        "train-restore",
        help="train a restoration (Edit2Restore) LoRA on FLUX.1 Kontext from clean/degraded pairs",
        description=(
            "Few-shot restoration LoRA on a Kontext transformer (PEFT + accelerate, flow-matching loss with the "
            "degraded image as Kontext conditioning). Several --pairs/--task pairs train one multi-task adapter. "
            "Saves a standard diffusers LoRA file with task_prompt and needs_input_image in its metadata."
        ),
    )
    parser.add_argument(
        "--pairs", type=Path, action="append", required=True, metavar="DIR", help="folder with clean/ and degraded/"
    )
    parser.add_argument(
        "--task", action="append", required=True, metavar="PROMPT", help="task prompt of the matching --pairs"
    )
    parser.add_argument("--rank", type=arg_types.positive_int, default=64, help="LoRA rank (default 64)")
    parser.add_argument("--alpha", type=float, default=4.0, help="LoRA alpha (default 4: scale alpha/rank)")
    training.add_options(
        parser,
        model="tiny-flux-kontext",
        model_help="Kontext preset, diffusers folder or hub id",
        steps=1000,
        learning_rate=1e-4,
        examples="pairs",
        seeded="LoRA init, noise and batches",
        resolution_help="square crop size (default 64 tiny, else 512)",
        checkpoints=False,
    )
    parser.add_argument("--guidance", type=float, default=2.5, help="guidance embedding value (default 2.5)")
    parser.add_argument(
        "--max-sequence-length", type=arg_types.positive_int, default=512, help="T5 prompt tokens (default 512)"
    )
    training.add_adapter_output(parser)
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    """Load the model, train, save, report the loss before/after."""
    from composer.training.restore import RestoreTrainConfig, TaskPairs, train_restore
    from fusion.errors import TrainingError

    if len(args.pairs) != len(args.task):
        raise TrainingError(
            f"{len(args.pairs)} --pairs folders but {len(args.task)} --task prompts",
            hint="give one --task after each --pairs",
        )
    tasks = [TaskPairs(folder, prompt) for folder, prompt in zip(args.pairs, args.task)]
    result = training.train(
        args,
        train_restore,
        RestoreTrainConfig,
        ("out", "rank", "alpha", "max_sequence_length"),
        tasks=tasks,
        guidance_scale=args.guidance,
        resolution=args.resolution or (64 if args.model.startswith("tiny") else 512),
    )
    return training.report_adapter(
        args,
        result,
        "LoRA parameters",
        f"(rank {args.rank}, alpha {args.alpha:g}) on {result.pairs} pairs",
        tasks=[task.prompt for task in tasks],
        pairs=result.pairs,
        rank=args.rank,
        alpha=args.alpha,
    )
