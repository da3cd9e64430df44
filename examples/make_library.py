"""Build the demo LoRA library for the tiny-sd preset: several real-world file formats with realistic metadata.

Each adapter is written the way its usual producer writes it — kohya-ss sd-scripts (``lora_unet_…`` keys,
per-module ``alpha``, ``ss_*`` metadata), diffusers/PEFT (``unet.….lora_A.weight`` + ``modelspec.*``), kohya
LoCon (conv layers), LyCORIS LoHa and LoKr — with the sidecars artists keep next to them: Civitai's
``.civitai.info``, A1111's ``name.json`` and ``name.preview.png``. Weights are seeded random factors shaped for
tiny-sd, so the library is identical on every machine.

Run: ``python examples/make_library.py [OUT_DIR]`` (default ``examples/demo_library``).
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import io
import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image, ImageDraw
from safetensors.torch import save_file

from composer.presets import load_preset

DEFAULT_DIR = Path(__file__).resolve().parent / "demo_library"
ATTENTION_SUFFIXES = (".to_q", ".to_k", ".to_v", ".to_out.0")
TEXT_SUFFIXES = (".q_proj", ".k_proj", ".v_proj", ".out_proj")


@dataclass
class DemoAdapter:
    """One adapter of the demo library: what it depicts and how it is stored."""

    name: str
    title: str
    category: str
    triggers: list[str]
    tags: dict[str, int]
    writer: str
    rank: int
    alpha: float
    preferred_weight: float
    sidecars: tuple[str, ...] = ()
    with_text_encoder: bool = False
    description: str = ""
    colour: tuple[int, int, int] = (128, 128, 128)
    extra: dict[str, str] = field(default_factory=dict)


LIBRARY: list[DemoAdapter] = [
    DemoAdapter(
        "corgi_astronaut",
        "Corgi Astronaut",
        "character",
        ["crgastro", "corgi astronaut"],
        {"corgi": 24, "astronaut": 20, "space suit": 14, "helmet": 9, "dog": 7},
        "kohya",
        8,
        4.0,
        0.8,
        ("civitai", "preview"),
        description="A corgi in a white space suit.",
        colour=(230, 170, 90),
    ),
    DemoAdapter(
        "pixel_knight",
        "Pixel Knight",
        "character",
        ["pxknight"],
        {"knight": 18, "armor": 15, "sword": 11, "pixel art": 6},
        "peft",
        4,
        4.0,
        0.9,
        ("preview",),
        description="A small armoured knight.",
        colour=(150, 160, 180),
    ),
    DemoAdapter(
        "red_scarf",
        "Red Knitted Scarf",
        "clothing",
        ["redscarf", "red scarf"],
        {"scarf": 20, "red scarf": 16, "knitted": 10, "winter clothes": 5},
        "locon",
        4,
        2.0,
        0.7,
        ("a1111",),
        description="A chunky red knitted scarf.",
        colour=(200, 40, 40),
    ),
    DemoAdapter(
        "film_grain",
        "Film Grain Style",
        "style",
        ["filmgrain", "film grain"],
        {"film grain": 30, "analog photo": 12, "noise": 8, "kodak": 4},
        "loha",
        4,
        4.0,
        0.6,
        ("civitai",),
        description="Analog film look with visible grain.",
        colour=(120, 110, 100),
    ),
    DemoAdapter(
        "watercolor",
        "Soft Watercolor",
        "style",
        ["wtrclr", "watercolor"],
        {"watercolor": 28, "painting": 14, "soft colors": 9, "paper texture": 6},
        "kohya",
        16,
        8.0,
        0.75,
        ("civitai", "a1111", "preview"),
        with_text_encoder=True,
        description="Soft watercolor painting style.",
        colour=(120, 170, 220),
    ),
    DemoAdapter(
        "neon_city",
        "Neon City Background",
        "background",
        ["neoncity", "neon city"],
        {"city": 22, "neon lights": 19, "night": 13, "cyberpunk": 10, "street": 6},
        "peft",
        8,
        8.0,
        0.8,
        ("a1111", "preview"),
        description="A rainy cyberpunk street at night.",
        colour=(200, 60, 220),
    ),
    DemoAdapter(
        "mossy_forest",
        "Mossy Forest",
        "background",
        ["mossyforest", "mossy forest"],
        {"forest": 25, "moss": 17, "trees": 12, "fog": 7},
        "lokr",
        4,
        4.0,
        0.8,
        ("civitai",),
        description="A foggy old-growth forest floor covered in moss.",
        colour=(60, 130, 70),
    ),
    DemoAdapter(
        "golden_teapot",
        "Golden Teapot",
        "object",
        ["gldteapot", "golden teapot"],
        {"teapot": 21, "gold": 15, "porcelain": 6, "still life": 5},
        "kohya",
        4,
        1.0,
        1.0,
        ("a1111", "preview"),
        description="An ornate golden teapot.",
        colour=(220, 190, 60),
    ),
]


def _target_modules(pipe: torch.nn.Module) -> tuple[dict[str, torch.nn.Module], dict[str, torch.nn.Module]]:
    unet = {n: m for n, m in pipe.unet.named_modules() if n.endswith(ATTENTION_SUFFIXES)}
    text = {n: m for n, m in pipe.text_encoder.named_modules() if n.endswith(TEXT_SUFFIXES)}
    return unet, text


def _conv_modules(pipe: torch.nn.Module) -> dict[str, torch.nn.Conv2d]:
    return {
        n: m
        for n, m in pipe.unet.named_modules()
        if isinstance(m, torch.nn.Conv2d) and ".resnets." in n and n.endswith(("conv1", "conv2"))
    }


def _kohya_name(prefix: str, path: str) -> str:
    return f"{prefix}_{path.replace('.', '_')}"


def _write_kohya(spec: DemoAdapter, pipe: torch.nn.Module, gen: torch.Generator, conv: bool) -> dict[str, torch.Tensor]:
    unet, text = _target_modules(pipe)
    modules = [("lora_unet", path, module) for path, module in unet.items()]
    if spec.with_text_encoder:
        modules += [("lora_te", path, module) for path, module in text.items()]
    if conv:
        modules += [("lora_unet", path, module) for path, module in _conv_modules(pipe).items()]
    tensors: dict[str, torch.Tensor] = {}
    for prefix, path, module in modules:
        key = _kohya_name(prefix, path)
        weight = module.weight
        if weight.dim() == 4:
            down = torch.randn(spec.rank, weight.shape[1], *weight.shape[2:], generator=gen) * 0.1
            up = torch.randn(weight.shape[0], spec.rank, 1, 1, generator=gen) * 0.1
        else:
            down = torch.randn(spec.rank, weight.shape[1], generator=gen) * 0.1
            up = torch.randn(weight.shape[0], spec.rank, generator=gen) * 0.1
        tensors[f"{key}.lora_down.weight"] = down.to(torch.float16)
        tensors[f"{key}.lora_up.weight"] = up.to(torch.float16)
        tensors[f"{key}.alpha"] = torch.tensor(spec.alpha, dtype=torch.float16)
    return tensors


def _write_peft(spec: DemoAdapter, pipe: torch.nn.Module, gen: torch.Generator) -> dict[str, torch.Tensor]:
    unet, _ = _target_modules(pipe)
    tensors: dict[str, torch.Tensor] = {}
    for path, module in unet.items():
        out_features, in_features = module.weight.shape
        tensors[f"unet.{path}.lora_A.weight"] = torch.randn(spec.rank, in_features, generator=gen) * 0.1
        tensors[f"unet.{path}.lora_B.weight"] = torch.randn(out_features, spec.rank, generator=gen) * 0.1
    return tensors


def _write_loha(spec: DemoAdapter, pipe: torch.nn.Module, gen: torch.Generator) -> dict[str, torch.Tensor]:
    unet, _ = _target_modules(pipe)
    tensors: dict[str, torch.Tensor] = {}
    for path, module in unet.items():
        out_features, in_features = module.weight.shape
        key = _kohya_name("lora_unet", path)
        tensors[f"{key}.hada_w1_a"] = torch.randn(out_features, spec.rank, generator=gen) * 0.3
        tensors[f"{key}.hada_w1_b"] = torch.randn(spec.rank, in_features, generator=gen) * 0.3
        tensors[f"{key}.hada_w2_a"] = torch.randn(out_features, spec.rank, generator=gen) * 0.3
        tensors[f"{key}.hada_w2_b"] = torch.randn(spec.rank, in_features, generator=gen) * 0.3
        tensors[f"{key}.alpha"] = torch.tensor(spec.alpha)
    return tensors


def _factor_pair(n: int) -> tuple[int, int]:
    first = max(d for d in range(1, math.isqrt(n) + 1) if n % d == 0)
    return first, n // first


def _write_lokr(spec: DemoAdapter, pipe: torch.nn.Module, gen: torch.Generator) -> dict[str, torch.Tensor]:
    unet, _ = _target_modules(pipe)
    tensors: dict[str, torch.Tensor] = {}
    for path, module in unet.items():
        out_features, in_features = module.weight.shape
        out_a, out_b = _factor_pair(out_features)
        in_a, in_b = _factor_pair(in_features)
        key = _kohya_name("lora_unet", path)
        tensors[f"{key}.lokr_w1"] = torch.randn(out_a, in_a, generator=gen) * 0.3
        tensors[f"{key}.lokr_w2_a"] = torch.randn(out_b, spec.rank, generator=gen) * 0.3
        tensors[f"{key}.lokr_w2_b"] = torch.randn(spec.rank, in_b, generator=gen) * 0.3
        tensors[f"{key}.alpha"] = torch.tensor(spec.alpha)
    return tensors


WRITERS: dict[str, Callable[[DemoAdapter, torch.nn.Module, torch.Generator], dict[str, torch.Tensor]]] = {
    "kohya": lambda s, p, g: _write_kohya(s, p, g, conv=False),
    "locon": lambda s, p, g: _write_kohya(s, p, g, conv=True),
    "peft": _write_peft,
    "loha": _write_loha,
    "lokr": _write_lokr,
}


def _preview(spec: DemoAdapter, size: int = 96) -> Image.Image:
    image = Image.new("RGB", (size, size), spec.colour)
    draw = ImageDraw.Draw(image)
    shade = tuple(max(0, c - 70) for c in spec.colour)
    draw.ellipse((size // 5, size // 5, 4 * size // 5, 4 * size // 5), outline=shade, width=4)
    draw.text((6, size - 16), spec.triggers[0], fill=(255, 255, 255))
    return image


def _png_data_uri(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _file_metadata(spec: DemoAdapter) -> dict[str, str]:
    if spec.writer in ("kohya", "locon", "loha", "lokr"):
        network_module = {
            "kohya": "networks.lora",
            "locon": "lycoris.kohya",
            "loha": "lycoris.kohya",
            "lokr": "lycoris.kohya",
        }[spec.writer]
        meta = {
            "ss_output_name": spec.name,
            "ss_base_model_version": "sd_v1",
            "ss_network_module": network_module,
            "ss_network_dim": str(spec.rank),
            "ss_network_alpha": str(spec.alpha),
            "ss_tag_frequency": json.dumps({f"10_{spec.triggers[0]}": spec.tags}),
            "ss_training_comment": f"trigger: {', '.join(spec.triggers)}",
        }
        if spec.writer != "kohya":
            meta["ss_network_args"] = json.dumps(
                {"algo": {"locon": "locon", "loha": "loha", "lokr": "lokr"}[spec.writer]}
            )
        return meta
    return {
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": "stable-diffusion-v1/lora",
        "modelspec.implementation": "https://github.com/huggingface/diffusers",
        "modelspec.title": spec.title,
        "modelspec.trigger_phrase": ", ".join(spec.triggers),
        "modelspec.description": spec.description,
        "modelspec.tags": ", ".join(spec.tags),
        "modelspec.thumbnail": _png_data_uri(_preview(spec, 48)),
    }


def _write_sidecars(spec: DemoAdapter, path: Path) -> None:
    stem = path.with_suffix("")
    if "civitai" in spec.sidecars:
        info = {
            "id": 1000 + LIBRARY.index(spec),
            "name": "v1.0",
            "baseModel": "SD 1.5",
            "trainedWords": spec.triggers,
            "description": spec.description,
            "model": {"name": spec.title, "type": "LORA", "tags": [spec.category, *list(spec.tags)[:3]]},
            "files": [{"name": path.name, "hashes": {"SHA256": hashlib.sha256(path.read_bytes()).hexdigest().upper()}}],
        }
        stem.with_suffix(".civitai.info").write_text(json.dumps(info, indent=2))
    if "a1111" in spec.sidecars:
        card = {
            "description": spec.description,
            "sd version": "SD1",
            "activation text": ", ".join(spec.triggers),
            "preferred weight": spec.preferred_weight,
            "notes": f"{spec.category} adapter from the LoRA Composer demo library",
        }
        stem.with_suffix(".json").write_text(json.dumps(card, indent=2))
    if "preview" in spec.sidecars:
        _preview(spec).save(stem.with_suffix(".preview.png"))


def build_library(out_dir: Path = DEFAULT_DIR, *, model: str = "tiny-sd") -> list[Path]:
    """Write every demo adapter (and its sidecars) into ``out_dir``; returns the adapter file paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    pipe = load_preset(model)
    paths = []
    for index, spec in enumerate(LIBRARY):
        gen = torch.Generator().manual_seed(1000 + index)
        tensors = WRITERS[spec.writer](spec, pipe, gen)
        subdir = out_dir / spec.category
        subdir.mkdir(exist_ok=True)
        path = subdir / f"{spec.name}.safetensors"
        tmp = path.with_suffix(".tmp")
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=_file_metadata(spec))
        tmp.replace(path)
        _write_sidecars(spec, path)
        paths.append(path)
    (out_dir / ".complete").write_text(f"{len(paths)} adapters for {model}\n")
    return paths


def library_is_built(out_dir: Path = DEFAULT_DIR) -> bool:
    """True when a previous :func:`build_library` finished in ``out_dir``."""
    return (out_dir / ".complete").exists()


def main() -> None:
    """Command-line entry: build the library into the given directory."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", nargs="?", type=Path, default=DEFAULT_DIR)
    parser.add_argument("--force", action="store_true", help="rebuild even when the library is already complete")
    args = parser.parse_args()
    if library_is_built(args.out_dir) and not args.force:
        print(f"demo library already built in {args.out_dir}")
        return
    for path in build_library(args.out_dir):
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
