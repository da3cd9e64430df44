"""Restoration (Edit2Restore) training on tiny Kontext: the loss falls, the file is a standard diffusers LoRA that
round-trips its task prompt, the pipeline is left untouched, and bad requests raise typed errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from composer.cli import main
from composer.restoration.degrade import make_pairs, to_pil
from composer.training.data import DatasetError
from composer.training.restore import (
    EDIT2RESTORE_TARGETS,
    KontextRestoreObjective,
    RestoreTrainConfig,
    TaskPairs,
    find_pairs,
    train_restore,
)
from fusion.errors import TrainingError
from weights_index.reader import read_adapter
from weights_index.safetensors_file import read_header

DERAIN = "remove the rain from the image"
DENOISE = "remove the noise from the image"


def write_clean_images(folder: Path, count: int, size: int = 32) -> Path:
    """``count`` smooth random RGB images (bilinear blow-ups of 4×4 noise)."""
    folder.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(0)
    for i in range(count):
        coarse = torch.rand((1, 3, 4, 4), generator=gen)
        to_pil(torch.nn.functional.interpolate(coarse, size=(size, size), mode="bilinear")[0]).save(
            folder / f"img{i:02d}.png"
        )
    return folder


@pytest.fixture(scope="module")
def pairs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """16 rain pairs and 4 noise pairs, synthesised from the same clean images."""
    root = tmp_path_factory.mktemp("restore-pairs")
    clean = write_clean_images(root / "src", 16)
    make_pairs(clean, root / "rain", "rain")
    small = write_clean_images(root / "src-small", 4)
    make_pairs(small, root / "noise", "noise")
    return {"rain": root / "rain", "noise": root / "noise"}


@pytest.mark.slow
def test_fifty_steps_on_sixteen_pairs_lower_the_loss_and_round_trip(tiny_kontext, pairs, tmp_path: Path) -> None:
    base = {k: v.clone() for k, v in tiny_kontext.transformer.state_dict().items()}
    config = RestoreTrainConfig(
        tasks=[TaskPairs(pairs["rain"], DERAIN)],
        out=tmp_path / "derain.safetensors",
        rank=64,
        alpha=4,
        steps=50,
        learning_rate=1e-3,
        resolution=32,
        progress=False,
    )
    result = train_restore(tiny_kontext, config)
    assert result.pairs == 16
    assert len(result.losses) == 50
    assert result.final_loss < result.initial_loss - 0.02, (result.initial_loss, result.final_loss)
    # the pipeline is exactly as before: same modules, same weights, no PEFT state
    state = tiny_kontext.transformer.state_dict()
    assert set(state) == set(base)
    assert all(torch.equal(state[k], base[k]) for k in base)
    assert "peft_config" not in tiny_kontext.transformer.__dict__
    # the file: diffusers keys, scaling config, and our metadata, read back by read_adapter
    header = read_header(result.path)
    assert all(key.startswith("transformer.") and ".lora_" in key for key in header.tensors)
    assert header.metadata["task_prompt"] == DERAIN
    assert header.metadata["needs_input_image"] == "true"
    adapter = read_adapter(result.path)
    assert (adapter.family, adapter.task_prompt, adapter.needs_input_image) == ("flux", DERAIN, True)
    assert all(key.endswith(EDIT2RESTORE_TARGETS) for key in adapter.layers)
    assert {update.scale for update in adapter.layers.values()} == {4 / 64}
    assert any(float(update.up.abs().max()) > 0 for update in adapter.layers.values())
    # a standard diffusers LoRA file: diffusers' own loader takes it, and its ΔW matches ours
    with torch.no_grad():
        tiny_kontext.load_lora_weights(str(result.path), adapter_name="derain")
        tiny_kontext.fuse_lora(lora_scale=1.0)
    key = "transformer_blocks.0.attn.to_q"
    fused = tiny_kontext.transformer.get_submodule(key).base_layer.weight
    assert torch.allclose(fused - base[f"{key}.weight"], adapter.layers[key].delta(), atol=1e-6)


def test_multi_task_cli_stores_every_prompt(pairs, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "multi.safetensors"
    argv = ["train-restore", "--pairs", str(pairs["noise"]), "--task", DENOISE, "--pairs", str(pairs["rain"])]
    argv += ["--task", DERAIN, "--rank", "4", "--alpha", "4", "--steps", "3", "--resolution", "32"]
    argv += ["--max-sequence-length", "32", "--out", str(out), "--json"]
    assert main(argv) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["pairs"] == 20
    assert report["tasks"] == [DENOISE, DERAIN]
    adapter = read_adapter(out)
    assert adapter.task_prompt == DENOISE
    assert json.loads(adapter.meta["safetensors_metadata"]["task_prompts"]) == [DENOISE, DERAIN]
    mismatched = ["train-restore", "--pairs", str(pairs["rain"]), "--task", "a", "--task", "b", "--out", str(out)]
    assert main(mismatched) == 1
    assert "2 --task prompts" in capsys.readouterr().err


def test_bad_requests_raise_typed_errors(tiny_sd, tiny_kontext, pairs, tmp_path: Path) -> None:
    with pytest.raises(TrainingError, match="Kontext"):
        KontextRestoreObjective(tiny_sd, [TaskPairs(pairs["rain"], DERAIN)], size=32, device="cpu")
    with pytest.raises(TrainingError, match="multiple of 16"):
        KontextRestoreObjective(tiny_kontext, [TaskPairs(pairs["rain"], DERAIN)], size=40, device="cpu")
    broken = tmp_path / "broken"
    write_clean_images(broken / "clean", 2)
    write_clean_images(broken / "degraded", 1)
    with pytest.raises(DatasetError, match="without a partner"):
        find_pairs(broken)
    config = RestoreTrainConfig(tasks=[TaskPairs(pairs["rain"], DERAIN)], out=tmp_path / "x.safetensors", steps=0)
    with pytest.raises(TrainingError, match="positive"):
        train_restore(tiny_kontext, config)
