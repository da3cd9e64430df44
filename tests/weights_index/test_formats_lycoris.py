"""LyCORIS LoHa / LoKr readers: exact deltas, compact exact forms where cheaper, typed errors for bad factors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from format_writers import attention_shapes, text_shapes, write_loha, write_lokr
from safetensors.torch import load_file, save_file
from test_formats_lora import assert_deltas

from fusion.adapters import Dense, LowRank
from fusion.errors import ShapeMismatchError, UnknownLayoutError
from weights_index.reader import probe, read_adapter


def test_loha_linear_and_conv_exact_as_low_rank(tiny_sd, tmp_path: Path) -> None:
    shapes = {**attention_shapes(tiny_sd.unet, convs=True), **text_shapes(tiny_sd.text_encoder)}
    path, expected = write_loha(tmp_path / "loha.safetensors", shapes, rank=2, alpha=1.0)
    assert_deltas(path, expected, shapes=shapes)
    adapter = read_adapter(path, shapes=shapes)
    assert all(isinstance(u, LowRank) and u.rank == 4 for _, u in adapter.all_layers())
    assert any(u.is_conv for u in adapter.layers.values())
    flat = read_adapter(path).layers
    conv_key = next(k for k, s in shapes.items() if len(s) == 4)
    assert flat[conv_key].shape == (shapes[conv_key][0], shapes[conv_key][1] * 9)
    assert probe(path).format == "lycoris-loha"


def test_loha_large_rank_falls_back_to_dense(tiny_sd, tmp_path: Path) -> None:
    shapes = attention_shapes(tiny_sd.unet, limit=2)
    path, expected = write_loha(tmp_path / "loha.safetensors", shapes, rank=8, alpha=4.0)
    assert_deltas(path, expected)
    assert all(isinstance(u, Dense) for u in read_adapter(path).layers.values())


def test_loha_tucker_conv(tiny_sd, tmp_path: Path) -> None:
    convs = {k: v for k, v in attention_shapes(tiny_sd.unet, convs=True).items() if len(v) == 4}
    assert_deltas(*write_loha(tmp_path / "t.safetensors", convs, rank=2, tucker=True))


@pytest.mark.parametrize(
    ("rank", "decompose_w1", "kind"),
    [(2, False, LowRank), (None, False, Dense), (None, True, Dense), (2, True, LowRank)],
)
def test_lokr_variants(tiny_sd, tmp_path: Path, rank, decompose_w1, kind) -> None:
    shapes = attention_shapes(tiny_sd.unet, limit=4)
    path, expected = write_lokr(tmp_path / "k.safetensors", shapes, rank=rank, decompose_w1=decompose_w1, alpha=3.0)
    assert_deltas(path, expected)
    assert all(isinstance(u, kind) for u in read_adapter(path).layers.values())


def test_inconsistent_loha_factors_raise(tiny_sd, tmp_path: Path) -> None:
    path, _ = write_loha(tmp_path / "loha.safetensors", attention_shapes(tiny_sd.unet, limit=1))
    tensors = load_file(str(path))
    key = next(k for k in tensors if k.endswith("hada_w2_b"))
    tensors[key] = torch.randn(3, tensors[key].shape[1])
    save_file(tensors, str(path))
    with pytest.raises(ShapeMismatchError, match=r"loha\.safetensors"):
        read_adapter(path)


def test_unknown_lycoris_tensor_raises(tiny_sd, tmp_path: Path) -> None:
    path, _ = write_lokr(tmp_path / "k.safetensors", attention_shapes(tiny_sd.unet, limit=1))
    tensors = load_file(str(path))
    name = next(iter(tensors)).rsplit(".", 1)[0]
    tensors[f"{name}.hada_w9_z"] = torch.zeros(2, 2)
    save_file(tensors, str(path))
    with pytest.raises(UnknownLayoutError, match="hada_w9_z"):
        read_adapter(path)
