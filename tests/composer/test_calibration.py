"""Calibrated default weights: measured from the adapter file and the base model, deterministic, stored in the
catalog with the file's identity, invalidated when the file changes, overridden by an explicit weight."""

from __future__ import annotations

import math
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from composer.calibration import (
    MAX_WEIGHT,
    TOLERANCE,
    CalibrationError,
    Calibrator,
    probe_prompts,
)
from composer.calibration_store import CATALOG_KEY, TARGET, model_identity, stored
from composer.facade import Composer
from composer.mixin import make_composable
from composer.prompts import extract_lora_tags, parse_lora_list
from fusion.adapters import Adapter, LowRank
from tests.format_writers import attention_shapes, write_diffusers
from weights_index import Library


def _scaled_copy(source: Path, target: Path, factor: float) -> Path:
    """``source`` with every LoRA up factor multiplied by ``factor`` (ΔW scaled by it), written to ``target``."""
    tensors = load_file(str(source))
    save_file({k: v * factor if "lora_B" in k else v for k, v in tensors.items()}, str(target))
    return target


def _output_conv_adapter(pipe: Any, scale: float = 1.0) -> Adapter:
    """A LoRA on the denoiser's output conv only: its effect on the prediction is exactly linear in its weight."""
    conv = pipe.unet.conv_out
    gen = torch.Generator().manual_seed(1)
    down = torch.randn(2, conv.in_channels, *conv.kernel_size, generator=gen) * 0.05
    up = torch.randn(conv.out_channels, 2, 1, 1, generator=gen) * 0.05 * scale
    return Adapter("out", "sd1", {"conv_out": LowRank(down, up)}, meta={"trigger_words": ["zqx"]})


@pytest.fixture
def pipe(tiny_sd: Any) -> Any:
    return make_composable(tiny_sd)


@pytest.fixture
def library(tmp_path: Path, tiny_sd: Any) -> Path:
    """A library of one random LoRA over tiny-sd's attention projections."""
    folder = tmp_path / "library"
    folder.mkdir()
    write_diffusers(folder / "style.safetensors", attention_shapes(tiny_sd.unet), rank=4, seed=3)
    return folder


def test_probe_prompts_come_from_the_trigger_words_else_the_title_else_a_neutral_subject() -> None:
    assert probe_prompts(["krwn"], "Golden Crown") == ["a picture of krwn", "an image showing krwn, detailed"]
    assert probe_prompts([], "dark_forest")[0] == "a picture of dark forest"
    assert probe_prompts([" "], None)[0] == "a picture of a picture"


def test_a_linear_effect_gets_the_analytically_solved_weight(pipe: Any) -> None:
    calibrator = Calibrator(pipe)
    adapter = _output_conv_adapter(pipe)
    pipe.add_adapter(adapter, name="out")
    prompts = probe_prompts(["zqx"])
    at_one = calibrator.ratio("out", 1.0, prompts)
    assert calibrator.ratio("out", 0.5, prompts) == pytest.approx(at_one / 2, rel=1e-4)
    result = calibrator.calibrate(adapter, "out")
    assert not result.capped
    assert result.weight == pytest.approx(TARGET / at_one, rel=math.exp(TOLERANCE) - 1)
    doubled = calibrator.calibrate(_output_conv_adapter(pipe, 2.0), "doubled")
    assert doubled.weight == pytest.approx(result.weight / 2, rel=2 * (math.exp(TOLERANCE) - 1))
    assert "doubled" not in pipe.adapters, "an adapter registered for the measurement is removed again"


def test_the_search_solves_a_saturating_ratio_and_caps_at_the_range_end(pipe: Any) -> None:
    calibrator = Calibrator(pipe)
    solved = calibrator.solve(lambda w: 2.5 * w**0.4)
    assert not solved.capped
    assert 2.5 * solved.weight**0.4 == pytest.approx(TARGET, rel=0.03)
    faint = calibrator.solve(lambda w: 0.01 * w)
    assert faint.capped
    assert faint.weight == MAX_WEIGHT


def test_calibration_is_deterministic_and_a_file_scaled_up_gets_a_smaller_weight(
    tmp_path: Path, library: Path, tiny_sd: Any
) -> None:
    pipe = make_composable(tiny_sd)
    source = library / "style.safetensors"
    weights = {}
    for factor in (1.0, 2.0):
        (tmp_path / str(factor)).mkdir()
        path = _scaled_copy(source, tmp_path / str(factor) / source.name, factor)
        weights[factor] = Calibrator(pipe).calibrate(pipe.read_adapter_file(path)).weight
    assert Calibrator(pipe).calibrate(pipe.read_adapter_file(source)).weight == weights[1.0]
    assert weights[2.0] < weights[1.0]


def test_a_weightless_tag_is_calibrated_once_stored_and_reused_and_a_weight_overrides_it(
    library: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    composer = Composer(model="tiny-sd", library=library, calibrated_defaults=True)
    result = composer.run("a corgi <lora:style>", steps=1)
    entry = composer.library.get("style")
    identity = model_identity(composer.pipe, "tiny-sd")
    calibration = stored(entry, identity)
    assert calibration is not None
    assert result.adapters[0].weight == calibration.weight
    assert any("calibrated weight" in reason for reason in result.adapters[0].reasons)

    def refuse(*_: Any, **__: Any) -> Any:
        raise AssertionError("a stored calibration is measured again")

    monkeypatch.setattr(Calibrator, "calibrate", refuse)
    fresh = Composer(model="tiny-sd", library=library, calibrated_defaults=True)
    assert fresh.run("a corgi <lora:style>", steps=1).adapters[0].weight == calibration.weight
    assert fresh.run("a corgi <lora:style:0.3>", steps=1).adapters[0].weight == 0.3
    assert fresh.run("a corgi", loras={"style": 0.7}, steps=1).adapters[0].weight == 0.7
    plain = Composer(model="tiny-sd", library=library)
    assert plain.run("a corgi <lora:style>", steps=1).adapters[0].weight == 1.0, "calibrated defaults are opt-in"


def test_a_changed_file_invalidates_its_calibration(library: Path, tiny_sd: Any, tmp_path: Path) -> None:
    composer = Composer(model="tiny-sd", library=library)
    before = composer.calibration("style")
    catalog = Library(library)
    identity = model_identity(composer.pipe, "tiny-sd")
    assert stored(catalog.get("style"), identity) == before
    scaled = _scaled_copy(library / "style.safetensors", tmp_path / "scaled.safetensors", 2.0)
    shutil.copyfile(scaled, library / "style.safetensors")
    catalog.scan()
    assert stored(catalog.get("style"), identity) is None
    assert CATALOG_KEY not in catalog.get("style").scores
    after = composer.calibration("style")
    assert after.weight < before.weight


def test_weightless_requests_are_marked_and_weighted_ones_are_not() -> None:
    _, tags = extract_lora_tags("x <lora:a> <lora:b:0.5> <lora:c:te=0.5> <lora:d:unet=0.4>")
    assert [t.weight_given for t in tags] == [False, True, False, True]
    assert [t.weight_given for t in parse_lora_list("a,b:0.8")] == [False, True]


def test_a_model_without_a_guidance_batch_is_refused_with_a_typed_error(tiny_flux: Any) -> None:
    pipe = make_composable(tiny_flux)
    gen = torch.Generator().manual_seed(0)
    layers = {
        name: LowRank(torch.randn(2, shape[1], generator=gen), torch.randn(shape[0], 2, generator=gen))
        for name, shape in attention_shapes(pipe.transformer, limit=2).items()
    }
    with pytest.raises(CalibrationError):
        Calibrator(pipe, size=32).calibrate(Adapter("f", "flux", layers), "f")
    assert pipe.adapters == {}
