"""SHiRA training: every mask lowers the loss and trains only its entries; PEFT checkpoints match our engine."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from peft import get_peft_model_state_dict, inject_adapter_in_model
from peft.tuners.shira.layer import ShiraLayer
from peft.tuners.shira.mask_functions import random_mask as peft_random_mask
from PIL import Image
from safetensors.torch import save_file

from composer.cli import main
from composer.presets import load_preset
from composer.training.data import DatasetError, ImageCaptionFolder, collate
from composer.training.shira import (
    DenoisingObjective,
    ShiraTrainConfig,
    TrainingError,
    attention_targets,
    calibrate_gradients,
    make_mask_fn,
    shira_config,
    train_shira,
)
from fusion.engine import FusionEngine
from fusion.mask_types import MASK_TYPES
from fusion.sparse import BaseMismatchError, check_base_fingerprint, shira_budget
from weights_index.reader import read_adapter


@pytest.fixture
def image_dir(tmp_path: Path) -> Path:
    """Three small random-blocky RGB images, one with its own caption file."""
    folder = tmp_path / "images"
    folder.mkdir()
    gen = torch.Generator().manual_seed(0)
    for i in range(3):
        blocks = (torch.rand(8, 8, 3, generator=gen) * 255).to(torch.uint8)
        pixels = blocks.repeat_interleave(6, 0).repeat_interleave(4, 1)
        Image.fromarray(pixels.numpy()).save(folder / f"img{i}.png")
    (folder / "img1.txt").write_text("a sks toy on a table\n")
    (folder / "notes.md").write_text("not an image")
    return folder


def test_image_caption_folder_crops_and_captions(image_dir: Path, tmp_path: Path) -> None:
    data = ImageCaptionFolder(image_dir, prompt="a sks toy", size=16)
    assert len(data) == 3
    assert data.captions == ["a sks toy", "a sks toy on a table", "a sks toy"]
    batch = collate([data[0], data[1]])
    assert batch["pixels"].shape == (2, 3, 16, 16)
    assert float(batch["pixels"].abs().max()) <= 1.0
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DatasetError, match="no images"):
        ImageCaptionFolder(empty)


def _base_weights(pipe) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in pipe.unet.state_dict().items()}


@pytest.mark.slow
def test_ten_steps_with_each_mask_lower_the_loss_and_touch_only_masked_entries(
    tiny_sd, image_dir: Path, tmp_path: Path
) -> None:
    base = _base_weights(tiny_sd)
    targets = attention_targets(tiny_sd.unet)
    modules = {name: tiny_sd.unet.get_submodule(name) for name in targets}
    objective = DenoisingObjective(tiny_sd, ImageCaptionFolder(image_dir, prompt="a sks toy", size=64), device="cpu")
    gradients = calibrate_gradients(objective, tiny_sd.unet, modules, batches=2)
    r = 4
    for mask in MASK_TYPES:
        config = ShiraTrainConfig(
            images=image_dir,
            prompt="a sks toy",
            out=tmp_path / f"{mask}.safetensors",
            mask=mask,
            r=r,
            steps=10,
            learning_rate=1e-3,
            calibration_batches=2,
            progress=False,
        )
        result = train_shira(tiny_sd, config)
        assert result.final_loss < result.initial_loss, mask
        assert len(result.losses) == 10
        mask_fn = make_mask_fn(mask, modules, gradients=gradients)
        for key, update in result.adapter.layers.items():
            module = modules[key]
            if mask_fn is None:
                expected = peft_random_mask(module, r, random_seed=0)
            else:
                expected = mask_fn(module, r)
            positions = torch.nonzero(expected.reshape(-1)).squeeze(1)
            assert update.nnz == shira_budget(module.weight.shape, r)
            assert torch.equal(update.index, positions), (mask, key)
            assert bool((update.values != 0).any())
        state = tiny_sd.unet.state_dict()
        assert set(state) == set(base)
        assert all(torch.equal(state[k], base[k]) for k in base)
        assert "peft_config" not in tiny_sd.unet.__dict__
        saved = read_adapter(result.path)
        meta = saved.meta["safetensors_metadata"]
        assert (meta["mask_type"], meta["r"], meta["base_family"]) == (mask, "4", "sd1")
        check_base_fingerprint(saved, {k: m.weight for k, m in modules.items()})


def test_cli_trains_checkpoints_and_fingerprint_refuses_other_base(
    tiny_sd, image_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "cli.safetensors"
    argv = ["train-shira", "--model", "tiny-sd", "--images", str(image_dir), "--prompt", "a sks toy"]
    argv += ["--mask", "wm", "--r", "2", "--steps", "4", "--checkpoint-every", "2", "--out", str(out), "--json"]
    assert main(argv) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["out"] == str(out)
    assert report["layers"] == len(attention_targets(tiny_sd.unet))
    assert [Path(p).name for p in report["checkpoints"]] == ["cli-step000002.safetensors"]
    assert Path(report["checkpoints"][0]).is_file()
    adapter = read_adapter(out)
    weights = {key: tiny_sd.unet.get_submodule(key).weight for key in adapter.layers}
    check_base_fingerprint(adapter, weights)
    other = {key: torch.randn_like(w) for key, w in weights.items()}
    with pytest.raises(BaseMismatchError):
        check_base_fingerprint(adapter, other)


def test_bad_requests_raise_typed_errors(tiny_sd, tiny_flux, image_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(TrainingError, match="unknown SHiRA mask"):
        make_mask_fn("nope", {})
    with pytest.raises(TrainingError, match="calibration"):
        make_mask_fn("snip", {})
    config = ShiraTrainConfig(images=image_dir, prompt="x", out=tmp_path / "f.safetensors", steps=1, progress=False)
    with pytest.raises(TrainingError, match="not 'flux'"):
        DenoisingObjective(tiny_flux, ImageCaptionFolder(image_dir, size=16), device="cpu")
    with pytest.raises(DatasetError):
        train_shira(tiny_sd, ShiraTrainConfig(images=tmp_path / "missing", prompt="x", out=config.out))


def _unet_call(pipe) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    hidden = pipe.text_encoder.config.hidden_size
    return {
        "sample": torch.randn(2, 4, 8, 8, generator=gen),
        "timestep": torch.tensor(500),
        "encoder_hidden_states": torch.randn(2, 7, hidden, generator=gen),
    }


@torch.no_grad()
def test_peft_trained_shira_checkpoint_matches_peft_merged_model_in_our_engine(tiny_sd, tmp_path: Path) -> None:
    unet = tiny_sd.unet
    inputs = _unet_call(tiny_sd)
    base_out = unet(**inputs).sample
    targets = attention_targets(unet)
    config = shira_config(targets, 2, "random", None, seed=3)
    config.init_weights = False
    inject_adapter_in_model(config, unet)
    for module in unet.modules():
        if isinstance(module, ShiraLayer):
            module.shira_weight["default"].mul_(0.05)
    path = tmp_path / "peft_shira.safetensors"
    save_file({k: v.contiguous() for k, v in get_peft_model_state_dict(unet).items()}, str(path))
    for module in unet.modules():
        if isinstance(module, ShiraLayer):
            module.merge()
    peft_out = unet(**inputs).sample
    assert (peft_out - base_out).abs().max() > 1e-3

    ours = load_preset("tiny-sd").unet
    engine = FusionEngine(ours, family="sd1")
    adapter = read_adapter(path, shapes=engine.expected_shapes)
    assert adapter.meta["format"] == "peft-shira"
    assert set(adapter.layers) == set(targets)
    engine.add_adapter(adapter)
    engine.fuse([1.0])
    fused = ours(**inputs).sample
    assert (fused - peft_out).abs().max() <= 1e-5
    engine.unfuse()
    engine.set_weights([1.0])
    unfused = ours(**inputs).sample
    assert (unfused - peft_out).abs().max() <= 1e-5
