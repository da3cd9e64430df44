"""``python -m composer.toyworld.gate_data OUT``: a folder of captioned toy-world images of composed concepts.

Gated fusion learns from "images of the composed concepts" (AutoLoRA); on the toy world the generator draws them
exactly. Each image applies one held-out character plus held-out concepts of 1–4 other categories (clothing,
style, background, object) — the composition sets of the quality benchmark — to a random base scene, and its
``.txt`` caption names every element, concepts by their trigger phrases. ``compose train-gates --data OUT`` reads
the folder as it reads any image/caption folder.
"""

from __future__ import annotations

import argparse
import random
from pathlib import Path

import torch
from PIL import Image

from composer.toyworld.world import (
    CONCEPTS,
    OTHER_CATEGORIES,
    Concept,
    caption,
    concepts_by_category,
    render,
    sample_layout,
    sample_scene,
)
from fusion.errors import TrainingError


def sample_composition(rng: random.Random, names: list[str]) -> tuple[Concept, ...]:
    """One character concept plus concepts of 1–4 distinct other categories, drawn from ``names``."""
    by_category = concepts_by_category(names)
    others = [category for category in OTHER_CATEGORIES if category in by_category]
    character = rng.choice(by_category["character"])
    chosen = rng.sample(others, rng.randint(min(1, len(others)), len(others)))
    return (character, *(rng.choice(by_category[category]) for category in chosen))


def write_composition_images(out: Path, count: int, names: list[str], seed: int = 0) -> list[Path]:
    """Write ``count`` PNG images with ``.txt`` captions into ``out``; returns the image paths."""
    unknown = [name for name in names if name not in CONCEPTS]
    if unknown:
        raise TrainingError(f"unknown toy-world concepts {unknown}", hint=f"choose among {sorted(CONCEPTS)}")
    if not any(CONCEPTS[name].category == "character" for name in names):
        raise TrainingError(
            "the concepts must include a character: every composition is built around one",
            hint=f"add one of {[n for n, c in CONCEPTS.items() if c.category == 'character']}",
        )
    rng = random.Random(seed)
    layouts = torch.Generator().manual_seed(seed)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for index in range(count):
        concepts = sample_composition(rng, names)
        scene = sample_scene(rng, optional=0.0).with_concepts(*concepts)
        text = caption(scene, rng, concepts)
        pixels = render([scene], sample_layout(1, layouts))[0]
        image = Image.fromarray(pixels.mul(255).round().clamp(0, 255).byte().permute(1, 2, 0).numpy())
        path = out / f"{index:05d}.png"
        image.save(path)
        path.with_suffix(".txt").write_text(text + "\n")
        paths.append(path)
    return paths


def main(argv: list[str] | None = None) -> int:
    """Write the folder (every held-out concept of the world unless ``--concepts`` names some)."""
    parser = argparse.ArgumentParser(prog="python -m composer.toyworld.gate_data", description=__doc__)
    parser.add_argument("out", type=Path)
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--concepts", default=",".join(CONCEPTS))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    paths = write_composition_images(args.out, args.images, args.concepts.split(","), args.seed)
    print(f"wrote {len(paths)} captioned images to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
