"""Image output: A1111 `parameters` chunk readable back from the PNG, JSON sidecar, atomic writes."""

from __future__ import annotations

import json
from pathlib import Path

from PIL import Image

from composer.images import GenerationRecord, a1111_parameters, save_image


def _record() -> GenerationRecord:
    return GenerationRecord(
        prompt="a corgi astronaut, crgastro",
        negative_prompt="blurry",
        steps=4,
        guidance_scale=7.5,
        seed=3,
        width=64,
        height=64,
        model="tiny-sd",
        sampler="PNDMScheduler",
        method="merge",
        adapters=[{"name": "corgi", "weight": 0.8, "hash": "abcdef1234"}, {"name": "grain", "weight": 0.5}],
    )


def test_parameters_text_follows_a1111_layout() -> None:
    text = a1111_parameters(_record())
    first, negative, settings = text.split("\n")
    assert first == "a corgi astronaut, crgastro <lora:corgi:0.8> <lora:grain:0.5>"
    assert negative == "Negative prompt: blurry"
    assert settings.startswith("Steps: 4, Sampler: PNDMScheduler, CFG scale: 7.5, Seed: 3, Size: 64x64, Model: tiny-sd")
    assert 'Lora hashes: "corgi: abcdef1234"' in settings


def test_saved_png_carries_parameters_and_sidecar(tmp_path: Path) -> None:
    image = Image.new("RGB", (64, 64), (10, 20, 30))
    png, sidecar = save_image(image, tmp_path / "out" / "img", _record())
    reloaded = Image.open(png)
    assert reloaded.size == (64, 64)
    assert reloaded.text["parameters"] == a1111_parameters(_record())
    document = json.loads(sidecar.read_text())
    assert document["seed"] == 3
    assert document["adapters"][0]["name"] == "corgi"
    assert sorted(p.name for p in png.parent.iterdir()) == ["img.json", "img.png"]
