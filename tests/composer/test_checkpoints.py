"""Single-file checkpoints (`--model FILE.safetensors`): SD 1.x, SD 2.x, SDXL and FLUX.1 files in their original
layouts load offline, weight for weight, and compose like diffusers' own ``load_lora_weights`` on the same model.

The files are written from tiny seeded diffusers models through the inverse of diffusers' key conversion
(``benchmarks._checkpoint_writers``); the writers are checked against diffusers' forward converters first.
"""

from __future__ import annotations

import copy
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from diffusers import FluxPipeline, StableDiffusionPipeline, StableDiffusionXLPipeline
from diffusers.loaders import single_file_utils as sfu
from format_writers import attention_shapes, write_diffusers, write_kohya
from producers import pipeline_latents, relative_error

from benchmarks import _checkpoint_writers as cw
from composer.checkpoints import sizes
from composer.checkpoints.files import list_model_files
from composer.checkpoints.layout import describe_checkpoint
from composer.cli import main
from composer.mixin import make_composable
from composer.presets import load_preset
from composer.service import CompositionService
from composer.smoke_presets.tokenizers import build_t5_tokenizer, t5_vocab
from fusion.errors import PresetError, UnsafeFormatError, UnsafePathError

TOL = 1e-5


def _models(family: str) -> dict[str, Any]:
    """The tiny diffusers components a ``family`` checkpoint is written from."""
    if family == "flux":
        return {
            "transformer": cw.tiny_flux(),
            "vae": cw.tiny_vae(16, flux=True),
            "text_encoder": cw.clip_text(),
            "text_encoder_2": cw.tiny_t5(len(t5_vocab())),
        }
    models: dict[str, Any] = {"unet": cw.tiny_unet(family), "vae": cw.tiny_vae()}
    if family == "sd2":
        models["text_encoder"] = cw.clip_text(act="gelu")
    else:
        models["text_encoder"] = cw.clip_text()
    if family == "sdxl":
        models["text_encoder_2"] = cw.clip_text(act="gelu", projection=64, seed=7)
    return models


def _ldm_tensors(family: str, models: dict[str, Any]) -> dict[str, torch.Tensor]:
    """``models`` in the family's original single-file layout (A1111 / SGM names; ComfyUI's for FLUX)."""
    if family == "flux":
        return (
            cw.prefixed(cw.flux_to_bfl(models["transformer"]), "model.diffusion_model.")
            | cw.prefixed(cw.vae_to_ldm(models["vae"]), "vae.")
            | cw.prefixed(cw.clip_to_ldm(models["text_encoder"]), "text_encoders.clip_l.transformer.")
            | cw.prefixed(models["text_encoder_2"].state_dict(), "text_encoders.t5xxl.transformer.")
        )
    tensors = cw.prefixed(cw.unet_to_ldm(models["unet"]), "model.diffusion_model.")
    tensors |= cw.prefixed(cw.vae_to_ldm(models["vae"]), "first_stage_model.")
    if family == "sd1":
        tensors |= cw.prefixed(cw.clip_to_ldm(models["text_encoder"]), "cond_stage_model.transformer.")
    elif family == "sd2":
        open_clip = cw.clip_to_open_clip(models["text_encoder"], extra_layer=True)
        tensors |= cw.prefixed(open_clip, "cond_stage_model.model.")
    else:
        tensors |= cw.prefixed(cw.clip_to_ldm(models["text_encoder"]), "conditioner.embedders.0.transformer.")
        tensors |= cw.prefixed(cw.clip_to_open_clip(models["text_encoder_2"]), "conditioner.embedders.1.model.")
    return tensors


@pytest.fixture(scope="module")
def written(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Per layout: the source models and the checkpoint file; plus a FLUX text-encoder folder and VAE file."""
    root = tmp_path_factory.mktemp("checkpoints")
    out: dict[str, Any] = {"root": root}
    for family in ("sd1", "sd2", "sdxl", "flux"):
        models = _models(family)
        name = {"sd2": "v2-1_768-ema-pruned", "flux": "flux1-dev-comfy"}.get(family, f"{family}-model")
        out[family] = (models, cw.save(_ldm_tensors(family, models), root / f"{name}.safetensors"))
    flux = out["flux"][0]
    folder = root / "flux-text"
    flux["text_encoder"].save_pretrained(folder / "text_encoder")
    flux["text_encoder_2"].save_pretrained(folder / "text_encoder_2")
    build_t5_tokenizer().save_pretrained(folder / "tokenizer_2")
    out["text_encoders"] = folder
    out["ae"] = cw.save(cw.vae_to_ldm(flux["vae"]), root / "ae.safetensors")
    out["bfl"] = cw.save(cw.flux_to_bfl(flux["transformer"]), root / "flux1-dev.safetensors")
    return out


def _max_diff(ours: torch.nn.Module, theirs: torch.nn.Module) -> float:
    a, b = ours.state_dict(), theirs.state_dict()
    assert sorted(a) == sorted(b)
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a)


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl", "flux"])
def test_written_layouts_convert_back_through_diffusers(written: dict[str, Any], family: str) -> None:
    """The writers are the inverse of diffusers' forward converters: converting a file gives the models back."""
    from safetensors.torch import load_file

    models, path = written[family]
    raw = load_file(str(path))
    converted = {"vae": sfu.convert_ldm_vae_checkpoint(raw, dict(models["vae"].config))}
    if family == "flux":
        converted["text_encoder"] = sfu.convert_ldm_clip_checkpoint(raw, "text_encoders.clip_l.transformer.")
        converted["text_encoder_2"] = sfu.convert_sd3_t5_checkpoint_to_diffusers(raw)
        wide = _flux_at_full_width()  # diffusers' FLUX converter assumes FLUX.1's width: names and shapes there
        back = sfu.convert_flux_transformer_checkpoint_to_diffusers(cw.flux_to_bfl(wide))
        assert {k: v.shape for k, v in back.items()} == {k: v.shape for k, v in wide.state_dict().items()}
    else:
        converted["unet"] = sfu.convert_ldm_unet_checkpoint(raw, dict(models["unet"].config))
        if family == "sd2":
            used = {k: v for k, v in raw.items() if ".resblocks.2." not in k}  # the unused last block
            converted["text_encoder"] = sfu.convert_open_clip_checkpoint(models["text_encoder"], used)
        else:
            converted["text_encoder"] = sfu.convert_ldm_clip_checkpoint(raw)
        if family == "sdxl":
            converted["text_encoder_2"] = sfu.convert_open_clip_checkpoint(
                models["text_encoder_2"], raw, prefix="conditioner.embedders.1.model."
            )
    for part, state in converted.items():
        want = {k: v for k, v in models[part].state_dict().items() if not k.endswith("position_ids")}
        state = {k if k in want else k.removeprefix("text_model."): v for k, v in state.items()}
        state = {k: v for k, v in state.items() if not k.endswith("position_ids")}
        assert sorted(state) == sorted(want), part
        assert all(torch.equal(state[k], want[k]) for k in want), part


def _flux_at_full_width() -> torch.nn.Module:
    """A FLUX transformer at FLUX.1's width, one block of each kind, on the meta device (no memory)."""
    from diffusers import FluxTransformer2DModel

    with torch.device("meta"):
        return FluxTransformer2DModel(num_layers=1, num_single_layers=1)


def _peer(family: str, models: dict[str, Any], pipe: Any) -> Any:
    """A diffusers pipeline assembled from the source models, with the loaded pipeline's tokenizers and scheduler."""
    parts = dict(copy.deepcopy(models), scheduler=pipe.scheduler, tokenizer=pipe.tokenizer)
    if family == "flux":
        return FluxPipeline(**parts, tokenizer_2=pipe.tokenizer_2)
    if family == "sdxl":
        return StableDiffusionXLPipeline(**parts, tokenizer_2=pipe.tokenizer_2)
    return StableDiffusionPipeline(**parts, safety_checker=None, feature_extractor=None, requires_safety_checker=False)


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl", "flux"])
def test_checkpoint_loads_weight_for_weight(written: dict[str, Any], family: str) -> None:
    models, path = written[family]
    assert describe_checkpoint(path).family == family
    options = {"text_encoders": written["text_encoders"]} if family == "flux" else {}
    pipe = load_preset(str(path), **options)
    for part, module in models.items():
        assert _max_diff(getattr(pipe, part), module) == 0.0, part
    if family == "sd2":
        assert pipe.scheduler.config.prediction_type == "v_prediction"  # a 768 release, by its name
    pipe.set_progress_bar_config(disable=True)
    peer = _peer(family, models, pipe)
    peer.set_progress_bar_config(disable=True)
    assert torch.equal(pipeline_latents(pipe), pipeline_latents(peer))  # the configs are the source models' too


def _lora_case(family: str, written: dict[str, Any], tmp_path: Path) -> tuple[Any, Any, Path]:
    models, path = written[family]
    options = {"text_encoders": written["text_encoders"]} if family == "flux" else {}
    ours = load_preset(str(path), **options)
    denoiser = models["transformer" if family == "flux" else "unet"]
    shapes = attention_shapes(denoiser)
    if family == "flux":
        lora, _ = write_diffusers(tmp_path / "lora.safetensors", shapes, component="transformer", seed=3)
    else:
        lora, _ = write_kohya(tmp_path / "lora.safetensors", shapes, alphas=16.0, seed=3)
    return ours, _peer(family, models, ours), lora


@pytest.mark.parametrize("family", ["sd1", "flux"])
def test_composing_on_a_checkpoint_equals_diffusers_load_lora_weights(
    written: dict[str, Any], family: str, tmp_path: Path
) -> None:
    ours, peer, lora = _lora_case(family, written, tmp_path)
    for pipe in (ours, peer):
        pipe.set_progress_bar_config(disable=True)
    base = pipeline_latents(peer)
    with torch.no_grad():
        peer.load_lora_weights(str(lora), adapter_name="x")
        peer.set_adapters(["x"], [0.8])
    want = pipeline_latents(peer)
    composed = make_composable(ours)
    composed.add_adapter_file(lora, name="x")
    composed.set_composition({"x": 0.8})
    assert relative_error(base, want) > 1e-3
    assert relative_error(pipeline_latents(composed), want) <= TOL


def test_half_and_fp8_storage_load_into_the_compute_dtype(written: dict[str, Any], tmp_path: Path) -> None:
    models, path = written["sd1"]
    from safetensors.torch import load_file

    raw = load_file(str(path))
    half = cw.save(raw, tmp_path / "half.safetensors", dtype=torch.float16)
    pipe = load_preset(str(half), torch_dtype=torch.float32)
    assert pipe.unet.dtype == torch.float32
    assert _max_diff(pipe.unet, copy.deepcopy(models["unet"]).half().float()) == 0.0
    assert load_preset(str(half), torch_dtype=torch.bfloat16).text_encoder.dtype == torch.bfloat16
    fp8 = cw.save(raw, tmp_path / "fp8.safetensors", dtype=torch.float8_e4m3fn)
    pipe = load_preset(str(fp8))
    want = copy.deepcopy(models["vae"]).to(torch.float8_e4m3fn).float()
    assert _max_diff(pipe.vae, want) == 0.0


def test_vae_file_overrides_the_baked_one(written: dict[str, Any], tmp_path: Path) -> None:
    _, path = written["sd1"]
    other = cw.tiny_vae(seed=11)
    vae_file = cw.save(cw.prefixed(cw.vae_to_ldm(other), "first_stage_model."), tmp_path / "vae-ft.safetensors")
    pipe = load_preset(str(path), vae=vae_file)
    assert _max_diff(pipe.vae, other) == 0.0


def test_flux_transformer_file_names_what_is_missing(written: dict[str, Any]) -> None:
    with pytest.raises(PresetError) as caught:
        load_preset(str(written["bfl"]))
    text = str(caught.value)
    for part in (
        "CLIP-L text encoder",
        "T5-XXL text encoder",
        "T5 tokenizer",
        "autoencoder",
        "--text-encoders",
        "--vae",
    ):
        assert part in text
    with pytest.raises(PresetError, match="autoencoder"):
        load_preset(str(written["bfl"]), text_encoders=written["text_encoders"])
    pipe = load_preset(str(written["bfl"]), text_encoders=written["text_encoders"], vae=written["ae"])
    models = written["flux"][0]
    assert _max_diff(pipe.transformer, models["transformer"]) == 0.0
    assert _max_diff(pipe.vae, models["vae"]) == 0.0


def test_pickles_and_other_files_are_refused(written: dict[str, Any], tmp_path: Path) -> None:
    pickled = tmp_path / "v1-5-pruned-emaonly.ckpt"
    pickled.write_bytes(b"\x80\x04not loaded")
    with pytest.raises(UnsafeFormatError) as caught:
        load_preset(str(pickled))
    assert "save_file" in str(caught.value)
    lora, _ = write_kohya(tmp_path / "lora.safetensors", {"down_blocks.0.attentions.0.proj_in": (64, 64)})
    with pytest.raises(PresetError, match="is not an SD 1"):
        load_preset(str(lora))
    with pytest.raises(PresetError, match="no checkpoint file"):
        load_preset(str(tmp_path / "missing.safetensors"))
    with pytest.raises(PresetError, match="single-file checkpoints"):
        load_preset("tiny-sd", vae=written["ae"])


def test_cli_generates_with_a_checkpoint(written: dict[str, Any], tmp_path: Path) -> None:
    _, path = written["sd1"]
    argv = ["a red fox", "--model", str(path), "--steps", "1", "--size", "32", "32", "--out", str(tmp_path)]
    assert main([*argv, "-q"]) == 0
    assert list(tmp_path.glob("*.png"))


def test_model_picker_lists_checkpoints_in_a1111_and_comfyui_layouts(written: dict[str, Any], tmp_path: Path) -> None:
    a1111 = tmp_path / "webui" / "models" / "Stable-diffusion" / "anime"
    comfy = tmp_path / "webui" / "models" / "checkpoints"
    loras = tmp_path / "webui" / "models" / "Lora"
    for folder in (a1111, comfy, loras):
        folder.mkdir(parents=True)
    shutil.copy(written["sd1"][1], a1111 / "fine-tune.safetensors")
    shutil.copy(written["sdxl"][1], comfy / "xl.safetensors")
    write_kohya(loras / "style.safetensors", {"down_blocks.0.attentions.0.proj_in": (64, 64)})
    write_kohya(comfy / "stray-lora.safetensors", {"down_blocks.0.attentions.0.proj_in": (64, 64)})
    found = list_model_files(tmp_path / "webui")
    assert [p.name for p in found] == ["fine-tune.safetensors", "xl.safetensors"]
    assert list_model_files(tmp_path / "webui" / "models") == found
    service = CompositionService("tiny-sd", models_dir=tmp_path / "webui", out=tmp_path / "out")
    assert service.available_models() == ["tiny-sd", *map(str, found)]
    assert service.use_model(str(found[1])) == str(found[1]) == service.model
    with pytest.raises(UnsafePathError):
        service.use_model(str(written["sd2"][1]))
    assert service.available_models() == ["tiny-sd", *map(str, found)]  # the startup model stays on offer
    assert service.use_model("tiny-sd") == "tiny-sd" == service.model


def test_a_failed_model_switch_changes_nothing(written: dict[str, Any], tmp_path: Path) -> None:
    models = tmp_path / "models"
    models.mkdir()
    shutil.copy(written["bfl"], models / "flux1-dev.safetensors")  # listed, but lacks its text encoders and VAE
    service = CompositionService("tiny-sd", models_dir=models, out=tmp_path / "out")
    offered = service.available_models()
    with pytest.raises(PresetError, match="T5-XXL text encoder"):
        service.use_model(offered[1])
    assert service.model == "tiny-sd"
    assert service.available_models() == offered


def test_service_refuses_checkpoint_options_for_other_models(written: dict[str, Any], tmp_path: Path) -> None:
    with pytest.raises(PresetError, match="single-file checkpoints"):
        CompositionService("tiny-sd", vae=written["ae"], out=tmp_path / "out")
    with pytest.raises(PresetError, match="single-file checkpoints"):
        CompositionService("tiny-sd", text_encoders=written["text_encoders"], out=tmp_path / "out")


def test_vae_option_applies_to_the_startup_checkpoint_only(written: dict[str, Any], tmp_path: Path) -> None:
    models = tmp_path / "models"
    models.mkdir()
    sd1 = shutil.copy(written["sd1"][1], models / "sd1.safetensors")
    xl = shutil.copy(written["sdxl"][1], models / "xl.safetensors")
    other = cw.tiny_vae(seed=11)
    vae_file = cw.save(cw.vae_to_ldm(other), tmp_path / "vae-ft.safetensors")
    service = CompositionService(str(sd1), models_dir=models, vae=vae_file, out=tmp_path / "out")
    service.warm()
    with service._borrow() as composer:
        assert _max_diff(composer.pipe.vae, other) == 0.0
    service.use_model(str(xl))
    with service._borrow() as composer:
        assert _max_diff(composer.pipe.vae, written["sdxl"][0]["vae"]) == 0.0  # its own baked autoencoder


@pytest.mark.parametrize(
    ("keys", "said"),
    [
        (
            {
                "model.diffusion_model.joint_blocks.0.x_block.attn.qkv.weight": (96, 32),
                "model.diffusion_model.x_embedder.proj.weight": (32, 16, 2, 2),
                "model.diffusion_model.context_embedder.weight": (32, 64),
            },
            "Stable Diffusion 3",
        ),
        (
            {
                "transformer_blocks.0.attn.to_q.weight": (32, 32),
                "single_transformer_blocks.0.attn.to_q.weight": (32, 32),
                "x_embedder.weight": (32, 64),
                "context_embedder.weight": (32, 32),
            },
            "diffusers' layout",
        ),
    ],
)
def test_sd3_and_diffusers_layout_transformers_are_refused_and_not_listed(
    keys: dict[str, tuple[int, ...]], said: str, tmp_path: Path
) -> None:
    path = cw.save({k: torch.zeros(shape) for k, shape in keys.items()}, tmp_path / "model.safetensors")
    with pytest.raises(PresetError, match=said) as caught:
        describe_checkpoint(path)
    assert "FLUX.1" in str(caught.value)  # what is supported
    assert "SDXL" in str(caught.value)
    assert list_model_files(tmp_path) == []


def _with(path: Path, out: Path, **replaced: torch.Tensor) -> Path:
    from safetensors.torch import load_file

    return cw.save(load_file(str(path)) | replaced, out)


@pytest.mark.parametrize(("channels", "variant"), [(9, "inpainting"), (8, "instruct-pix2pix")])
def test_inpainting_and_pix2pix_unets_are_refused(
    written: dict[str, Any], tmp_path: Path, channels: int, variant: str
) -> None:
    models, path = written["sd1"]
    conv = models["unet"].conv_in.weight
    wide = torch.zeros(conv.shape[0], channels, *conv.shape[2:])
    odd = _with(path, tmp_path / "variant.safetensors", **{"model.diffusion_model.input_blocks.0.0.weight": wide})
    with pytest.raises(PresetError, match=variant):
        load_preset(str(odd))
    assert list_model_files(tmp_path) == []


@pytest.mark.parametrize(("factor", "variant"), [(6, "Fill"), (2, "Depth")])
def test_flux_fill_and_depth_transformers_are_refused(
    written: dict[str, Any], tmp_path: Path, factor: int, variant: str
) -> None:
    models, path = written["flux"]
    weight = models["transformer"].x_embedder.weight
    wide = torch.zeros(weight.shape[0], weight.shape[1] * factor)
    odd = _with(path, tmp_path / "variant.safetensors", **{"model.diffusion_model.img_in.weight": wide})
    with pytest.raises(PresetError, match=variant):
        describe_checkpoint(odd)
    assert list_model_files(tmp_path) == []


def test_sdxl_file_keeps_its_own_second_tokenizer_with_a_text_encoder_folder(written: dict[str, Any]) -> None:
    pipe = load_preset(str(written["sdxl"][1]), text_encoders=written["text_encoders"])
    assert pipe.tokenizer_2("a photo of a cat").input_ids[:3] == [49406, 320, 1125]  # CLIP's, not the folder's T5


def test_vae_with_other_latent_channels_is_refused(written: dict[str, Any]) -> None:
    with pytest.raises(PresetError, match="latent channels"):
        load_preset(str(written["sd1"][1]), vae=written["ae"])  # FLUX's 16-channel autoencoder on an SD 1.x UNet


def test_missing_vae_file_is_refused_before_loading(
    written: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import composer.checkpoints.load as checkpoint

    def no_loading(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("tensors were loaded")

    monkeypatch.setattr(checkpoint, "load_tensors", no_loading)
    with pytest.raises(PresetError, match="no VAE file"):
        load_preset(str(written["sd1"][1]), vae=tmp_path / "missing-vae.safetensors")


def test_broken_text_encoder_config_is_a_typed_error(written: dict[str, Any], tmp_path: Path) -> None:
    folder = shutil.copytree(written["text_encoders"], tmp_path / "text")
    (folder / "text_encoder" / "config.json").write_text("{not json")
    with pytest.raises(PresetError, match=r"config\.json"):
        load_preset(str(written["bfl"]), text_encoders=folder, vae=written["ae"])


@pytest.mark.parametrize(
    ("build", "shapes"),
    [
        (sizes.clip_config, {"text_model.embeddings.token_embedding.weight": (10, 64)}),
        (lambda base, s: sizes.open_clip_config(base, s, drop_last=False), {"token_embedding.weight": (10, 64)}),
        (sizes.t5_config, {"shared.weight": (10, 32), "encoder.block.0.layer.0.SelfAttention.q.weight": (32, 32)}),
    ],
)
def test_truncated_text_encoder_weights_are_a_typed_error(build: Any, shapes: dict[str, tuple[int, ...]]) -> None:
    with pytest.raises(PresetError, match="is missing"):
        build({}, shapes)


def test_tokenizer_is_built_offline_with_real_clip_ids(written: dict[str, Any]) -> None:
    """The ids are OpenAI CLIP's: known ids for a fixed caption, and open_clip's own BPE tokenizer on harder text."""
    from open_clip.tokenizer import SimpleTokenizer

    pipe = load_preset(str(written["sd1"][1]))
    assert pipe.tokenizer("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    text = "A red fox, jumping over 3 lazy dogs! (watercolor)"
    reference = SimpleTokenizer()
    assert pipe.tokenizer(text).input_ids == [reference.sot_token_id, *reference.encode(text), reference.eot_token_id]
