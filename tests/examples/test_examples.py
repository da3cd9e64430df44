"""The examples run offline, as scripts, and their images show the composition they describe.

Each script runs as ``__main__`` with its own folder on ``sys.path``, as ``python examples/SCRIPT.py`` runs it; what
it prints about itself is not taken as proof: the checks compare its outputs with the plain model's (bit-exact
restoring is proved in tests/composer/test_mixin.py).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from example_scripts import run_example
from PIL import Image


def _pixels(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def test_mixin_example_composes_two_adapters(
    example_library: Path, tmp_path: Path, tiny_sd, monkeypatch, capsys
) -> None:
    run_example("mixin_sd.py", ["--library", str(example_library), "--out", str(tmp_path)], monkeypatch)
    out = capsys.readouterr().out
    assert "adapters: ['corgi', 'watercolor']" in out
    composed = _pixels(tmp_path / "mixin_sd.png")
    assert composed.shape == (64, 64, 3)
    plain = tiny_sd(
        "a corgi astronaut, watercolor",
        num_inference_steps=4,
        height=64,
        width=64,
        generator=torch.Generator().manual_seed(0),
    ).images[0]
    difference = np.abs(composed.astype(int) - np.asarray(plain.convert("RGB")).astype(int))
    assert difference.max() > 0, "the example's image is the plain model's: nothing was composed"


def test_auto_compose_example_picks_by_trigger_words(
    example_library: Path, tmp_path: Path, monkeypatch, capsys
) -> None:
    prompt = "crgastro walking through a neon city"
    run_example("auto_compose.py", [prompt, "--library", str(example_library), "--out", str(tmp_path)], monkeypatch)
    out = capsys.readouterr().out
    # corgi_astronaut's trigger is "crgastro", neon_city's "neon city"; both files recommend weight 0.8.
    assert "- corgi_astronaut @ 0.8" in out
    assert "- neon_city @ 0.8" in out
    assert "trigger word in prompt" in out
    with Image.open(tmp_path / "0-0.png") as image:
        assert image.size == (64, 64)
        assert "Composition: merge" in image.text["parameters"]
