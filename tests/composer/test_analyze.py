"""`compose analyze`: ΔH per adapter stored in the catalog, plots written, broken files reported, and CMLoRA's H/L
split following the stored scores."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image
from safetensors.torch import save_file
from torch import nn

from composer.cli import main
from composer.mixin import make_composable
from weights_index.catalog import Library

PROMPTS = ["a red house", "a forest path"]


def _write_lora(path: Path, unet: nn.Module, scale: float, seed: int) -> None:
    """A diffusers-format LoRA on every attention projection of the UNet (``scale`` 0 → a no-op adapter)."""
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, module in unet.named_modules():
        if isinstance(module, nn.Linear) and name.endswith(("to_q", "to_k", "to_v", "to_out.0")):
            tensors[f"unet.{name}.lora_A.weight"] = torch.randn(4, module.in_features, generator=g)
            tensors[f"unet.{name}.lora_B.weight"] = torch.randn(module.out_features, 4, generator=g) * scale
    save_file(tensors, str(path))


@pytest.fixture
def library(tmp_path: Path, tiny_sd: Any) -> Path:
    root = tmp_path / "library"
    root.mkdir()
    _write_lora(root / "strong.safetensors", tiny_sd.unet, 1.0, 0)
    _write_lora(root / "mild.safetensors", tiny_sd.unet, 0.2, 1)
    _write_lora(root / "null.safetensors", tiny_sd.unet, 0.0, 2)
    (root / "broken.safetensors").write_bytes(b"not a safetensors file")
    return root


def test_analyze_stores_scores_and_writes_plots(library: Path, tmp_path: Path, capsys: Any, tiny_sd: Any) -> None:
    plots = tmp_path / "plots"
    argv = ["analyze", "--library", str(library), "--prompts", *PROMPTS, "--plot", str(plots), "--json"]
    assert main(argv) == 0
    document = json.loads(capsys.readouterr().out)
    assert document["model"] == "tiny-sd"
    assert document["prompts"] == PROMPTS
    assert (document["cut_radius"], document["max_radius"]) == (9, 45)  # 64² images: ⌊0.2 · 45⌋
    results = {a["name"]: a for a in document["adapters"]}
    assert set(results) == {"strong", "mild", "null", "broken"}
    assert results["broken"]["error"]
    assert results["broken"]["delta_h"] is None
    assert results["null"]["delta_h"] == 0.0  # a zero update changes no pixel
    assert results["strong"]["delta_h"] != 0.0
    stored = {entry.name: entry.scores for entry in Library(library).entries()}
    for name in ("strong", "mild", "null"):
        scores = stored[name]
        assert set(scores) >= {"delta_h", "hf_with", "hf_without"}
        assert scores["delta_h"] == pytest.approx(scores["hf_with"] - scores["hf_without"])
        assert scores["delta_h"] == pytest.approx(results[name]["delta_h"])
        assert scores["hf_without"] == pytest.approx(document["hf_without"])
        with Image.open(results[name]["plot"]) as image:
            assert image.format == "PNG"
            assert image.size == (600, 400)
    assert stored["broken"] == {}
    with Image.open(document["summary_plot"]) as summary:
        assert summary.format == "PNG"
    assert sorted(p.name for p in plots.iterdir()) == [
        "profile-mild.png",
        "profile-null.png",
        "profile-strong.png",
        "summary.png",
    ]

    # CMLoRA splits H/L by the stored scores (carried in Adapter.meta)
    lib = Library(library)
    pipe = make_composable(tiny_sd)
    for name in ("strong", "mild", "null"):
        adapter = lib.read(name)
        pipe.add_adapter(dataclasses.replace(adapter, meta={**adapter.meta, "scores": stored[name]}))
    pipe.set_composition({"strong": 0.8, "mild": 0.8, "null": 0.8}, method="cmlora")
    strategy = pipe.composition_engine.strategy
    expected_high = sorted((n for n in stored if stored[n].get("delta_h", 0) > 0), key=lambda n: -stored[n]["delta_h"])
    assert strategy.high == expected_high
    assert "null" in strategy.low


def test_analyze_prints_a_table(library: Path, capsys: Any) -> None:
    assert main(["analyze", "--library", str(library), "--prompts", PROMPTS[0], "--steps", "2"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0].split() == ["name", "delta_h", "band", "hf_with", "hf_without", "error"]
    assert "3 of 4 adapters scored on tiny-sd (1 prompts, 2 steps, seed 0)" in out
    assert "radii >= 9 of 45" in out
