"""`compose train-gates --model M --adapters a.safetensors,b.safetensors --data DIR --steps N --out FILE`."""

from __future__ import annotations

import argparse
from pathlib import Path

from composer.cli.commands import _training_options as training


def _paths(text: str) -> list[Path]:
    """Comma-separated adapter files; a folder stands for every adapter file under it (sorted), as the catalog
    finds them."""
    from weights_index.catalog import ADAPTER_SUFFIXES

    paths: list[Path] = []
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        path = Path(item)
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in ADAPTER_SUFFIXES)
            if not found:
                raise argparse.ArgumentTypeError(
                    f"the folder {path} holds no adapter files ({', '.join(ADAPTER_SUFFIXES)})"
                )
            paths.extend(found)
        else:
            paths.append(path)
    return paths


def _floats(text: str) -> list[float]:
    try:
        return [float(item) for item in text.split(",") if item.strip()]
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"weights must be numbers separated by commas: {error}") from error


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `train-gates` subcommand."""
    parser = subparsers.add_parser(
        "train-gates",
        help="train gated-fusion gates for a set of adapters on a folder of images",
        description=(
            "Trains only the per-layer, per-timestep gates of gated fusion (base model and adapters frozen) on the "
            "denoising loss (flow matching on FLUX.1). Use the result with "
            "set_composition(..., method='gated', gates=NAME) or `compose --method gated`."
        ),
    )
    parser.add_argument(
        "--adapters", type=_paths, required=True, help="adapter files or folders of them, comma-separated"
    )
    parser.add_argument(
        "--weights", type=_floats, default=None, help="adapter weights, comma-separated, or one for all (default 1)"
    )
    parser.add_argument("--data", type=Path, required=True, metavar="DIR", help="images of the composed concepts")
    parser.add_argument("--prompt", default="", help="caption for images without a .txt file")
    training.add_options(
        parser,
        model_help="preset, local diffusers folder or hub id",
        steps=500,
        learning_rate=1e-3,
        examples="images",
        seeded="gate init, noise and batches",
    )
    parser.add_argument("--out", required=True, metavar="FILE|NAME", help="output .safetensors path, or a gate name")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    """Load the model, train the gates, save them, and report the loss before/after."""
    from composer.training.gates import GateTrainConfig, train_gates

    result = training.train(args, train_gates, GateTrainConfig, ("adapters", "data", "out", "weights", "prompt"))
    layers = len(result.gates.keys)
    params = sum(p.numel() for p in result.gates.parameters())
    return training.report(
        args,
        result,
        f"gates for {layers} layers ({params:,} parameters)",
        adapters=[str(p) for p in args.adapters],
        layers=layers,
        params=params,
    )
