"""`compose "prompt" [--loras auto|name:0.8,...]`: compose adapters and generate (the default command)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from composer.adapter_sources import named_adapters, refuse_unknown
from composer.cli import arg_types
from composer.cli.commands._model_options import add_model_options
from composer.cli.commands._selection_options import add_max_loras_option
from composer.cli.reporting import add_json_option, emit_json, format_table
from fusion.cfg_branches import BRANCHES
from fusion.strategies import BUILTIN
from weights_index.catalog_pool import open_library

METHODS = tuple(BUILTIN)

COLUMNS = ("name", "weight", "source", "score", "reasons")


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `generate` subcommand (also what a bare `compose "prompt"` runs)."""
    parser = subparsers.add_parser(
        "generate",
        help='compose adapters and generate images (default: compose "prompt" ...)',
        description="Generate images for PROMPT with LoRA adapters composed inside the pipeline. "
        "Adapters come from <lora:name:weight> tags in the prompt and from --loras.",
    )
    parser.add_argument("prompt", help="the prompt; <lora:name:0.8> tags (lbw=, start=, 0@0,1@0.5) are honoured")
    parser.add_argument(
        "--loras",
        default=None,
        help="'auto' (retrieve from --library) or a list like 'style:0.8,char:0@0,1@0.5,path/to/file.safetensors'",
    )
    add_max_loras_option(
        parser,
        help_text="with --loras auto: pick at most N adapters (default 5); those named but left out are listed "
        "with why",
    )
    parser.add_argument(
        "--method",
        default="merge",
        choices=METHODS,
        help="composition method (default merge); switch and cmlora run their authors' published schedules, "
        "klora and ties run fused only (docs/methods.md)",
    )
    add_model_options(parser)
    parser.add_argument("--library", type=Path, default=None, help="LoRA folder (indexed incrementally)")
    parser.add_argument(
        "--steps", type=arg_types.positive_int, default=None, help="denoising steps (default: 4 on tiny presets)"
    )
    parser.add_argument("--seed", type=arg_types.seed, default=0)
    parser.add_argument("--guidance", type=float, default=None, help="CFG scale (default: the pipeline's)")
    parser.add_argument("--negative", default="", help="negative prompt")
    parser.add_argument(
        "--size", type=arg_types.positive_int, nargs=2, metavar=("H", "W"), default=None, help="image height and width"
    )
    parser.add_argument("--num-images", type=arg_types.positive_int, default=1)
    parser.add_argument("--out", type=arg_types.output_dir, default=Path("out"), help="output folder (default ./out)")
    parser.add_argument(
        "--tau",
        type=arg_types.positive_int,
        default=None,
        help="switch: steps per turn (the first adapter runs τ+1, as the published code does)",
    )
    parser.add_argument("--mode", choices=("batched", "sequential"), default=None, help="composite: execution mode")
    parser.add_argument("--unfused", action="store_true", help="never fuse weights (merge)")
    parser.add_argument(
        "--branches",
        type=parse_branches,
        default="both",
        metavar="BRANCHES",
        help="CFG branches the adapters act on: both (as pipelines do), conditional (the unconditional "
        "prediction from the base model; SD/SDXL), SHARE (the part, 0-1, of the adapters' weights the unconditional "
        "branch carries), or per adapter as NAME=both|conditional|SHARE,... (adapters not named act on both)",
    )
    parser.add_argument(
        "--gates",
        default=None,
        metavar="NAME",
        help="gated: a gate checkpoint from `compose train-gates` (name or path); without it gated runs its "
        "training-free table mode",
    )
    parser.add_argument(
        "--plot",
        type=arg_types.output_dir,
        default=None,
        metavar="DIR",
        help="write PNG plots to DIR: retrieval scores (--loras auto), weight table, gate heatmaps (--method gated)",
    )
    add_json_option(parser, detail="instead of tables")
    parser.set_defaults(handler=run)


def parse_branches(text: str) -> str | float | dict[str, str | float]:
    """``--branches``: one of :data:`fusion.cfg_branches.BRANCHES`, the unconditional branch's share (0–1) of every
    adapter's weight, or ``NAME=VALUE`` pairs separated by commas with VALUE either."""
    if text in BRANCHES:
        return text
    every = _share(text)
    if every is not None:
        return every
    choice: dict[str, str | float] = {}
    for item in text.split(","):
        name, sep, value = (part.strip() for part in item.partition("="))
        share = _share(value)
        if not sep or not name or (value not in BRANCHES and share is None):
            raise argparse.ArgumentTypeError(
                f"{text!r}: give {', '.join(BRANCHES)} or a share between 0 and 1, or NAME=VALUE pairs with VALUE "
                "one of those"
            )
        choice[name] = value if value in BRANCHES else share
    return choice


def _share(text: str) -> float | None:
    """``text`` as a number in [0, 1], or None."""
    try:
        value = float(text)
    except ValueError:
        return None
    return value if 0 <= value <= 1 else None


def run_options(args: argparse.Namespace) -> dict[str, Any]:
    """The generate options → :meth:`composer.facade.Composer.run` keyword arguments (all but prompt and out)."""
    extra: dict[str, Any] = {}
    if args.tau is not None:
        extra["tau"] = args.tau
    if args.mode is not None:
        extra["mode"] = args.mode
    if args.unfused:
        extra["fuse"] = False
    if args.gates is not None:
        extra["gates"] = args.gates
    if args.branches != "both":
        extra["branches"] = args.branches
    height, width = args.size if args.size else (None, None)
    return {
        "loras": args.loras,
        "method": args.method,
        "steps": args.steps,
        "seed": args.seed,
        "guidance_scale": args.guidance,
        "negative_prompt": args.negative,
        "height": height,
        "width": width,
        "num_images": args.num_images,
        "plot": args.plot,
        "max_loras": args.max_loras,
        **extra,
    }


def left_out_lines(rejected: list[Any]) -> list[str]:
    """One line per adapter the prompt names that ``--loras auto`` left out, with why (and how to include it)."""
    lines = []
    for item in rejected:
        hint = "; raise the cap with --max-loras" if item.capped else ""
        kept = f" (kept {item.lost_to})" if item.lost_to else ""
        lines.append(f"left out {item.name}: {item.reason}{kept}{hint}")
    return lines


def run(args: argparse.Namespace) -> int:
    """Run one composition request and report the chosen adapters and written files."""
    # a name that cannot load is refused before the model stack is imported (seconds sooner)
    library = open_library(args.library) if args.library is not None else None
    refuse_unknown(named_adapters(args.prompt, args.loras), library)
    from composer.facade import Composer

    composer = Composer(model=args.model, library=args.library, vae=args.vae, text_encoders=args.text_encoders)
    result = composer.run(args.prompt, out=args.out, progress=not args.json, **run_options(args))
    if args.json:
        emit_json(result.as_dict())
        return 0
    rows = [
        {**a.as_dict(), "reasons": "; ".join(a.reasons), "score": a.score, "source": a.source} for a in result.adapters
    ]
    if rows:
        print(format_table(rows, COLUMNS))
    else:
        print("no adapters: generating with the base model")
    for line in left_out_lines(result.rejected):
        print(line)
    print(f"\nprompt: {result.prompt}")
    print(f"method: {result.method}, {result.steps} steps, seed {result.seed}, {result.seconds:.2f} s")
    for path in [*result.paths, *result.plots.values()]:
        print(f"wrote {path}")
    return 0
