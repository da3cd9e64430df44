"""`compose index DIR` and `compose info NAME --library DIR`: human tables, --json documents, clear errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from composer.cli import main

CROSS_K = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k"


def _write_lora(path: Path, rank: int, metadata: dict[str, str] | None = None) -> None:
    tensors = {
        f"{CROSS_K}.lora_down.weight": torch.randn(rank, 768),
        f"{CROSS_K}.lora_up.weight": torch.randn(320, rank),
        f"{CROSS_K}.alpha": torch.tensor(float(rank)),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata=metadata)


@pytest.fixture
def library(tmp_path: Path) -> Path:
    root = tmp_path / "loras"
    _write_lora(
        root / "corgi.safetensors",
        4,
        {"ss_output_name": "corgi_astronaut", "ss_tag_frequency": json.dumps({"5_c": {"corgi": 9, "helmet": 2}})},
    )
    (root / "corgi.json").write_text(json.dumps({"activation text": "crgstr, red helmet", "preferred weight": 0.8}))
    _write_lora(root / "styles" / "ink.safetensors", 8, {"modelspec.trigger_phrase": "inkwash"})
    (root / "broken.safetensors").write_bytes(b"\x05\x00\x00\x00\x00\x00\x00\x00{bad}")
    return root


def test_index_prints_the_catalog_table(library: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["index", str(library)]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0].split() == ["name", "family", "format", "rank", "triggers", "error"]
    corgi = next(line for line in lines if line.startswith("corgi "))
    assert "sd1" in corgi
    assert "kohya" in corgi
    assert " 4 " in corgi
    assert "crgstr, red helmet" in corgi
    broken = next(line for line in lines if line.startswith("broken "))
    assert "AdapterFormatError" in broken
    assert "not valid JSON" in broken
    assert "3 adapters (1 broken)" in out
    assert "3 added" in out
    assert main(["index", str(library)]) == 0
    assert "0 added, 0 updated, 3 unchanged" in capsys.readouterr().out


def test_index_json_is_one_document(library: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["index", str(library), "--json"]) == 0
    document = json.loads(capsys.readouterr().out)
    assert sorted(document["scan"]["added"]) == ["broken.safetensors", "corgi.safetensors", "styles/ink.safetensors"]
    by_name = {entry["name"]: entry for entry in document["entries"]}
    assert by_name["ink"]["rank"] == 8
    assert by_name["ink"]["trigger_words"] == ["inkwash"]
    assert by_name["broken"]["error_type"] == "AdapterFormatError"
    assert by_name["corgi"]["sha256"] is not None


def test_info_shows_everything_known(library: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["info", "corgi", "--library", str(library)]) == 0
    out = capsys.readouterr().out
    fields = dict(line.split(":", 1) for line in out.splitlines())
    fields = {k.strip(): v.strip() for k, v in fields.items()}
    assert fields["name"] == "corgi"
    assert fields["title"] == "corgi_astronaut"
    assert fields["family"] == "sd1"
    assert fields["rank"] == "4"
    assert fields["triggers"] == "crgstr, red helmet"
    assert fields["preferred weight"] == "0.8"
    assert fields["tags"] == "corgi (9), helmet (2)"
    assert len(fields["sha256"]) == 64
    assert fields["AutoV2"] == fields["sha256"][:10].upper()


def test_info_json_and_lookup_by_title(library: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["info", "corgi_astronaut", "--library", str(library), "--json"]) == 0
    document = json.loads(capsys.readouterr().out)
    assert document["name"] == "corgi"
    assert document["metadata"]["preferred_weight"] == 0.8
    assert document["metadata"]["tags"] == {"corgi": 9, "helmet": 2}


def test_unknown_adapter_and_missing_folder_exit_1_with_a_message(
    library: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["info", "corgo", "--library", str(library)]) == 1
    err = capsys.readouterr().err
    assert "no adapter named 'corgo'" in err
    assert "did you mean corgi" in err
    assert main(["index", str(tmp_path / "missing")]) == 1
    assert "does not exist" in capsys.readouterr().err
