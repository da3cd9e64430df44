"""Every file the toy world reads at run time ships in the wheel: each one under composer/toyworld/weights matches a
package-data pattern of pyproject.toml (a file left out works from a clone and breaks after ``pip install``)."""

from __future__ import annotations

from pathlib import Path

import toml

ROOT = Path(__file__).resolve().parents[2]


def test_every_toy_world_weight_file_is_package_data() -> None:
    config = toml.loads((ROOT / "pyproject.toml").read_text())
    patterns = config["tool"]["setuptools"]["package-data"]["composer.toyworld"]
    package = ROOT / "composer" / "toyworld"
    shipped = {path for pattern in patterns for path in package.glob(pattern)}
    files = {path for path in (package / "weights").rglob("*") if path.is_file()}
    assert files, "the toy world's weights are missing from the checkout"
    assert sorted(str(p.relative_to(package)) for p in files - shipped) == []


def test_every_checkpoint_architecture_config_is_package_data() -> None:
    """The configs `--model FILE.safetensors` builds models from ship in the wheel (nothing is fetched for them)."""
    config = toml.loads((ROOT / "pyproject.toml").read_text())
    patterns = config["tool"]["setuptools"]["package-data"]["composer.checkpoints"]
    package = ROOT / "composer" / "checkpoints"
    shipped = {path for pattern in patterns for path in package.glob(pattern)}
    files = set((package / "configs").glob("*.json"))
    assert {"sd1.json", "sd2.json", "sdxl.json", "flux.json"} <= {p.name for p in files}
    assert sorted(str(p.relative_to(package)) for p in files - shipped) == []
