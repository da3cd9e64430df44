"""Commands hand their options to the calls they wrap by name: every flag reaches the field or parameter it sets."""

from __future__ import annotations

import argparse
import inspect
from pathlib import Path
from typing import Any

import pytest

import composer.presets
import composer.restoration.degrade
import composer.restoration.restore
from composer.cli import main
from composer.cli.commands.app import add_app_options, service_options
from composer.cli.option_values import option_values
from composer.restoration.degrade import DegradeOptions
from composer.service import CompositionService


class _CalledError(Exception):
    """Raised by a stand-in for the wrapped call once it has seen its arguments."""


def test_option_values_takes_the_named_options_and_can_skip_unset_ones() -> None:
    args = argparse.Namespace(steps=None, seed=0, prompt="", other="x")
    assert option_values(args, ("steps", "seed", "prompt")) == {"steps": None, "seed": 0, "prompt": ""}
    assert option_values(args, ("steps", "seed", "prompt"), given_only=True) == {"seed": 0, "prompt": ""}


def test_make_pairs_hands_every_degradation_option_on(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    seen: dict[str, Any] = {}

    def fake_make_pairs(clean: Path, out: Path, kind: str, options: DegradeOptions, *, seed: int) -> list[Any]:
        seen.update(kind=kind, options=options, seed=seed)
        return []

    monkeypatch.setattr(composer.restoration.degrade, "make_pairs", fake_make_pairs)
    flags = ["--sigma", "15", "--quality", "30", "--beta", "0.5", "--airlight", "0.7", "--density", "0.1"]
    flags += ["--gamma", "1.5", "--scale", "0.4", "--seed", "9"]
    assert main(["make-pairs", str(tmp_path), "--degrade", "haze", *flags, "--out", str(tmp_path / "o"), "--json"]) == 0
    expected = DegradeOptions(sigma=15.0, quality=30, beta=0.5, airlight=0.7, density=0.1, gamma=1.5, scale=0.4)
    assert seen == {"kind": "haze", "options": expected, "seed": 9}


def test_app_options_name_the_service_parameters(tmp_path: Path) -> None:
    parser = argparse.ArgumentParser()
    add_app_options(parser)
    argv = ["--model", "toy-sd", "--library", str(tmp_path), "--models", str(tmp_path / "ckpt"), "--workers", "2"]
    options = service_options(parser.parse_args([*argv, "--out", str(tmp_path / "out"), "--vae", "vae.safetensors"]))
    assert options == {
        "model": "toy-sd",
        "library": tmp_path,
        "out": tmp_path / "out",
        "workers": 2,
        "vae": Path("vae.safetensors"),
        "text_encoders": None,
        "models_dir": tmp_path / "ckpt",
    }
    inspect.signature(CompositionService).bind(**options)  # every one is a parameter of the service


def test_restore_hands_its_options_to_the_restorer(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: dict[str, Any] = {}

    class FakeRestorer:
        def __init__(self, **options: Any) -> None:
            seen["init"] = options

        def restore(self, image: Path, **options: Any) -> None:
            seen["restore"] = {"image": image, **options}
            raise _CalledError

    monkeypatch.setattr(composer.restoration.restore, "Restorer", FakeRestorer)
    argv = ["restore", "in.png", "--adapter", "derain", "--loras", "style:0.6", "--method", "switch", "--task", "t"]
    with pytest.raises(_CalledError):
        main([*argv, "--steps", "5", "--seed", "2", "--guidance", "3.5", "--out", "o.png", "--model", "m"])
    assert seen["init"] == {"model": "m", "library": None}
    assert seen["restore"] == {
        "image": Path("in.png"),
        "adapters": ["derain"],
        "loras": "style:0.6",
        "method": "switch",
        "task": "t",
        "steps": 5,
        "seed": 2,
        "out": Path("o.png"),
        "progress": True,
        "guidance_scale": 3.5,
    }


class _Pipe:
    def set_progress_bar_config(self, **_: Any) -> None:
        pass


@pytest.mark.parametrize(
    ("module", "trainer", "argv", "expected"),
    [
        (
            "composer.training.shira",
            "train_shira",
            ["train-shira", "--images", "imgs", "--prompt", "a sks toy", "--mask", "grad", "--r", "4"],
            {"images": Path("imgs"), "prompt": "a sks toy", "mask": "grad", "r": 4, "out": Path("x.safetensors")},
        ),
        (
            "composer.training.gates",
            "train_gates",
            ["train-gates", "--adapters", "a.safetensors,b.safetensors", "--weights", "0.5,1", "--data", "d"],
            {"adapters": [Path("a.safetensors"), Path("b.safetensors")], "weights": [0.5, 1.0], "out": "x.safetensors"},
        ),
        (
            "composer.training.restore",
            "train_restore",
            ["train-restore", "--pairs", "p", "--task", "derain", "--rank", "8", "--alpha", "2", "--guidance", "3"],
            {"rank": 8, "alpha": 2.0, "guidance_scale": 3.0, "resolution": 64, "out": Path("x.safetensors")},
        ),
    ],
)
def test_train_commands_hand_their_options_to_the_config(
    module: str, trainer: str, argv: list[str], expected: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[Any] = []

    def fake_trainer(pipe: Any, config: Any) -> None:
        seen.append(config)
        raise _CalledError

    monkeypatch.setattr(composer.presets, "load_preset", lambda name: _Pipe())
    monkeypatch.setattr(__import__(module, fromlist=[trainer]), trainer, fake_trainer)
    with pytest.raises(_CalledError):
        main([*argv, "--model", "tiny-sd", "--steps", "7", "--lr", "0.01", "--seed", "3", "--out", "x.safetensors"])
    config = seen[0]
    shared = {"steps": 7, "learning_rate": 0.01, "seed": 3, "batch_size": 1, "progress": True}
    assert {name: getattr(config, name) for name in [*expected, *shared]} == {**expected, **shared}
