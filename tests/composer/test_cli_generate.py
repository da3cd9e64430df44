"""`compose "prompt"`: the selection table or one --json document, A1111 PNG chunk + sidecar, reliable exit codes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from composer.cli import EXIT_ERROR, EXIT_USAGE, main

PROMPT = "a corgi astronaut on the moon <lora:corgi_astronaut:0.8> <lora:watercolor:0.6:lbw=OUTALL>"


@pytest.fixture(scope="module")
def library(example_library: Path) -> Path:
    return example_library


def test_human_output_lists_adapters_and_written_files(library: Path, tmp_path: Path, capsys) -> None:
    code = main([PROMPT, "--library", str(library), "--out", str(tmp_path), "--steps", "2"])
    out = capsys.readouterr().out
    assert code == 0
    assert "corgi_astronaut" in out
    assert "watercolor" in out
    assert "named in a <lora:…> prompt tag" in out
    assert "prompt: a corgi astronaut on the moon\n" in out
    assert "method: merge, 2 steps, seed 0" in out
    assert f"wrote {tmp_path / '0-0.png'}" in out
    assert (tmp_path / "0-0.png").is_file()


def test_json_output_is_one_document(library: Path, tmp_path: Path, capsys) -> None:
    loras = ["--loras", "pixel_knight:0.9,red_scarf:0@0,1@0.5", "--library", str(library)]
    code = main(
        ["a knight", *loras, "--out", str(tmp_path), "--seed", "5", "--steps", "2", "--num-images", "2", "--json"]
    )
    document = json.loads(capsys.readouterr().out)
    assert code == 0
    assert document["prompt"] == "a knight"
    assert document["seed"] == 5
    assert document["steps"] == 2
    assert [a["name"] for a in document["adapters"]] == ["pixel_knight", "red_scarf"]
    assert document["adapters"][1]["weight"] == "0@0,1@0.5"
    assert document["images"] == [str(tmp_path / "5-0.png"), str(tmp_path / "5-1.png")]
    assert all(Path(p).is_file() for p in document["images"])


def test_png_carries_a1111_parameters_and_sidecar(library: Path, tmp_path: Path, capsys) -> None:
    assert main([PROMPT, "--library", str(library), "--out", str(tmp_path), "--steps", "3", "--seed", "11"]) == 0
    capsys.readouterr()
    with Image.open(tmp_path / "11-0.png") as image:
        parameters = image.text["parameters"]
        assert image.size == (64, 64)
    first, settings = parameters.split("\n")
    assert first.startswith("a corgi astronaut on the moon")
    assert "<lora:corgi_astronaut:0.8>" in first
    assert "Steps: 3" in settings
    assert "Seed: 11" in settings
    assert "Size: 64x64" in settings
    assert 'Lora hashes: "corgi_astronaut: ' in settings
    assert "Composition: merge" in settings
    sidecar = json.loads((tmp_path / "11-0.json").read_text())
    assert sidecar["parameters"] == parameters
    assert {a["name"] for a in sidecar["adapters"]} == {"corgi_astronaut", "watercolor"}


def test_branches_conditional_composes_the_conditional_branch_and_says_so(
    library: Path, tmp_path: Path, capsys
) -> None:
    common = [PROMPT, "--library", str(library), "--steps", "2", "--seed", "4", "--json"]
    assert main([*common, "--out", str(tmp_path / "both")]) == 0
    assert "branches" not in json.loads(capsys.readouterr().out)
    assert main([*common, "--out", str(tmp_path / "cond"), "--branches", "conditional"]) == 0
    assert json.loads(capsys.readouterr().out)["branches"] == "conditional"
    with Image.open(tmp_path / "cond" / "4-0.png") as cond, Image.open(tmp_path / "both" / "4-0.png") as both:
        assert "Composition branches: conditional" in cond.text["parameters"]
        assert "branches" not in both.text["parameters"]
        assert cond.tobytes() != both.tobytes()


def test_unknown_adapter_exits_1_with_a_clear_message(library: Path, tmp_path: Path, capsys) -> None:
    code = main(["a dog", "--loras", "corgi_astronot", "--library", str(library), "--out", str(tmp_path)])
    captured = capsys.readouterr()
    assert code == EXIT_ERROR
    assert captured.err.startswith("error: ")
    assert "no adapter named 'corgi_astronot'" in captured.err
    assert "did you mean corgi_astronaut" in captured.err
    assert "Traceback" not in captured.err
    assert not list(tmp_path.glob("*.png"))


def test_bad_tag_exits_1(library: Path, tmp_path: Path, capsys) -> None:
    code = main(["a dog <lora:corgi_astronaut:lots>", "--library", str(library), "--out", str(tmp_path)])
    assert code == EXIT_ERROR
    assert "'lots' in <lora:corgi_astronaut:lots> is not a number" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv",
    [["a dog", "--method", "blend"], ["a dog", "--steps", "many"], ["a dog", "--size", "64"], ["--no-such-flag"]],
)
def test_bad_usage_exits_2(argv: list[str], capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == EXIT_USAGE
    assert "usage:" in capsys.readouterr().err


def test_no_arguments_prints_help_and_exits_2(capsys) -> None:
    assert main([]) == EXIT_USAGE
    assert "usage: compose" in capsys.readouterr().out


@pytest.mark.slow
def test_console_script_exit_code_and_stderr(library: Path, tmp_path: Path) -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, "-m", "composer.cli", "a dog", "--loras", "nosuch", "--library", str(library)]
    completed = subprocess.run(
        [*command, "--out", str(tmp_path)], capture_output=True, text=True, env=env, timeout=600, check=False
    )
    assert completed.returncode == EXIT_ERROR
    assert completed.stdout == ""
    assert "error: " in completed.stderr
    assert "no adapter named 'nosuch'" in completed.stderr
    assert "Traceback" not in completed.stderr


def test_facade_runs_an_img2img_pipeline_with_an_input_image(tmp_path: Path) -> None:
    from diffusers import StableDiffusionImg2ImgPipeline

    from composer.facade import Composer
    from composer.mixin import make_composable

    composer = Composer(model="tiny-sd")
    composer._pipe = make_composable(StableDiffusionImg2ImgPipeline.from_pipe(composer.pipe))
    start = Image.new("RGB", (64, 64), (120, 30, 200))
    result = composer.run("a corgi", image=start, steps=4, seed=1, out=tmp_path)
    assert result.images[0].size == (64, 64)
    assert result.paths[0].exists()


def test_branches_per_adapter_are_named_pairs_and_recorded(library: Path, tmp_path: Path, capsys) -> None:
    common = [PROMPT, "--library", str(library), "--steps", "2", "--seed", "4", "--json", "--out", str(tmp_path)]
    assert main([*common, "--branches", "watercolor=conditional"]) == 0
    assert json.loads(capsys.readouterr().out)["branches"] == {"watercolor": "conditional"}
    with Image.open(tmp_path / "4-0.png") as image:
        assert 'Composition branches: "watercolor: conditional"' in image.text["parameters"]  # A1111 quotes it
    with pytest.raises(SystemExit):
        main([*common, "--branches", "watercolor=negative"])
    assert "NAME=VALUE pairs" in capsys.readouterr().err


def test_branches_per_adapter_take_an_unconditional_share(library: Path, tmp_path: Path, capsys) -> None:
    common = [PROMPT, "--library", str(library), "--steps", "2", "--seed", "4", "--json", "--out", str(tmp_path)]
    assert main([*common, "--branches", "watercolor=0.5"]) == 0
    assert json.loads(capsys.readouterr().out)["branches"] == {"watercolor": 0.5}
    with Image.open(tmp_path / "4-0.png") as image:
        assert 'Composition branches: "watercolor: 0.5"' in image.text["parameters"]
    assert main([*common, "--branches", "0.5"]) == 0
    assert json.loads(capsys.readouterr().out)["branches"] == 0.5
    for bad in ("watercolor=1.5", "watercolor=nan", "1.5"):
        with pytest.raises(SystemExit):
            main([*common, "--branches", bad])
        assert "a share between 0 and 1" in capsys.readouterr().err


def test_an_unknown_adapter_name_is_refused_before_any_model_loads(
    library: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from composer import facade
    from fusion.errors import UnknownAdapterError

    def no_model(*args: object, **kwargs: object) -> None:
        raise AssertionError("a model was loaded for a request naming an adapter the library does not have")

    monkeypatch.setattr(facade, "load_preset", no_model)
    composer = facade.Composer(model="tiny-sd", library=library)
    with pytest.raises(UnknownAdapterError, match="no adapter named 'nosuch'"):
        composer.run("a dog", loras="nosuch, watercolor")
    with pytest.raises(UnknownAdapterError, match="no adapter named 'nosuch'"):
        composer.run("a dog <lora:nosuch:0.5>")
