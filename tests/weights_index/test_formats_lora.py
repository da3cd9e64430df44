"""LoRA readers: every layer's delta equals the producer's ΔW, and diffusers' own merge gives the same denoiser."""

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
    write_peft,
)

from weights_index.reader import read_adapter

TOL = 1e-6


def assert_deltas(path: Path, expected: dict[str, torch.Tensor], **kwargs) -> None:
    """Every layer read from ``path`` has exactly the expected keys and dense ΔW (≤1e-6 relative)."""
    adapter = read_adapter(path, **kwargs)
    got = dict(adapter.all_layers())
    assert set(got) == set(expected)
    for key, want in expected.items():
        delta = got[key].delta(torch.float64)
        assert delta.shape == want.shape, key
        error = float((delta - want.double()).norm() / want.double().norm())
        assert error <= TOL, (key, error)


def test_kohya_sd1_with_locon_and_text_encoder(tiny_sd, tmp_path: Path) -> None:
    shapes = {**attention_shapes(tiny_sd.unet, convs=True), **text_shapes(tiny_sd.text_encoder)}
    assert any(len(s) == 4 for s in shapes.values())
    assert_deltas(*write_kohya(tmp_path / "k.safetensors", shapes, metadata={"ss_base_model_version": "sd_v1"}))


def test_kohya_per_module_alpha_is_kept(tiny_sd, tmp_path: Path) -> None:
    shapes = attention_shapes(tiny_sd.unet, limit=6)
    alphas = {key: float(i + 1) for i, key in enumerate(shapes)}
    assert_deltas(*write_kohya(tmp_path / "k.safetensors", shapes, alphas=alphas))


def test_kohya_sdxl_ldm_names(tiny_sdxl, tmp_path: Path) -> None:
    shapes = {
        **attention_shapes(tiny_sdxl.unet),
        **text_shapes(tiny_sdxl.text_encoder),
        **text_shapes(tiny_sdxl.text_encoder_2, "text_encoder_2"),
    }
    path, expected = write_kohya(tmp_path / "x.safetensors", shapes, ldm_layers_per_block=2)
    assert_deltas(path, expected)
    assert read_adapter(path).meta["format"] == "kohya-ldm"


def test_diffusers_with_lora_adapter_metadata_scale(tiny_sd, tmp_path: Path) -> None:
    shapes = {**attention_shapes(tiny_sd.unet), **text_shapes(tiny_sd.text_encoder)}
    assert_deltas(*write_diffusers(tmp_path / "d.safetensors", shapes, lora_alpha=8.0, rank=4))


def test_peft_with_adapter_config_sidecar(tiny_sd, tmp_path: Path) -> None:
    path, expected = write_peft(tmp_path / "peft" / "adapter_model.safetensors", attention_shapes(tiny_sd.unet))
    assert_deltas(path, expected)
    assert read_adapter(path).meta["format"] == "peft"


def test_flux_kohya_fused_qkv_is_split(tiny_flux, tmp_path: Path) -> None:
    path, expected = write_flux_kohya(tmp_path / "f.safetensors", tiny_flux.transformer)
    assert_deltas(path, expected)
    assert read_adapter(path).family == "flux"


def test_flux_xlabs(tiny_flux, tmp_path: Path) -> None:
    assert_deltas(*write_flux_xlabs(tmp_path / "x.safetensors", tiny_flux.transformer))


def test_flux_diffusers(tiny_flux, tmp_path: Path) -> None:
    shapes = attention_shapes(tiny_flux.transformer)
    assert_deltas(*write_diffusers(tmp_path / "d.safetensors", shapes, component="transformer"))


# --- equivalence with diffusers' own loader -------------------------------------------------------------------


def _denoiser_output(pipe) -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        if hasattr(pipe, "unet"):
            unet = pipe.unet
            cross = unet.config.cross_attention_dim
            kwargs = {}
            if unet.config.addition_embed_type == "text_time":
                text_dim = unet.config.projection_class_embeddings_input_dim - 6 * unet.config.addition_time_embed_dim
                kwargs["added_cond_kwargs"] = {
                    "text_embeds": torch.randn(1, text_dim, generator=gen),
                    "time_ids": torch.randn(1, 6, generator=gen),
                }
            sample = torch.randn(1, unet.config.in_channels, 8, 8, generator=gen)
            context = torch.randn(1, 5, cross, generator=gen)
            return unet(sample, 10, encoder_hidden_states=context, **kwargs).sample
        model = pipe.transformer
        cfg = model.config
        return model(
            hidden_states=torch.randn(1, 16, cfg.in_channels, generator=gen),
            encoder_hidden_states=torch.randn(1, 4, cfg.joint_attention_dim, generator=gen),
            pooled_projections=torch.randn(1, cfg.pooled_projection_dim, generator=gen),
            timestep=torch.tensor([0.5]),
            img_ids=torch.zeros(16, 3),
            txt_ids=torch.zeros(4, 3),
            guidance=torch.tensor([3.5]) if cfg.guidance_embeds else None,
        ).sample


def _add_by_hand(pipe, path: Path) -> None:
    adapter = read_adapter(path)
    denoiser = pipe.unet if hasattr(pipe, "unet") else pipe.transformer
    with torch.no_grad():
        for key, update in adapter.layers.items():
            weight = denoiser.get_submodule(key).weight
            weight += update.delta(weight.dtype)
        for key, update in adapter.text_encoder_layers.items():
            component, _, module = key.partition(".")
            weight = getattr(pipe, component).get_submodule(module).weight
            weight += update.delta(weight.dtype)


def _assert_same_as_diffusers(make_pipe, path: Path) -> None:
    ours = make_pipe()
    _add_by_hand(ours, path)
    theirs = make_pipe()
    with torch.no_grad():
        theirs.load_lora_weights(str(path))
        theirs.fuse_lora()
    a, b = _denoiser_output(ours), _denoiser_output(theirs)
    base = _denoiser_output(make_pipe())
    assert float((a - base).abs().max()) > 1e-4, "the adapter must change the output for this test to mean anything"
    assert float((a - b).norm() / b.norm()) <= 1e-5


@pytest.mark.parametrize("style", ["kohya", "diffusers"])
def test_sd1_matches_diffusers_merge(style: str, fresh_pipeline, tmp_path: Path) -> None:
    make = lambda: fresh_pipeline("tiny-sd")  # noqa: E731
    pipe = make()
    shapes = {**attention_shapes(pipe.unet, convs=True), **text_shapes(pipe.text_encoder)}
    if style == "kohya":
        path, _ = write_kohya(tmp_path / "k.safetensors", shapes, alphas=2.0)
    else:
        path, _ = write_diffusers(tmp_path / "d.safetensors", shapes)
    _assert_same_as_diffusers(make, path)


def test_sdxl_kohya_ldm_matches_diffusers_merge(fresh_pipeline, tmp_path: Path) -> None:
    make = lambda: fresh_pipeline("tiny-sdxl")  # noqa: E731
    pipe = make()
    shapes = {**attention_shapes(pipe.unet), **text_shapes(pipe.text_encoder_2, "text_encoder_2")}
    path, _ = write_kohya(tmp_path / "x.safetensors", shapes, ldm_layers_per_block=2, alphas=3.0)
    _assert_same_as_diffusers(make, path)


@pytest.mark.parametrize("style", ["kohya", "xlabs", "diffusers"])
def test_flux_matches_diffusers_merge(style: str, fresh_pipeline, tmp_path: Path) -> None:
    make = lambda: fresh_pipeline("tiny-flux")  # noqa: E731
    transformer = make().transformer
    if style == "kohya":
        path, _ = write_flux_kohya(tmp_path / "k.safetensors", transformer)
    elif style == "xlabs":
        path, _ = write_flux_xlabs(tmp_path / "x.safetensors", transformer)
    else:
        path, _ = write_diffusers(tmp_path / "d.safetensors", attention_shapes(transformer), component="transformer")
    _assert_same_as_diffusers(make, path)
