"""Restoration as editing: the editing pipeline per family, restoring with a trained adapter, composition with a
style adapter through merge and composite, task prompts, and `compose restore`."""

from __future__ import annotations

import json
import runpy
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from diffusers import FluxKontextPipeline, StableDiffusionImg2ImgPipeline, StableDiffusionXLImg2ImgPipeline
from PIL import Image
from safetensors.torch import save_file

from composer.cli import main
from composer.presets import load_preset
from composer.restoration.degrade import make_pairs, to_pil
from composer.restoration.restore import Restorer, editing_pipeline, is_instruct_pix2pix, task_prompt, working_size
from composer.training.restore import RestoreTrainConfig, TaskPairs, train_restore
from fusion.adapters import Adapter, LowRank
from fusion.errors import CompositionError

DERAIN = "remove the rain from the image"


def write_clean_images(folder: Path, count: int, size: int = 32) -> Path:
    """``count`` smooth random RGB images (bilinear blow-ups of 4×4 noise)."""
    folder.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(0)
    for i in range(count):
        coarse = torch.rand((1, 3, 4, 4), generator=gen)
        image = torch.nn.functional.interpolate(coarse, size=(size, size), mode="bilinear")[0]
        to_pil(image).save(folder / f"img{i:02d}.png")
    return folder


@pytest.fixture(scope="module")
def restoration(tmp_path_factory: pytest.TempPathFactory, tiny_kontext_path: Path) -> dict[str, Path]:
    """A library holding a quickly trained derain adapter and a random style LoRA, plus a rainy input image."""
    root = tmp_path_factory.mktemp("restore")
    make_pairs(write_clean_images(root / "src", 4), root / "pairs", "rain")
    library = root / "library"
    pipe = load_preset("tiny-flux-kontext", cache_dir=tiny_kontext_path.parent)
    pipe.set_progress_bar_config(disable=True)
    config = RestoreTrainConfig(
        tasks=[TaskPairs(root / "pairs", DERAIN)],
        out=library / "derain.safetensors",
        rank=8,
        alpha=8,
        steps=10,
        learning_rate=2e-3,
        resolution=32,
        max_sequence_length=32,
        progress=False,
    )
    train_restore(pipe, config)
    gen = torch.Generator().manual_seed(7)
    style: dict[str, torch.Tensor] = {}
    for key in (
        "transformer_blocks.0.attn.to_q",
        "transformer_blocks.1.ff.net.2",
        "single_transformer_blocks.0.proj_mlp",
    ):
        weight = pipe.transformer.get_submodule(key).weight
        style[f"transformer.{key}.lora_A.weight"] = torch.randn(4, weight.shape[1], generator=gen) * 0.5
        style[f"transformer.{key}.lora_B.weight"] = torch.randn(weight.shape[0], 4, generator=gen) * 0.5
    save_file(style, str(library / "style.safetensors"))
    return {"library": library, "image": root / "pairs" / "degraded" / "img00.png"}


def _pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image, dtype=np.float64)


def test_editing_pipeline_per_family(tiny_sd, tiny_sdxl, tiny_flux, tiny_kontext) -> None:
    img2img = editing_pipeline(tiny_sd)
    assert isinstance(img2img, StableDiffusionImg2ImgPipeline)
    assert img2img.unet is tiny_sd.unet
    assert isinstance(editing_pipeline(tiny_sdxl), StableDiffusionXLImg2ImgPipeline)
    kontext = editing_pipeline(tiny_flux)
    assert isinstance(kontext, FluxKontextPipeline)
    assert kontext.transformer is tiny_flux.transformer
    assert editing_pipeline(tiny_kontext) is tiny_kontext
    assert is_instruct_pix2pix(SimpleNamespace(unet=SimpleNamespace(config=SimpleNamespace(in_channels=8))))
    assert not is_instruct_pix2pix(tiny_sd)
    assert working_size(100, 50, max_area=64 * 64, multiple=16) == (80, 32)
    assert working_size(40, 40, max_area=64 * 64, multiple=16) == (32, 32)


def test_task_prompts_join_and_must_exist() -> None:
    rain = Adapter("derain", "flux", {}, task_prompt=DERAIN)
    noise = Adapter("denoise", "flux", {}, task_prompt="remove the noise from the image")
    assert task_prompt([rain, noise]) == f"{DERAIN} and remove the noise from the image"
    assert task_prompt([rain, rain]) == DERAIN
    assert task_prompt([Adapter("x", "flux", {})], "sharpen") == "sharpen"
    with pytest.raises(CompositionError, match="without a task prompt"):
        task_prompt([rain, Adapter("style", "flux", {})])


def test_restoring_with_the_adapter_differs_from_without(restoration) -> None:
    restorer = Restorer(model="tiny-flux-kontext", library=restoration["library"])
    with_it = restorer.restore(restoration["image"], ["derain"])
    without = restorer.restore(restoration["image"], ["derain:0"])
    assert with_it.prompt == DERAIN
    assert with_it.pipeline == "FluxKontextPipeline"
    with Image.open(restoration["image"]) as source:
        assert with_it.images[0].size == source.size
    difference = np.abs(_pixels(with_it.images[0]) - _pixels(without.images[0])).mean()
    assert difference > 0.5, difference
    again = restorer.restore(restoration["image"], ["derain"])
    assert np.array_equal(_pixels(again.images[0]), _pixels(with_it.images[0]))


@pytest.mark.parametrize("method", ["merge", "composite"])
def test_derain_and_style_compose_into_an_image(
    restoration, method: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / f"{method}.png"
    argv = ["restore", str(restoration["image"]), "--adapter", "derain", "--loras", "style:0.6"]
    argv += ["--library", str(restoration["library"]), "--method", method, "--out", str(out), "--json"]
    assert main(argv) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["method"] == method
    assert report["prompt"] == DERAIN
    assert [a["name"] for a in report["adapters"]] == ["derain", "style"]
    assert report["images"] == [str(out)]
    with Image.open(out) as composed:
        assert composed.size == (32, 32)
        assert "Composition: " + method in composed.text["parameters"]
        composed_pixels = _pixels(composed.convert("RGB"))
    alone = Restorer(model="tiny-flux-kontext", library=restoration["library"]).restore(
        restoration["image"], ["derain"], method=method
    )
    assert np.abs(composed_pixels - _pixels(alone.images[0])).mean() > 0.5  # the style adapter took part


def test_sd_family_restores_through_img2img(tmp_path: Path) -> None:
    restorer = Restorer(model="tiny-sd")
    unet = restorer.pipe.unet
    key = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    weight = unet.get_submodule(key).weight
    gen = torch.Generator().manual_seed(0)
    update = LowRank(torch.randn(2, weight.shape[1], generator=gen), torch.randn(weight.shape[0], 2, generator=gen))
    restorer.pipe.add_adapter(Adapter("dehaze", "sd1", {key: update}, task_prompt="remove the haze from the image"))
    image = Image.new("RGB", (48, 40), (120, 130, 140))
    result = restorer.restore(image, ["dehaze"], out=tmp_path)
    assert result.pipeline == "StableDiffusionImg2ImgPipeline"
    assert result.prompt == "remove the haze from the image"
    assert result.images[0].size == (48, 40)
    assert result.paths == [tmp_path / "image-restored.png"]
    assert result.paths[0].is_file()
    with pytest.raises(CompositionError, match="at least one"):
        restorer.restore(image, [])
    before = weight.detach().clone()
    with pytest.raises(CompositionError, match="runs no denoising step"):
        restorer.restore(image, ["dehaze"], steps=1)
    assert torch.equal(weight, before)
    assert restorer.pipe.composition is None


@pytest.mark.slow
def test_restore_and_style_example_runs(tmp_path: Path, monkeypatch, capsys: pytest.CaptureFixture[str]) -> None:
    script = Path(__file__).resolve().parents[2] / "examples" / "restore_and_style.py"
    monkeypatch.setattr("sys.argv", [str(script), "--out", str(tmp_path), "--steps", "3"])
    runpy.run_path(str(script), run_name="__main__")
    out = capsys.readouterr().out
    assert "task prompt from metadata: 'remove the rain from the image'" in out
    for label in ("derain", "derain+style-merge", "derain+style-composite"):
        assert f"{label}: PSNR" in out
        with Image.open(tmp_path / f"{label}.png") as image:
            assert image.size == (64, 64)
