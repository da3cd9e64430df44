"""`compose export` and `compose convert --to lora`: one ordinary LoRA file reproducing a static composition.

The composed adapters are files written by LyCORIS itself (a LoHa with conv layers and an IA3); the exported file
is loaded by diffusers' own ``load_lora_weights`` + ``fuse_lora`` and by our reader, and both must reproduce our
merged composition's latents (≤1e-5 relative) at full rank.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from producers import lycoris_network, pipeline_latents, relative_error, remove, save
from safetensors import safe_open

from composer.cli import main
from composer.facade import Composer
from composer.mixin import make_composable

TOL = 1e-5


@pytest.fixture
def two_files(tiny_sd, tmp_path: Path) -> tuple[Path, Path]:
    """A LyCORIS LoHa (attention, resnet convs, CLIP) and a LyCORIS IA3, both written by LyCORIS."""
    loha = lycoris_network(tiny_sd, "loha", tmp_path, seed=3)
    first = save(loha, tmp_path / "loha.safetensors")
    remove(loha)
    ia3 = lycoris_network(tiny_sd, "ia3", tmp_path, preset="ia3", seed=4)
    second = save(ia3, tmp_path / "ia3.safetensors")
    remove(ia3)
    return first, second


@pytest.mark.parametrize("fmt", ["kohya", "diffusers"])
def test_export_round_trips_through_diffusers(two_files, fresh_pipeline: Callable, tmp_path: Path, fmt: str, capsys):
    first, second = two_files
    prompt = f"a red fox <lora:{first}:0.8> <lora:{second}:0.6>"
    out = tmp_path / f"export-{fmt}.safetensors"
    assert main(["export", prompt, "--out", str(out), "--format", fmt, "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["retained"] == pytest.approx(1.0, abs=1e-9)
    with safe_open(str(out), "pt") as handle:
        keys = list(handle.keys())
    suffixes = (".lora_down.weight", ".lora_up.weight") if fmt == "kohya" else (".lora_A.weight", ".lora_B.weight")
    assert all(k.endswith(suffixes) for k in keys)

    ours = make_composable(fresh_pipeline("tiny-sd"))
    ours.add_adapter_file(first, name="a")
    ours.add_adapter_file(second, name="b")
    ours.set_composition({"a": 0.8, "b": 0.6})
    want = pipeline_latents(ours)
    base = pipeline_latents(fresh_pipeline("tiny-sd"))
    assert relative_error(base, want) > 1e-3

    peer = fresh_pipeline("tiny-sd")
    with torch.no_grad():
        peer.load_lora_weights(str(out), adapter_name="export")
        peer.fuse_lora()
    assert relative_error(pipeline_latents(peer), want) <= TOL

    reread = make_composable(fresh_pipeline("tiny-sd"))
    reread.add_adapter_file(out, name="x")
    reread.set_composition({"x": 1.0})
    assert relative_error(pipeline_latents(reread), want) <= TOL


def test_export_at_lower_rank_reports_energy_and_error(two_files, fresh_pipeline: Callable, tmp_path: Path) -> None:
    from composer.export import export_composition

    first, _ = two_files
    composer = Composer(model="tiny-sd")
    full = export_composition(composer, f"<lora:{first}:1.0>", tmp_path / "full.safetensors")
    low = export_composition(composer, f"<lora:{first}:1.0>", tmp_path / "r2.safetensors", rank=2)
    assert all(row["rank"] <= 2 for row in low.rows())
    assert 0.0 < low.retained < full.retained == pytest.approx(1.0)
    assert low.file_size < full.file_size
    want = _composed(fresh_pipeline, tmp_path / "full.safetensors")
    got = _composed(fresh_pipeline, tmp_path / "r2.safetensors")
    assert relative_error(got, want) > TOL


def _composed(fresh_pipeline: Callable, path: Path) -> torch.Tensor:
    pipe = make_composable(fresh_pipeline("tiny-sd"))
    pipe.add_adapter_file(path, name="x")
    pipe.set_composition({"x": 1.0})
    return pipeline_latents(pipe)


def test_export_refuses_scheduled_weights(two_files, tmp_path: Path) -> None:
    first, _ = two_files
    assert main(["export", f"<lora:{first}:0@0,1@0.5>", "--out", str(tmp_path / "x.safetensors")]) == 1


@pytest.mark.slow
def test_convert_to_lora_squeezes_a_lycoris_file(two_files, fresh_pipeline: Callable, tmp_path: Path, capsys) -> None:
    first, _ = two_files
    out = tmp_path / "squeezed.safetensors"
    assert main(["convert", str(first), "--to", "lora", "--out", str(out)]) == 1
    assert "--model" in capsys.readouterr().err
    args = ["convert", str(first), "--to", "lora", "--model", "tiny-sd", "--energy", "0.9", "--out", str(out)]
    assert main([*args, "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert all(row["retained"] >= 0.9 - 1e-9 for row in report["layers"])
    assert report["retained"] < 1.0
    exact = tmp_path / "exact.safetensors"
    assert main(["convert", str(first), "--to", "lora", "--model", "tiny-sd", "--out", str(exact)]) == 0
    want = _composed(fresh_pipeline, first)
    assert relative_error(_composed(fresh_pipeline, exact), want) <= TOL


def test_export_refuses_bias_updates(tiny_sd, tmp_path: Path, capsys) -> None:
    network = lycoris_network(tiny_sd, "full", tmp_path, preset="attn", text=False)
    path = save(network, tmp_path / "full.safetensors")
    remove(network)
    assert main(["export", f"<lora:{path}:1.0>", "--out", str(tmp_path / "x.safetensors")]) == 1
    assert "bias" in capsys.readouterr().err
    assert not (tmp_path / "x.safetensors").exists()
