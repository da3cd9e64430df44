"""SHiRA: our layout round-trips exactly; PEFT ShiraModel checkpoints read to PEFT's own delta."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from format_writers import attention_shapes, text_shapes, write_peft_shira, write_shira
from safetensors.torch import load_file
from test_formats_lora import assert_deltas

from fusion.adapters import Adapter, LowRank, Sparse
from fusion.errors import AdapterFormatError, ShapeMismatchError
from weights_index.formats.shira import save_shira
from weights_index.reader import probe, read_adapter


def test_our_layout_round_trip_and_metadata(tiny_sd, tmp_path: Path) -> None:
    shapes = {**attention_shapes(tiny_sd.unet), **text_shapes(tiny_sd.text_encoder)}
    extra = {"task_prompt": "remove the noise", "needs_input_image": "true", "r": "4"}
    path, expected = write_shira(tmp_path / "s.safetensors", shapes, family="sd1", extra=extra)
    assert_deltas(path, expected)
    adapter = read_adapter(path)
    assert adapter.task_prompt == "remove the noise"
    assert adapter.needs_input_image
    assert adapter.meta["format"] == "shira"
    assert adapter.meta["safetensors_metadata"]["mask_type"] == "random"
    header = probe(path)
    assert (header.format, header.family, header.ranks) == ("shira", "sd1", ())
    keys = load_file(str(path))
    assert any(k.startswith("unet.") and k.endswith(".shira_index") for k in keys)
    assert all(v.dtype == torch.int32 for k, v in keys.items() if k.endswith(".shira_index"))


def test_save_shira_from_adapter_uses_transformer_component_for_flux(tmp_path: Path) -> None:
    update = Sparse(index=torch.tensor([1, 5]), values=torch.tensor([0.5, -1.0]), shape=(4, 3))
    adapter = Adapter("x", "flux", {"transformer_blocks.0.attn.to_q": update}, task_prompt="deblur")
    path = save_shira(adapter, tmp_path / "f.safetensors", {"mask_type": "struct"})
    assert "transformer.transformer_blocks.0.attn.to_q.shira_index" in load_file(str(path))
    again = read_adapter(path)
    assert again.family == "flux"
    assert again.task_prompt == "deblur"
    assert torch.equal(again.layers["transformer_blocks.0.attn.to_q"].delta(), update.delta())


def test_save_shira_refuses_dense_kinds(tmp_path: Path) -> None:
    layers = {"a.to_q": LowRank(torch.zeros(1, 2), torch.zeros(2, 1))}
    with pytest.raises(AdapterFormatError, match="sparse updates only"):
        save_shira(layers, tmp_path / "x.safetensors", {"base_family": "sd1"})
    assert not (tmp_path / "x.safetensors").exists()


def test_peft_shira_layout_needs_and_uses_shapes(tiny_sd, tmp_path: Path) -> None:
    shapes = attention_shapes(tiny_sd.unet, limit=4)
    path, expected = write_peft_shira(tmp_path / "p.safetensors", shapes)
    assert probe(path).format == "peft-shira"
    with pytest.raises(AdapterFormatError, match="shapes"):
        read_adapter(path)
    assert_deltas(path, expected, shapes=shapes)
    with pytest.raises(ShapeMismatchError):
        read_adapter(path, shapes={k: (2, 2) for k in shapes})


def test_peft_shira_model_checkpoint_matches_peft_delta(tmp_path: Path) -> None:
    from peft import ShiraConfig, get_peft_model
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import save_file

    class Tiny(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.to_q = torch.nn.Linear(12, 10)

    model = get_peft_model(Tiny(), ShiraConfig(r=2, target_modules=["to_q"], init_weights=False))
    layer = model.base_model.model.to_q
    state = get_peft_model_state_dict(model)
    assert set(state) == {"base_model.model.to_q.shira_indices", "base_model.model.to_q.shira_weight"}
    save_file(state, str(tmp_path / "s.safetensors"))
    adapter = read_adapter(tmp_path / "s.safetensors", shapes={"to_q": (10, 12)})
    want = layer.get_delta_weight("default").to_dense()
    assert torch.allclose(adapter.layers["to_q"].delta(), want, atol=1e-7)
    assert float(want.abs().sum()) > 0
