"""`compose convert LORA --to shira --density 0.02 [--out FILE] [--json]`: LoRA → SHiRA by top-K |ΔW| per layer;
`compose convert LORA --to lora --rank R | --energy E [--model M] [--format kohya|diffusers]`: LoRA-Squeeze."""

from __future__ import annotations

import argparse
from pathlib import Path

from composer.cli import arg_types
from composer.cli.commands.export import add_squeeze_options, report
from composer.cli.reporting import add_json_option, emit_json, format_table

COLUMNS = ("layer", "kept", "of", "density", "retained")


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `convert` subcommand."""
    parser = subparsers.add_parser(
        "convert",
        help="convert an adapter to a SHiRA sparse adapter or an ordinary LoRA of another rank",
        description=(
            "--to shira: keep the top-K |ΔW| entries of every layer of an adapter (K = density·numel) and save them "
            "in our SHiRA layout. --to lora: rewrite any adapter (LoRA, LoHa, LoKr, DoRA, IA3, OFT, ...) as an "
            "ordinary LoRA at --rank R or --energy E per layer (exact QR-core SVD; exact at full rank, the default). "
            "Both print the retained energy ‖ΔW_kept‖²/‖ΔW‖² per layer and overall."
        ),
    )
    parser.add_argument("adapter", metavar="LORA", type=Path, help="adapter file (any supported format)")
    parser.add_argument("--to", choices=("shira", "lora"), default="shira", help="target kind (default shira)")
    parser.add_argument("--density", type=float, default=0.02, help="fraction of each weight to keep (default 0.02)")
    parser.add_argument(
        "--out",
        type=arg_types.output_file,
        default=None,
        metavar="FILE",
        help="output (default LORA-shira.safetensors or LORA-lora.safetensors)",
    )
    add_squeeze_options(parser)
    parser.add_argument(
        "--model", default=None, help="--to lora: the base model (needed for LyCORIS files); preset, folder or hub id"
    )
    add_json_option(parser)
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    """Read, convert, save, and print the retained-energy report."""
    if args.to == "lora":
        return _to_lora(args)
    from fusion.sparse import convert_to_sparse
    from weights_index.formats.shira import save_shira
    from weights_index.reader import read_adapter

    adapter = read_adapter(args.adapter)
    conversion = convert_to_sparse(adapter, args.density)
    out = args.out or args.adapter.with_name(f"{args.adapter.stem}-shira.safetensors")
    metadata = {"mask_type": "lora-topk", "density": repr(args.density), "converted_from": args.adapter.name}
    save_shira(conversion.adapter, out, metadata)
    layers = [
        {"layer": c.key, "kept": c.nnz, "of": c.numel, "density": c.nnz / c.numel, "retained": c.retained}
        for c in conversion.layers
    ]
    if args.json:
        emit_json(
            {
                "source": str(args.adapter),
                "out": str(out),
                "density": args.density,
                "retained": conversion.retained,
                "params": conversion.adapter.num_params,
                "layers": layers,
            }
        )
        return 0
    print(format_table(layers, COLUMNS))
    print(
        f"\nretained energy {conversion.retained:.4f} overall at density {args.density:g} "
        f"({conversion.adapter.num_params:,} values in {len(layers)} layers) -> {out}"
    )
    return 0


def _to_lora(args: argparse.Namespace) -> int:
    from composer.export import squeeze_adapter_file
    from composer.facade import Composer

    composer = None if args.model is None else Composer(model=args.model)
    out = args.out or args.adapter.with_name(f"{args.adapter.stem}-lora.safetensors")
    result = squeeze_adapter_file(
        args.adapter, out, composer=composer, format=args.format, rank=args.rank, energy=args.energy
    )
    report(result, args.json)
    return 0
