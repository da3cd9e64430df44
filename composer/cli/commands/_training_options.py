"""What every `compose train-*` command shares: the base-model and optimisation flags, spelled and defaulted alike,
the pipeline they load, the training settings they hand the trainer, and how they report the result."""

from __future__ import annotations

import argparse
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from composer.cli import arg_types
from composer.cli.commands._model_options import add_model_option
from composer.cli.option_values import option_values
from composer.cli.reporting import add_json_option, emit_json


def add_options(
    parser: argparse.ArgumentParser,
    *,
    model_help: str,
    steps: int,
    learning_rate: float,
    examples: str,
    seeded: str,
    resolution_help: str = "training size (default: the model's native)",
    checkpoints: bool = True,
    model: str | None = None,
) -> None:
    """Add --model, --steps, --lr, --batch-size, --resolution, [--checkpoint-every], --mixed-precision, --seed and
    --json.

    ``model_help`` says what ``--model`` accepts; ``model`` is its default, by default the one every command uses
    (:func:`~composer.cli.commands._model_options.add_model_option`). ``examples`` names what a batch holds
    ("images", "pairs"); ``seeded`` what the seed controls.
    """
    if model is None:
        add_model_option(parser, forms=model_help)
    else:
        parser.add_argument("--model", default=model, help=model_help)
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
    add_json_option(parser)


def add_adapter_output(parser: argparse.ArgumentParser) -> None:
    """Add the required ``--out FILE``: the .safetensors file a command that trains an adapter writes."""
    parser.add_argument("--out", type=Path, required=True, metavar="FILE", help="output .safetensors file")


def train(
    args: argparse.Namespace, trainer: Callable[[Any, Any], Any], config_type: type, own: Iterable[str], **given: Any
) -> Any:
    """Run ``trainer(pipeline, config)`` on the ``--model`` pipeline (its denoising progress bar off: training shows
    its own) and return its result. ``config_type`` is built from the shared settings (:func:`settings`), the
    command's own options named in ``own`` (each spelt as its config field) and ``given``, which wins over both."""
    from composer.presets import load_preset

    config = config_type(**{**settings(args), **option_values(args, own), **given})
    pipe = load_preset(args.model)
    pipe.set_progress_bar_config(disable=True)
    return trainer(pipe, config)


def settings(args: argparse.Namespace) -> dict[str, Any]:
    """The trainer config fields the shared flags set: steps, learning rate, batch size, resolution, checkpoint
    interval (where the command has one), seed, mixed precision and the progress bar (off with --json)."""
    settings = {
        "steps": args.steps,
        "learning_rate": args.lr,
        "batch_size": args.batch_size,
        "resolution": args.resolution,
        "seed": args.seed,
        "mixed_precision": args.mixed_precision,
        "progress": not args.json,
    }
    if hasattr(args, "checkpoint_every"):
        settings["checkpoint_every"] = args.checkpoint_every
    return settings


def report(args: argparse.Namespace, result: Any, what: str, **fields: Any) -> int:
    """Report a finished run: with --json one document (the saved file, ``fields``, steps, the loss before and after,
    and the checkpoints where the trainer writes them), else ``saved FILE: what; eval loss A -> B`` and one line per
    checkpoint. Returns the exit code 0."""
    checkpoints = [str(path) for path in getattr(result, "checkpoints", ())]
    if args.json:
        summary = {"out": str(result.path), **fields, "steps": args.steps}
        summary |= {"initial_loss": result.initial_loss, "final_loss": result.final_loss}
        emit_json(summary | ({"checkpoints": checkpoints} if hasattr(result, "checkpoints") else {}))
        return 0
    print(f"saved {result.path}: {what}; eval loss {result.initial_loss:.4f} -> {result.final_loss:.4f}")
    for path in checkpoints:
        print(f"checkpoint {path}")
    return 0


def report_adapter(args: argparse.Namespace, result: Any, values: str, detail: str, **fields: Any) -> int:
    """:func:`report` for a run that saved an adapter (``result.adapter``): the summary line opens with its layer
    count and ``{parameters:,} {values}``, followed by ``detail``; the JSON document adds ``layers`` and ``params``
    after ``fields``."""
    adapter = result.adapter
    layers, params = len(adapter.layers), adapter.num_params
    what = f"{layers} layers, {params:,} {values} {detail}"
    return report(args, result, what, **fields, layers=layers, params=params)
