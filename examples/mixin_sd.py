"""Add LoRA composition to a stock diffusers pipeline in three lines (the mixin), offline on tiny-sd.

Loads the tiny SD 1.x preset (random weights, no network), makes it composable, registers two adapters from the demo
library, composes them (one with a block-weight preset, one fading in over the steps), generates, then clears the
composition and checks the base weights are back bit-exactly.

Run: ``python examples/mixin_sd.py [--library DIR] [--out DIR]`` (the demo library is built first if missing).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from make_library import DEFAULT_DIR, build_library, library_is_built

from composer.mixin import make_composable
from composer.presets import load_preset


def main(argv: list[str] | None = None) -> Path:
    """Compose two demo adapters into tiny-sd, save the image, verify the exact restore; returns the image path."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--library", type=Path, default=DEFAULT_DIR, help="demo library folder")
    parser.add_argument("--out", type=Path, default=Path("out") / "examples", help="where the image is written")
    args = parser.parse_args(argv)
    if not library_is_built(args.library):
        build_library(args.library)

    pipe = make_composable(load_preset("tiny-sd"))
    pipe.add_adapter_file(args.library / "character" / "corgi_astronaut.safetensors", name="corgi")
    pipe.add_adapter_file(args.library / "style" / "watercolor.safetensors", name="watercolor")
    before = {name: p.detach().clone() for name, p in pipe.unet.named_parameters()}

    pipe.set_composition({"corgi": {"weight": 0.8, "blocks": "OUTALL"}, "watercolor": "0@0,0.7@0.5"}, method="merge")
    generator = torch.Generator().manual_seed(0)
    image = pipe("a corgi astronaut, watercolor", num_inference_steps=4, height=64, width=64, generator=generator)
    pipe.clear_composition()

    restored = all(torch.equal(before[name], p) for name, p in pipe.unet.named_parameters())
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "mixin_sd.png"
    image.images[0].save(path)
    print(f"adapters: {sorted(pipe.adapters)}")
    print(f"base weights restored bit-exactly: {restored}")
    print(f"wrote {path}")
    return path


if __name__ == "__main__":
    main()
