"""Restoration adapters as fusion sources, offline on tiny-flux-kontext: synthesise pairs, train, restore, compose.

1. makes 16 clean images and rainy versions of them (``compose make-pairs``' rain model);
2. trains a derain LoRA on the Kontext transformer (Edit2Restore recipe, 50 steps) — a standard diffusers LoRA file
   whose metadata carries its task prompt;
3. restores a rainy image with it, then composes it with a style LoRA through merge and composite;
4. scores each output against the clean image (PSNR / SSIM).

The tiny model has random weights, so the images and scores only show that the machinery runs end to end; the
style LoRA is a random stand-in written in the diffusers layout.

Run: ``python examples/restore_and_style.py [--out DIR] [--steps N]``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from safetensors.torch import save_file

from composer.presets import load_preset
from composer.restoration.degrade import load_rgb, make_pairs, to_pil, to_tensor
from composer.restoration.metrics import psnr, ssim
from composer.restoration.restore import Restorer
from composer.training.restore import TASK_PROMPTS, RestoreTrainConfig, TaskPairs, train_restore

STYLE_MODULES = (
    "transformer_blocks.0.attn.to_q",
    "transformer_blocks.1.ff.net.2",
    "single_transformer_blocks.0.proj_mlp",
)


def write_clean_images(folder: Path, count: int, size: int = 64) -> None:
    """``count`` smooth random colour fields (bilinear blow-ups of 4×4 noise)."""
    folder.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(0)
    for i in range(count):
        coarse = torch.rand((1, 3, 4, 4), generator=gen)
        to_pil(torch.nn.functional.interpolate(coarse, size=(size, size), mode="bilinear")[0]).save(
            folder / f"{i:02d}.png"
        )


def write_style_lora(path: Path, transformer: torch.nn.Module) -> Path:
    """A random rank-4 Flux LoRA in the diffusers layout (a stand-in for a real style adapter)."""
    gen = torch.Generator().manual_seed(1)
    tensors = {}
    for key in STYLE_MODULES:
        weight = transformer.get_submodule(key).weight
        tensors[f"transformer.{key}.lora_A.weight"] = torch.randn(4, weight.shape[1], generator=gen) * 0.5
        tensors[f"transformer.{key}.lora_B.weight"] = torch.randn(weight.shape[0], 4, generator=gen) * 0.5
    save_file(tensors, str(path))
    return path


def main(argv: list[str] | None = None) -> dict[str, Path]:
    """Run the four stages; returns the written image paths by label."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("out") / "restore_example", help="working folder")
    parser.add_argument("--steps", type=int, default=50, help="training steps (default 50)")
    args = parser.parse_args(argv)
    out: Path = args.out

    write_clean_images(out / "clean_src", 16)
    make_pairs(out / "clean_src", out / "pairs", "rain")
    pipe = load_preset("tiny-flux-kontext")
    pipe.set_progress_bar_config(disable=True)
    config = RestoreTrainConfig(
        tasks=[TaskPairs(out / "pairs", TASK_PROMPTS["rain"])],
        out=out / "library" / "derain.safetensors",
        rank=64,
        alpha=4,
        steps=args.steps,
        learning_rate=1e-3,
        resolution=64,
        progress=False,
    )
    trained = train_restore(pipe, config)
    print(f"trained {trained.path.name}: loss {trained.initial_loss:.4f} -> {trained.final_loss:.4f}")
    print(f"task prompt from metadata: {trained.adapter.task_prompt!r}")
    write_style_lora(out / "library" / "style.safetensors", pipe.transformer)

    restorer = Restorer(model="tiny-flux-kontext", library=out / "library")
    rainy = out / "pairs" / "degraded" / "00.png"
    clean = load_rgb(out / "pairs" / "clean" / "00.png")
    print(f"input: PSNR {float(psnr(load_rgb(rainy), clean)[0]):.2f} dB")
    runs = {
        "derain": {"loras": None, "method": "merge"},
        "derain+style-merge": {"loras": "style:0.6", "method": "merge"},
        "derain+style-composite": {"loras": "style:0.6", "method": "composite"},
    }
    written: dict[str, Path] = {}
    for label, options in runs.items():
        result = restorer.restore(rainy, ["derain"], out=out / f"{label}.png", **options)
        restored = to_tensor(result.images[0])
        written[label] = result.paths[0]
        print(
            f"{label}: PSNR {float(psnr(restored, clean)[0]):.2f} dB, SSIM {float(ssim(restored, clean)[0]):.3f} "
            f"-> {result.paths[0]}"
        )
    return written


if __name__ == "__main__":
    main()
