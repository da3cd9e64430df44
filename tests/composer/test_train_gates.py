"""Gate training: 20 steps on tiny-sd lower the loss; checkpoints load by name through the mixin; heatmaps; CLI."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image
from producers import lycoris_network, remove, save
from safetensors.torch import save_file

from composer.cli import main
from composer.mixin import make_composable
from composer.training.gates import (
    GATES_ENV,
    GateTrainConfig,
    gate_path,
    load_gates,
    train_gates,
    write_gate_heatmap,
)
from fusion.errors import AdapterFormatError
from fusion.gates import GateBank

ATTENTION = ("to_q", "to_k", "to_v", "to_out.0")


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    """Three blocky random 64² images of 'the composed concepts'."""
    folder = tmp_path / "images"
    folder.mkdir()
    g = torch.Generator().manual_seed(0)
    for i in range(3):
        blocks = (torch.rand(4, 4, 3, generator=g) * 255).to(torch.uint8)
        Image.fromarray(blocks.repeat_interleave(16, 0).repeat_interleave(16, 1).numpy()).save(folder / f"{i}.png")
    return folder


def _lora_files(pipe: Any, folder: Path) -> list[Path]:
    """Two PEFT-format LoRA files of ranks 2 and 4 on every attention projection of the UNet."""
    g = torch.Generator().manual_seed(1)
    files = []
    for index, rank in enumerate((2, 4)):
        state = {}
        for name, module in pipe.unet.named_modules():
            if isinstance(module, torch.nn.Linear) and name.endswith(ATTENTION):
                state[f"unet.{name}.lora_A.weight"] = torch.randn(rank, module.in_features, generator=g) * 0.3
                state[f"unet.{name}.lora_B.weight"] = torch.randn(module.out_features, rank, generator=g) * 0.3
        path = folder / f"concept{index}.safetensors"
        save_file(state, str(path))
        files.append(path)
    return files


@pytest.mark.slow
def test_twenty_steps_lower_the_loss_and_the_gates_load_by_name(
    tiny_sd: Any, data_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(GATES_ENV, str(tmp_path / "gates"))
    files = _lora_files(tiny_sd, tmp_path)
    before = {k: v.clone() for k, v in tiny_sd.unet.state_dict().items()}
    config = GateTrainConfig(
        adapters=files, data=data_dir, out="mix", prompt="a photo", steps=20, learning_rate=1e-2, checkpoint_every=10
    )
    result = train_gates(tiny_sd, config)
    assert result.final_loss < result.initial_loss
    assert result.path == tmp_path / "gates" / "mix.safetensors"
    assert [p.name for p in result.checkpoints] == ["mix-step000010.safetensors"]
    state = tiny_sd.unet.state_dict()
    assert all(torch.equal(state[k], v) for k, v in before.items()), "training leaves the pipeline untouched"

    pipe = make_composable(tiny_sd)
    names = [pipe.add_adapter_file(path) for path in files]
    pipe.set_composition(dict.fromkeys(names, 1.0), method="gated", gates="mix", record=True)
    strategy = pipe.composition_strategy
    assert isinstance(strategy.gates, GateBank)
    loaded = dict(strategy.gates.named_parameters())
    for name, value in result.gates.named_parameters():
        assert torch.equal(loaded[name].cpu(), value.detach().cpu()), name
    pipe("a photo", num_inference_steps=3, height=32, width=32, output_type="latent")
    png = write_gate_heatmap(strategy.recorder, tmp_path / "heatmap.png")
    with Image.open(png) as image:
        assert image.size[0] > 200
        assert image.size[1] > 100
    assert not torch.isnan(strategy.recorder.result()).all()
    pipe.clear_composition()


def test_cli_trains_and_reports_json(tiny_sd: Any, data_dir: Path, tmp_path: Path, capsys: Any) -> None:
    files = _lora_files(tiny_sd, tmp_path)
    out = tmp_path / "gates.safetensors"
    argv = ["train-gates", "--model", "tiny-sd", "--adapters", ",".join(map(str, files)), "--data", str(data_dir)]
    code = main([*argv, "--weights", "0.8,0.6", "--steps", "3", "--out", str(out), "--json"])
    assert code == 0
    report = json.loads(capsys.readouterr().out)
    assert report["out"] == str(out)
    assert report["layers"] > 0
    assert len(load_gates(out).keys) == report["layers"]


def test_load_refuses_files_that_are_not_gates(tmp_path: Path) -> None:
    path = tmp_path / "lora.safetensors"
    save_file({"a": torch.zeros(2)}, str(path))
    with pytest.raises(AdapterFormatError, match="not a gate checkpoint"):
        load_gates(path)
    assert gate_path("name").name == "name.safetensors"
    assert gate_path("dir/file.safetensors") == Path("dir/file.safetensors")


def test_flow_matching_training_on_flux(tiny_flux: Any, data_dir: Path, tmp_path: Path) -> None:
    """FLUX.1: gates train on the flow-matching loss (σ passed as the timestep) and the model is left as it was."""
    g = torch.Generator().manual_seed(2)
    files = []
    for index, rank in enumerate((2, 4)):
        state = {}
        for name, module in tiny_flux.transformer.named_modules():
            if isinstance(module, torch.nn.Linear) and name.endswith(("to_q", "to_v", "proj_mlp")):
                state[f"transformer.{name}.lora_A.weight"] = torch.randn(rank, module.in_features, generator=g) * 0.3
                state[f"transformer.{name}.lora_B.weight"] = torch.randn(module.out_features, rank, generator=g) * 0.3
        files.append(tmp_path / f"flux{index}.safetensors")
        save_file(state, str(files[-1]))
    before = {k: v.clone() for k, v in tiny_flux.transformer.state_dict().items()}
    config = GateTrainConfig(
        adapters=files,
        data=data_dir,
        out=tmp_path / "flux-gates.safetensors",
        steps=30,
        learning_rate=1e-2,
        resolution=32,
    )
    result = train_gates(tiny_flux, config)
    assert result.final_loss < result.initial_loss
    assert any(key.startswith("single_transformer_blocks") for key in result.gates.keys)
    state = tiny_flux.transformer.state_dict()
    assert all(torch.equal(state[k], v) for k, v in before.items())


def test_lycoris_conv_adapters_train_with_the_model_shapes(tiny_sd: Any, data_dir: Path, tmp_path: Path) -> None:
    """LyCORIS stores conv LoHa factors flattened: gate training reads them with the model's shapes, as the mixin
    does, instead of refusing them as "made for a different base model"."""
    network = lycoris_network(tiny_sd, "loha", tmp_path, text=False)
    path = save(network, tmp_path / "loha.safetensors")
    remove(network)
    folder = tmp_path / "library"
    folder.mkdir()
    (folder / "loha.safetensors").write_bytes(path.read_bytes())
    out = tmp_path / "gates.safetensors"
    argv = ["train-gates", "--model", "tiny-sd", "--adapters", str(folder), "--weights", "0.8"]
    assert main([*argv, "--data", str(data_dir), "--steps", "2", "--out", str(out), "--json"]) == 0
    assert load_gates(out).keys
