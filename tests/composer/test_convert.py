"""`compose convert LORA --to shira`: top-K |ΔW| per layer, retained energy reported, exact at density 1."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from composer.cli import main
from composer.training.shira import attention_targets
from fusion.adapters import Sparse
from weights_index.reader import read_adapter


@pytest.fixture
def lora_file(tiny_sd, tmp_path: Path) -> Path:
    """A diffusers-layout rank-4 LoRA on four attention projections of the tiny SD UNet."""
    gen = torch.Generator().manual_seed(0)
    tensors = {}
    for key in attention_targets(tiny_sd.unet)[:4]:
        out_features, in_features = tiny_sd.unet.get_submodule(key).weight.shape
        tensors[f"unet.{key}.lora_A.weight"] = torch.randn(4, in_features, generator=gen)
        tensors[f"unet.{key}.lora_B.weight"] = torch.randn(out_features, 4, generator=gen)
    path = tmp_path / "style.safetensors"
    save_file(tensors, str(path))
    return path


def test_full_density_reproduces_the_lora_exactly(lora_file: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "full.safetensors"
    assert main(["convert", str(lora_file), "--to", "shira", "--density", "1.0", "--out", str(out), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["retained"] == pytest.approx(1.0)
    lora = read_adapter(lora_file)
    sparse = read_adapter(out)
    assert sparse.meta["format"] == "shira"
    assert sparse.meta["safetensors_metadata"]["mask_type"] == "lora-topk"
    assert set(sparse.layers) == set(lora.layers)
    for key, update in lora.layers.items():
        converted = sparse.layers[key]
        assert isinstance(converted, Sparse)
        assert torch.equal(converted.delta(), update.delta())


def test_density_keeps_top_entries_and_prints_energy(lora_file: Path, capsys) -> None:
    assert main(["convert", str(lora_file), "--density", "0.05"]) == 0
    text = capsys.readouterr().out
    assert "retained energy" in text
    out = lora_file.with_name("style-shira.safetensors")
    sparse = read_adapter(out)
    lora = read_adapter(lora_file)
    kept, total = 0.0, 0.0
    for key, update in lora.layers.items():
        delta = update.delta().reshape(-1)
        converted = sparse.layers[key]
        k = converted.nnz
        assert k == -(-delta.numel() * 5 // 100)
        assert set(converted.index.tolist()) == set(delta.abs().topk(k).indices.tolist())
        assert torch.equal(converted.values, delta[converted.index])
        kept += float((converted.values.double() ** 2).sum())
        total += float((delta.double() ** 2).sum())
        assert key in text
    overall = kept / total
    assert 0.05 < overall < 1.0
    assert f"{overall:.4f}" in text


def test_bad_density_is_a_user_error(lora_file: Path, capsys) -> None:
    assert main(["convert", str(lora_file), "--density", "1.5"]) == 1
    assert "density" in capsys.readouterr().err


def test_info_reports_overlap_of_two_converted_adapters(lora_file: Path, tmp_path: Path, capsys) -> None:
    library = tmp_path / "library"
    library.mkdir()
    for name, density in (("sparse_a", 0.05), ("sparse_b", 0.5)):
        out = library / f"{name}.safetensors"
        assert main(["convert", str(lora_file), "--to", "shira", "--density", str(density), "--out", str(out)]) == 0
    capsys.readouterr()
    assert main(["info", "sparse_a", "--library", str(library), "--overlap", "sparse_b", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)["overlap"]
    assert report["other"] == "sparse_b"
    assert len(report["layers"]) == 4
    assert report["mean_shared"] == pytest.approx(1.0)
    assert 0.0 < report["mean_awor"] < 1.0
    assert report["max_awom"] > 0.0
    assert main(["info", "sparse_a", "--library", str(library), "--overlap", "sparse_b"]) == 0
    assert "mean AWOR" in capsys.readouterr().out
    plain = library / "plain.safetensors"
    plain.write_bytes(lora_file.read_bytes())
    assert main(["info", "sparse_a", "--library", str(library), "--overlap", "plain"]) == 1
    assert "share no sparse layers" in capsys.readouterr().err
