"""probe() and read_adapter(): formats, families from metadata and structure, typed refusals."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from format_writers import (
    attention_shapes,
    text_shapes,
    write_diffusers,
    write_flux_kohya,
    write_flux_xlabs,
    write_kohya,
)
from safetensors.torch import save_file

from fusion.errors import FamilyMismatchError, ShapeMismatchError, UnknownLayoutError
from weights_index.reader import probe, read_adapter


def test_probe_kohya_sd1(tiny_sd, tmp_path: Path) -> None:
    shapes = {**attention_shapes(tiny_sd.unet, convs=True), **text_shapes(tiny_sd.text_encoder)}
    path, expected = write_kohya(
        tmp_path / "k.safetensors", shapes, rank=4, metadata={"ss_base_model_version": "sd_v1"}
    )
    header = probe(path)
    assert (header.format, header.family, header.ranks) == ("kohya", "sd1", (4,))
    assert header.num_layers == len(expected)
    assert header.has_text_encoder
    assert header.metadata["ss_base_model_version"] == "sd_v1"
    assert header.file_size == path.stat().st_size


def test_probe_sdxl_from_structure_alone(tiny_sdxl, tmp_path: Path) -> None:
    path, _ = write_kohya(tmp_path / "x.safetensors", attention_shapes(tiny_sdxl.unet), ldm_layers_per_block=2)
    header = probe(path)
    assert (header.format, header.family, header.has_text_encoder) == ("kohya-ldm", "sdxl", False)
    path, _ = write_diffusers(tmp_path / "d.safetensors", attention_shapes(tiny_sdxl.unet), rank=3)
    assert (probe(path).family, probe(path).ranks) == ("sdxl", (3,))


def test_probe_tiny_sd_is_sd1_and_flux_formats(tiny_sd, tiny_flux, tmp_path: Path) -> None:
    path, _ = write_diffusers(tmp_path / "d.safetensors", attention_shapes(tiny_sd.unet))
    assert (probe(path).format, probe(path).family) == ("diffusers", "sd1")
    path, _ = write_flux_kohya(tmp_path / "fk.safetensors", tiny_flux.transformer)
    assert (probe(path).format, probe(path).family) == ("flux-kohya", "flux")
    path, _ = write_flux_xlabs(tmp_path / "fx.safetensors", tiny_flux.transformer)
    assert (probe(path).format, probe(path).family) == ("flux-xlabs", "flux")


def test_real_size_cross_attention_decides_sd1_vs_sd2(tmp_path: Path) -> None:
    key = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k"
    for width, family in ((768, "sd1"), (1024, "sd2")):
        path = tmp_path / f"{width}.safetensors"
        save_file(
            {f"{key}.lora_down.weight": torch.zeros(2, width), f"{key}.lora_up.weight": torch.zeros(320, 2)}, path
        )
        assert probe(path).family == family


def test_metadata_family_names(tmp_path: Path, tiny_sd) -> None:
    shapes = attention_shapes(tiny_sd.unet, limit=2)
    for meta, family in (
        ({"modelspec.architecture": "stable-diffusion-v2-512/lora"}, "sd2"),
        ({"ss_v2": "True"}, "sd2"),
        ({"base_family": "sd1"}, "sd1"),
    ):
        path, _ = write_kohya(tmp_path / "m.safetensors", shapes, metadata=meta)
        assert probe(path).family == family


def test_metadata_contradicting_structure_is_refused(tiny_sd, tmp_path: Path) -> None:
    meta = {"ss_base_model_version": "sdxl_base_v1-0"}
    path, _ = write_kohya(tmp_path / "bad.safetensors", attention_shapes(tiny_sd.unet), metadata=meta)
    with pytest.raises(ShapeMismatchError, match=r"bad\.safetensors.*sdxl"):
        read_adapter(path)
    with pytest.raises(ShapeMismatchError):
        probe(path)


def test_declared_family_mismatch(tiny_flux, tiny_sd, tmp_path: Path) -> None:
    path, _ = write_flux_kohya(tmp_path / "f.safetensors", tiny_flux.transformer)
    with pytest.raises(FamilyMismatchError, match=r"f\.safetensors.*flux"):
        read_adapter(path, family="sd1")
    path, _ = write_kohya(tmp_path / "s.safetensors", attention_shapes(tiny_sd.unet), metadata={"base_family": "sd1"})
    with pytest.raises(FamilyMismatchError):
        read_adapter(path, family="sd2")
    path, _ = write_kohya(tmp_path / "u.safetensors", attention_shapes(tiny_sd.unet))
    assert read_adapter(path, family="sd2").family == "sd2"


def test_read_adapter_meta_and_name(tiny_sd, tmp_path: Path) -> None:
    path, _ = write_kohya(tmp_path / "style.safetensors", attention_shapes(tiny_sd.unet, limit=2), metadata={"a": "b"})
    adapter = read_adapter(path)
    assert adapter.name == "style"
    assert adapter.source == str(path)
    assert adapter.meta == {"format": "kohya", "safetensors_metadata": {"a": "b"}}
    assert read_adapter(path, name="other").name == "other"


def test_unknown_layout_lists_keys(tmp_path: Path) -> None:
    path = tmp_path / "weird.safetensors"
    save_file({"model.layer.weight": torch.zeros(2, 2), "model.layer.bias": torch.zeros(2)}, path)
    with pytest.raises(UnknownLayoutError, match=r"weird\.safetensors.*model\.layer\.weight"):
        probe(path)
    with pytest.raises(UnknownLayoutError):
        read_adapter(path)


def test_inconsistent_lora_ranks_raise(tmp_path: Path) -> None:
    key = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    path = tmp_path / "r.safetensors"
    save_file({f"{key}.lora_down.weight": torch.zeros(4, 32), f"{key}.lora_up.weight": torch.zeros(32, 2)}, path)
    with pytest.raises(ShapeMismatchError, match=r"r\.safetensors.*rank"):
        read_adapter(path)
