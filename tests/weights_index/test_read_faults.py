"""Malformed adapter files raise typed errors from ``read_adapter`` / ``add_adapter_file``, never bare exceptions, and a
pipeline that refused a file is unchanged; ``adapter_config.json`` scales only the PEFT checkpoint in its folder."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from composer import make_composable
from fusion.errors import ComposerError
from weights_index.reader import read_adapter

PEFT_KEY = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
KOHYA_KEY = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
WIDTH = 32


def peft_tensors(rank: int = 2) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return {
        f"{PEFT_KEY}.lora_A.weight": torch.randn(rank, WIDTH, generator=gen),
        f"{PEFT_KEY}.lora_B.weight": torch.randn(WIDTH, rank, generator=gen),
    }


def kohya_tensors(alpha: torch.Tensor) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return {
        f"{KOHYA_KEY}.lora_down.weight": torch.randn(2, WIDTH, generator=gen),
        f"{KOHYA_KEY}.lora_up.weight": torch.randn(WIDTH, 2, generator=gen),
        f"{KOHYA_KEY}.alpha": alpha,
    }


def loha_tensors(rank: int) -> dict[str, torch.Tensor]:
    stem = KOHYA_KEY
    return {
        f"{stem}.hada_w1_a": torch.randn(WIDTH, rank),
        f"{stem}.hada_w1_b": torch.randn(rank, WIDTH),
        f"{stem}.hada_w2_a": torch.randn(WIDTH, rank),
        f"{stem}.hada_w2_b": torch.randn(rank, WIDTH),
        f"{stem}.alpha": torch.tensor(1.0),
    }


FILES = {
    "zero-element alpha": (kohya_tensors(torch.zeros(0)), None),
    "rank-0 module": (peft_tensors(rank=0), None),
    "empty LyCORIS factor": (loha_tensors(rank=0), None),
    "metadata as a list": (peft_tensors(), {"lora_adapter_metadata": json.dumps([1, 2])}),
    "metadata with r = 0": (peft_tensors(), {"lora_adapter_metadata": json.dumps({"r": 0, "lora_alpha": 4})}),
    "metadata alpha a string": (peft_tensors(), {"lora_adapter_metadata": json.dumps({"r": 2, "lora_alpha": "x"})}),
}


@pytest.mark.parametrize("case", sorted(FILES))
def test_malformed_files_raise_typed_errors(tmp_path: Path, case: str) -> None:
    tensors, metadata = FILES[case]
    path = tmp_path / "bad.safetensors"
    save_file(tensors, str(path), metadata=metadata)
    with pytest.raises(ComposerError):
        read_adapter(path)


CONFIGS = {
    "null": b"null",
    "an int": b"7",
    "r = 0": b'{"r": 0, "lora_alpha": 8}',
    "r negative": b'{"r": -2, "lora_alpha": 8}',
    "alpha infinite": b'{"r": 2, "lora_alpha": 1e999}',
    "pattern not a mapping": b'{"r": 2, "lora_alpha": 8, "rank_pattern": [1]}',
    "non-UTF-8": b'{"r": 2, "lora_alpha": "\xff"}',
    "deeply nested": b'{"r": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
}


@pytest.mark.parametrize("case", sorted(CONFIGS))
def test_malformed_adapter_config_json_raises_a_typed_error(tmp_path: Path, case: str) -> None:
    folder = tmp_path / "peft"
    folder.mkdir()
    save_file(peft_tensors(), str(folder / "adapter_model.safetensors"))
    (folder / "adapter_config.json").write_bytes(CONFIGS[case])
    with pytest.raises(ComposerError, match=r"adapter_config\.json"):
        read_adapter(folder)


def test_adapter_config_json_scales_only_the_peft_checkpoint_beside_it(tmp_path: Path) -> None:
    folder = tmp_path / "mixed"
    folder.mkdir()
    save_file(peft_tensors(), str(folder / "adapter_model.safetensors"))
    save_file(peft_tensors(), str(folder / "loose.safetensors"))
    (folder / "adapter_config.json").write_text(json.dumps({"r": 2, "lora_alpha": 64}))
    (scaled,) = read_adapter(folder).layers.values()
    (loose,) = read_adapter(folder / "loose.safetensors").layers.values()
    assert scaled.scale == 32.0
    assert loose.scale == 1.0


def test_a_refused_file_leaves_the_pipeline_unchanged(tiny_sd: object, tmp_path: Path) -> None:
    pipe = make_composable(tiny_sd)
    before = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    for case, (tensors, metadata) in FILES.items():
        path = tmp_path / f"{case.replace(' ', '_')}.safetensors"
        save_file(tensors, str(path), metadata=metadata)
        with pytest.raises(ComposerError):
            pipe.add_adapter_file(path)
    assert pipe.adapters == {}
    after = pipe.unet.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
