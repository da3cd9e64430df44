"""Version groups: same file, same declared tensor hash, same title (per family); the newest is preferred."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

from weights_index.catalog import Library
from weights_index.versions import version_groups

KEY = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k"


def _write(path: Path, seed: int, header: dict[str, str]) -> None:
    values = np.random.default_rng(seed).standard_normal((2, 1, 4)).astype(np.float32)
    tensors = {f"{KEY}.lora_A.weight": values[0], f"{KEY}.lora_B.weight": values[1].T.copy()}
    save_file(tensors, str(path), metadata={"ss_base_model_version": "sd_v1", **header})


def test_versions_copies_and_resaved_files_group_with_the_newest_preferred(tmp_path: Path) -> None:
    _write(tmp_path / "witch_v1.safetensors", 1, {})
    _write(tmp_path / "Witch-v1.5.safetensors", 2, {"sshs_model_hash": "abc"})
    shutil.copy(tmp_path / "Witch-v1.5.safetensors", tmp_path / "Witch-v1.5 (1).safetensors")
    _write(tmp_path / "renamed.safetensors", 2, {"sshs_model_hash": "ABC", "ss_output_name": "something else"})
    _write(tmp_path / "knight.safetensors", 3, {})
    library = Library(tmp_path)
    library.scan()
    groups = {g.preferred.name: g for g in version_groups(library.entries())}
    assert sorted(groups) == ["Witch-v1.5", "knight"]
    others = dict((e.name, why) for e, why in groups["Witch-v1.5"].others)
    assert others == {
        "Witch-v1.5 (1)": "identical file (same SHA-256)",
        "renamed": "same weights (same declared tensor hash)",
        "witch_v1": "older version (v1 < v1.5)",
    }
    assert groups["knight"].others == ()
