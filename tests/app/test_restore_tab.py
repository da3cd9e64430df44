"""The Restore tab over HTTP: restoration adapters are found by their metadata, and a /restore request returns the
image (and task prompt) the same restoration gives when run directly through `composer.restoration.restore.Restorer`."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from gradio_client import handle_file
from gradio_client.exceptions import AppError
from PIL import Image
from safetensors.torch import save_file

from composer.presets import load_preset
from composer.restoration.restore import Restorer
from composer.service import CompositionService

DEHAZE = "remove the haze from the image"
KEYS = ("down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q", "up_blocks.1.attentions.0.proj_out")
STEPS = 3


@pytest.fixture(scope="module")
def restore_library(demo_library: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo library plus a diffusers-format dehaze LoRA for tiny-sd carrying task_prompt / needs_input_image."""
    library = tmp_path_factory.mktemp("restore-app") / "library"
    shutil.copytree(demo_library, library, symlinks=True)
    unet = load_preset("tiny-sd").unet
    gen = torch.Generator().manual_seed(3)
    tensors = {}
    for key in KEYS:
        weight = unet.get_submodule(key).weight.reshape(unet.get_submodule(key).weight.shape[0], -1)
        tensors[f"unet.{key}.lora_A.weight"] = torch.randn(4, weight.shape[1], generator=gen) * 0.5
        tensors[f"unet.{key}.lora_B.weight"] = torch.randn(weight.shape[0], 4, generator=gen) * 0.5
    (library / "restoration").mkdir()
    metadata = {"task_prompt": DEHAZE, "needs_input_image": "true"}
    save_file(tensors, str(library / "restoration" / "dehaze.safetensors"), metadata=metadata)
    return library


@pytest.fixture(scope="module")
def restore_app(restore_library: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[object]:
    from app.server import start

    service = CompositionService("tiny-sd", restore_library, out=tmp_path_factory.mktemp("restore-out"), workers=2)
    running = start(service)
    yield running
    running.close()


@pytest.fixture(scope="module")
def hazy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    gen = np.random.default_rng(0)
    pixels = (gen.random((40, 48, 3)) * 80 + 150).astype(np.uint8)
    path = tmp_path_factory.mktemp("hazy") / "hazy.png"
    Image.fromarray(pixels).save(path)
    return path


def _pixels(path: str | Path | Image.Image) -> np.ndarray:
    image = path if isinstance(path, Image.Image) else Image.open(path)
    return np.asarray(image.convert("RGB"))


def test_restoration_adapters_are_found_by_metadata(restore_app) -> None:
    from app.restore_tab import style_rows

    service = restore_app.service
    assert service.restoration_names() == ["dehaze"]
    assert "dehaze" in service.adapter_names()
    assert style_rows(["watercolor", "film_grain"], [["watercolor", 0.3]]) == [["watercolor", 0.3], ["film_grain", 0.8]]


def test_restore_over_http_matches_a_direct_restoration(
    restore_app, api_client, restore_library: Path, hazy: Path, tmp_path: Path
) -> None:
    from app.restore_tab import STYLE_HEADERS

    client = api_client(restore_app.url, download_files=str(tmp_path / "client"))
    style = {"headers": STYLE_HEADERS, "data": [["watercolor", 0.6]]}
    image, prompt = client.predict(
        handle_file(str(hazy)), ["dehaze"], style, "", "merge", STEPS, 5, api_name="/restore"
    )
    assert prompt == DEHAZE
    got = _pixels(image)
    assert got.shape == (40, 48, 3)

    direct = Restorer("tiny-sd", restore_library)
    want = direct.restore(hazy, ["dehaze:1.0"], "watercolor:0.6", steps=STEPS, seed=5).images[0]
    assert np.array_equal(got, _pixels(want))
    without_style = direct.restore(hazy, ["dehaze:1.0"], steps=STEPS, seed=5).images[0]
    assert not np.array_equal(got, _pixels(without_style)), "the style adapter must change the restoration"

    _, custom = client.predict(
        handle_file(str(hazy)),
        ["dehaze"],
        {"headers": STYLE_HEADERS, "data": []},
        "sharpen it",
        "merge",
        STEPS,
        0,
        api_name="/restore",
    )
    assert custom == "sharpen it"


def test_restore_without_a_restoration_adapter_is_refused(restore_app, api_client, hazy: Path, tmp_path: Path) -> None:
    from app.restore_tab import STYLE_HEADERS

    client = api_client(restore_app.url, download_files=str(tmp_path / "client"))
    with pytest.raises(AppError, match="at least one restoration adapter"):
        client.predict(
            handle_file(str(hazy)),
            [],
            {"headers": STYLE_HEADERS, "data": []},
            "",
            "merge",
            STEPS,
            0,
            api_name="/restore",
        )


def test_service_restore_keeps_schedules_and_block_weights(restore_library: Path, hazy: Path, tmp_path: Path) -> None:
    from composer.service import adapter_request

    service = CompositionService("tiny-sd", restore_library, out=tmp_path / "out")
    style = [
        adapter_request("watercolor", schedule="0@0,1@1", block_weights="OUTALL"),
        adapter_request("film_grain", 0.4, start=0.0, stop=0.5),
    ]
    result = service.restore(hazy, [adapter_request("dehaze", 0.9)], style, steps=STEPS)
    by_name = {item.name: item for item in result.adapters}
    assert by_name["dehaze"].weight == 0.9
    watercolor = by_name["watercolor"]
    assert (watercolor.weight, watercolor.request.block_weights) == ("0@0,1@1", "OUTALL")
    assert (by_name["film_grain"].request.start, by_name["film_grain"].request.stop) == (0.0, 0.5)
