"""K-LoRA and TIES end to end: ``Composer(model="toy-sd")`` with three toy adapters, a few steps each, and
``--method`` accepting both names."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from composer import Composer

LORAS = {"zorbex": 0.8, "crown": 0.8, "pixel_art": 0.8}


@pytest.fixture(scope="module")
def toy(tmp_path_factory: pytest.TempPathFactory) -> Composer:
    from composer.toyworld.library import build_toy_library

    library = tmp_path_factory.mktemp("toy") / "library"
    build_toy_library(library)
    return Composer(model="toy-sd", library=library)


@pytest.mark.parametrize("method", ["klora", "ties"])
def test_toy_sd_composes_three_adapters(toy: Composer, method: str, tmp_path: Path) -> None:
    result = toy.run("zorbex wearing a krwn crown, pxlart pixel art", LORAS, method=method, steps=3, out=tmp_path)
    assert result.method == method
    assert sorted(a.request.name for a in result.adapters) == sorted(LORAS)
    assert [p.name for p in tmp_path.glob("*.png")]
    pixels = np.asarray(result.images[0], dtype=np.float32)
    assert np.isfinite(pixels).all()
    assert pixels.std() > 0


def test_cli_lists_the_new_methods() -> None:
    from composer.cli.commands.generate import METHODS

    assert {"klora", "ties"} <= set(METHODS)
