"""The optimisation flags every `compose train-*` command shares, so they are spelled and defaulted alike."""

from __future__ import annotations

import argparse

from composer.cli import arg_types


def add_training_options(
    parser: argparse.ArgumentParser,
    *,
    steps: int,
    learning_rate: float,
    examples: str,
    seeded: str,
    resolution_help: str = "training size (default: the model's native)",
    checkpoints: bool = True,
) -> None:
    """Add --steps, --lr, --batch-size, --resolution, [--checkpoint-every], --mixed-precision, --seed and --json.

    ``examples`` names what a batch holds ("images", "pairs"); ``seeded`` what the seed controls.
    """
    parser.add_argument(
        "--steps", type=arg_types.positive_int, default=steps, help=f"optimizer steps (default {steps})"
    )
    parser.add_argument("--lr", type=float, default=learning_rate, help=f"learning rate (default {learning_rate:g})")
    parser.add_argument("--batch-size", type=arg_types.positive_int, default=1, help=f"{examples} per step (default 1)")
    parser.add_argument("--resolution", type=arg_types.positive_int, default=None, help=resolution_help)
    if checkpoints:
        parser.add_argument(
            "--checkpoint-every", type=int, default=0, metavar="N", help="save a checkpoint every N steps"
        )
    parser.add_argument("--mixed-precision", choices=("no", "fp16", "bf16"), default="no", help="accelerate setting")
    parser.add_argument("--seed", type=arg_types.seed, default=0, help=f"seed for {seeded}")
    parser.add_argument("--json", action="store_true", help="print one JSON document")
