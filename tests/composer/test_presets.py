"""Presets: offline tiny pipelines build deterministically, cache atomically, reload, and generate at the asked size."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from diffusers import (
    FluxKontextPipeline,
    FluxPipeline,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from PIL import Image

from composer.presets import (
    KNOWN_MODELS,
    MARKER_FILE,
    PRESETS,
    build_denoiser,
    build_preset,
    ensure_preset,
    kontext_call_kwargs,
    load_preset,
    preset_family,
)
from composer.smoke_presets import registry
from composer.smoke_presets.tokenizers import CLIP_VOCAB_SIZE, build_clip_tokenizer, build_t5_tokenizer
from fusion.errors import PresetError

TINY = ["tiny-sd", "tiny-sdxl", "tiny-flux", "tiny-flux-kontext"]
FIXTURES = {
    "tiny-sd": "tiny_sd",
    "tiny-sdxl": "tiny_sdxl",
    "tiny-flux": "tiny_flux",
    "tiny-flux-kontext": "tiny_kontext",
}


def _state(pipe) -> dict[str, torch.Tensor]:
    """Every tensor of every model component, keyed ``component.param``."""
    return {
        f"{part}.{key}": value
        for part, module in pipe.components.items()
        if isinstance(module, torch.nn.Module)
        for key, value in module.state_dict().items()
    }


def _assert_same_state(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def _generate(pipe, name: str, size: int = 64):
    """Run a seeded 2-step generation at ``size``², the Kontext way for Kontext."""
    kwargs = {"num_inference_steps": 2, "generator": torch.Generator().manual_seed(0), "output_type": "pil"}
    if name == "tiny-flux-kontext":
        kwargs |= {"image": Image.new("RGB", (size, size), (200, 30, 30)), **kontext_call_kwargs(size, size)}
    else:
        kwargs |= {"height": size, "width": size}
    return pipe(prompt="a photo of a cat", **kwargs).images[0]


# --- tokenizers -----------------------------------------------------------------------------------------------


def test_clip_tokenizer_ids_equal_real_clip_ids():
    tokenizer = build_clip_tokenizer()
    assert len(tokenizer) == CLIP_VOCAB_SIZE
    assert tokenizer("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert tokenizer.convert_ids_to_tokens([320, 2368]) == ["a</w>", "cat</w>"]


def test_clip_tokenizer_matches_open_clip_reference_tokenizer():
    from open_clip.tokenizer import SimpleTokenizer  # an independent implementation over the same BPE file

    reference = SimpleTokenizer()
    ours = build_clip_tokenizer()
    for text in ["Hello world! A corgi astronaut, film grain.", "it's 2024: café 日本 ~~", "ÿ¬® <b>bold</b>"]:
        assert ours(text, add_special_tokens=False).input_ids == reference.encode(text), text


def test_sdxl_second_tokenizer_pads_with_bang_like_real_sdxl():
    assert build_clip_tokenizer(pad_token="!").pad_token_id == 0


def test_t5_tokenizer_is_small_covers_ascii_and_keeps_words_whole():
    tokenizer = build_t5_tokenizer()
    assert 1000 < len(tokenizer) < 1300
    ids = tokenizer("a photo of a Cat, xyzzy!").input_ids
    assert ids[-1] == tokenizer.eos_token_id == 1
    assert tokenizer.unk_token_id not in ids
    assert tokenizer.convert_ids_to_tokens(tokenizer("photo of").input_ids) == ["▁photo", "▁of", "</s>"]


# --- building and the cache -----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", TINY)
def test_build_is_deterministic_and_matches_cache(name, preset_cache):
    first, second = _state(build_preset(name)), _state(build_preset(name))
    _assert_same_state(first, second)
    _assert_same_state(first, _state(load_preset(name, cache_dir=preset_cache)))


@pytest.mark.parametrize("name", ["tiny-sdxl", "tiny-flux"])
def test_a_loaded_preset_tokenizes_as_the_tokenizers_saved_in_its_cache(name, preset_cache):
    """load_preset builds a smoke preset's tokenizers in memory; they must read text exactly as the copies that
    save_pretrained wrote into the cache folder, which stock diffusers loads."""
    from transformers import AutoTokenizer

    folder = ensure_preset(name, preset_cache)
    pipe = load_preset(name, cache_dir=preset_cache)
    text = ["a photo of a Cat, xyzzy!", "zorbex wearing a krwn crown in the snow, " * 12]
    for part in ("tokenizer", "tokenizer_2"):
        saved = AutoTokenizer.from_pretrained(folder / part)
        loaded = getattr(pipe, part)
        assert type(loaded).__name__ == type(saved).__name__
        assert loaded.model_max_length == saved.model_max_length
        assert loaded.pad_token == saved.pad_token
        for kwargs in ({}, {"padding": "max_length", "truncation": True, "max_length": loaded.model_max_length}):
            assert loaded(text, **kwargs).input_ids == saved(text, **kwargs).input_ids


def test_build_does_not_disturb_global_rng():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    build_denoiser("tiny-sd")
    assert torch.equal(torch.rand(3), expected)


def test_flux_and_kontext_share_weights_and_sd_presets_differ():
    assert torch.equal(
        build_denoiser("tiny-flux").x_embedder.weight, build_denoiser("tiny-flux-kontext").x_embedder.weight
    )
    assert not torch.equal(build_denoiser("tiny-sd").conv_in.weight, build_denoiser("tiny-sdxl").conv_in.weight)


def test_build_denoiser_equals_pipeline_denoiser(tiny_sd):
    _assert_same_state(build_denoiser("tiny-sd").state_dict(), tiny_sd.unet.state_dict())


def test_sd15_shapes_denoiser_has_real_sd15_size():
    with torch.device("meta"):  # shapes only: the real build takes ~15 s and 3.4 GB
        unet = build_denoiser("sd15-shapes")
    assert sum(p.numel() for p in unet.parameters()) == 859_520_964  # SD 1.5's UNet


def test_second_ensure_reuses_cache_without_building(tmp_path, monkeypatch):
    folder = ensure_preset("tiny-sd", tmp_path)
    marker = (folder / MARKER_FILE).read_text()

    def fail(name):
        raise AssertionError("rebuilt a current cache")

    monkeypatch.setattr(registry, "build_preset", fail)
    assert ensure_preset("tiny-sd", tmp_path) == folder
    assert (folder / MARKER_FILE).read_text() == marker
    assert isinstance(load_preset("tiny-sd", cache_dir=tmp_path), StableDiffusionPipeline)


def test_stale_fingerprint_or_missing_marker_is_rebuilt(tmp_path):
    folder = ensure_preset("tiny-sd", tmp_path)
    (folder / MARKER_FILE).write_text(json.dumps({"name": "tiny-sd", "fingerprint": "old"}))
    (folder / "junk.txt").write_text("from an old version")
    assert ensure_preset("tiny-sd", tmp_path) == folder
    assert json.loads((folder / MARKER_FILE).read_text())["fingerprint"] == PRESETS["tiny-sd"].fingerprint()
    assert not (folder / "junk.txt").exists()
    (folder / MARKER_FILE).unlink()  # a half-copied folder without its marker is not trusted either
    ensure_preset("tiny-sd", tmp_path)
    assert (folder / MARKER_FILE).exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny-sd"]  # no temp or stale folders left behind


def test_leftover_partial_build_is_ignored(tmp_path):
    leftover = tmp_path / ".tiny-sd.killed.partial"
    (leftover / "unet").mkdir(parents=True)
    (leftover / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"truncated")
    pipe = load_preset("tiny-sd", cache_dir=tmp_path)
    assert isinstance(pipe, StableDiffusionPipeline)
    assert (tmp_path / "tiny-sd" / MARKER_FILE).exists()


def test_killed_build_leaves_no_cache(tmp_path, monkeypatch):
    real_build = registry.build_preset

    def dies_while_saving(name):
        pipe = real_build(name)

        def save_pretrained(folder, **kwargs):
            (Path(folder) / "model_index.json").write_text("{}")
            raise KeyboardInterrupt

        pipe.save_pretrained = save_pretrained
        return pipe

    monkeypatch.setattr(registry, "build_preset", dies_while_saving)
    with pytest.raises(KeyboardInterrupt):
        ensure_preset("tiny-sd", tmp_path)
    assert list(tmp_path.iterdir()) == []


# --- loading other names --------------------------------------------------------------------------------------


def test_unknown_name_raises_preset_error_with_hint():
    with pytest.raises(PresetError, match="tiny-sd") as info:
        load_preset("no such model!")
    assert info.value.hint


def test_every_preset_name_is_known_to_load_preset():
    smoke = {"tiny-sd", "tiny-sdxl", "tiny-flux", "tiny-flux-kontext", "small-sd", "sd15-shapes"}
    assert set(PRESETS) == smoke
    with pytest.raises(PresetError) as info:
        load_preset("no such model!")
    named = {name.strip() for name in info.value.hint.split("use one of ")[1].split(", a .safetensors")[0].split(",")}
    assert named >= smoke | {"toy-sd"} | set(KNOWN_MODELS)


def test_hub_id_offline_raises_preset_error():
    with pytest.raises(PresetError, match="HF_HUB_OFFLINE"):
        load_preset("lora-composer-tests/does-not-exist")


def test_empty_local_folder_raises_preset_error(tmp_path):
    with pytest.raises(PresetError, match=r"model_index\.json"):
        load_preset(str(tmp_path))


def test_local_folder_without_a_listed_tokenizer_is_refused(tiny_sd_path, tmp_path):
    """diffusers builds a two-token vocabulary for a missing tokenizer folder: every prompt would read as unknown."""
    folder = tmp_path / "no-tokenizer"
    folder.mkdir()
    for entry in tiny_sd_path.iterdir():
        if entry.name != "tokenizer":
            (folder / entry.name).symlink_to(entry, target_is_directory=entry.is_dir())
    with pytest.raises(PresetError, match=r"tokenizer/") as info:
        load_preset(str(folder))
    assert "tokenizer" in info.value.hint


def test_local_folder_loads_offline(tiny_sd_path):
    pipe = load_preset(str(tiny_sd_path))
    assert isinstance(pipe, StableDiffusionPipeline)
    assert preset_family(pipe) == "sd1"


def test_known_models_table_names_each_family():
    assert {model.family for model in KNOWN_MODELS.values()} >= {"sd1", "sdxl", "flux"}
    assert all("/" in model.hub_id for model in KNOWN_MODELS.values())


# --- the fixtures and generation ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "cls", "family"),
    [
        ("tiny-sd", StableDiffusionPipeline, "sd1"),
        ("tiny-sdxl", StableDiffusionXLPipeline, "sdxl"),
        ("tiny-flux", FluxPipeline, "flux"),
        ("tiny-flux-kontext", FluxKontextPipeline, "flux"),
    ],
)
def test_fixture_pipeline_class_family_and_64px_image(name, cls, family, request):
    pipe = request.getfixturevalue(FIXTURES[name])
    assert type(pipe) is cls
    assert preset_family(pipe) == family == PRESETS[name].family
    image = _generate(pipe, name)
    assert image.size == (64, 64)


def test_generation_is_seeded(tiny_sd):
    first = torch.tensor(list(_generate(tiny_sd, "tiny-sd").getdata()))
    second = torch.tensor(list(_generate(tiny_sd, "tiny-sd").getdata()))
    assert torch.equal(first, second)


def test_fixtures_are_fresh_per_test(tiny_sd, tiny_sd_path):
    with torch.no_grad():
        tiny_sd.unet.conv_in.weight.zero_()
    other = load_preset("tiny-sd", cache_dir=tiny_sd_path.parent)
    assert other.unet.conv_in.weight.abs().sum() > 0


def test_kontext_with_input_image_runs_at_64px(tiny_kontext):
    seen = []
    tiny_kontext.transformer.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(kwargs["hidden_states"].shape), with_kwargs=True
    )
    image = _generate(tiny_kontext, "tiny-flux-kontext")
    assert image.size == (64, 64)
    # 64² → 8² latents → 4² packed tokens, for the noise and the input image alike: 32 tokens, not 1024²'s 8192.
    assert seen[0][1] == 2 * 16


def test_preset_family_of_non_pipeline_is_unknown():
    assert preset_family(object()) == "unknown"


def test_preset_family_tells_sd2_by_its_1024_wide_cross_attention(tiny_sd):
    config = {**dict(tiny_sd.unet.config), "cross_attention_dim": 1024}
    unet = UNet2DConditionModel.from_config(config)
    assert preset_family(StableDiffusionPipeline(**{**tiny_sd.components, "unet": unet})) == "sd2"


def test_load_preset_applies_dtype_and_device(preset_cache):
    pipe = load_preset("tiny-sd", cache_dir=preset_cache, torch_dtype=torch.bfloat16, device="cpu")
    assert pipe.unet.dtype == pipe.text_encoder.dtype == torch.bfloat16
    assert pipe.unet.device.type == "cpu"


@pytest.mark.slow
def test_small_sd_runs_4_steps_at_128px(tmp_path):
    pipe = load_preset("small-sd", cache_dir=tmp_path)
    pipe.set_progress_bar_config(disable=True)
    assert preset_family(pipe) == "sd1"
    image = pipe("a photo of a cat", num_inference_steps=4, height=128, width=128).images[0]
    assert image.size == (128, 128)
