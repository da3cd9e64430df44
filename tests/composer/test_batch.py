"""`compose batch PROMPTS.txt`: one folder per prompt line, named by index; a merged manifest; accelerate processes."""

from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from composer.cli import EXIT_ERROR, EXIT_USAGE, main
from composer.cli.commands.batch import read_prompts, slug
from fusion.errors import ComposerError

PROMPTS = """# demo prompts
a corgi astronaut <lora:corgi_astronaut:0.8>

a knight in the rain <lora:pixel_knight:0.9> <lora:neon_city:0.5>
a teapot, watercolor <lora:golden_teapot:1> <lora:watercolor:0.6:lbw=OUTALL>
"""
FOLDERS = ["0000-a-corgi-astronaut", "0001-a-knight-in-the-rain", "0002-a-teapot-watercolor"]


@pytest.fixture(scope="module")
def library(example_library: Path) -> Path:
    return example_library


@pytest.fixture
def prompts_file(tmp_path: Path) -> Path:
    path = tmp_path / "prompts.txt"
    path.write_text(PROMPTS)
    return path


@pytest.fixture(scope="module")
def single_process_run(library: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, dict]:
    """``compose batch PROMPTS --steps 2 --json`` in this process, once for the module: the prompts file, the output
    folder and the printed document (the accelerate test compares its images against these)."""
    root = tmp_path_factory.mktemp("single")
    prompts, out = root / "prompts.txt", root / "out"
    prompts.write_text(PROMPTS)
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        code = main(["batch", str(prompts), "--library", str(library), "--out", str(out), "--steps", "2", "--json"])
    assert code == 0
    return prompts, out, json.loads(printed.getvalue())


def _pixels(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def test_read_prompts_skips_blanks_and_comments(prompts_file: Path) -> None:
    prompts = read_prompts(prompts_file)
    assert len(prompts) == 3
    assert prompts[0] == "a corgi astronaut <lora:corgi_astronaut:0.8>"


def test_empty_or_missing_prompts_file_is_a_clear_error(tmp_path: Path) -> None:
    empty = tmp_path / "empty.txt"
    empty.write_text("# nothing\n\n")
    with pytest.raises(ComposerError, match="no prompts"):
        read_prompts(empty)
    with pytest.raises(ComposerError, match="cannot read the prompts file"):
        read_prompts(tmp_path / "missing.txt")


def test_slug_drops_tags_and_punctuation() -> None:
    assert slug("A Teapot, watercolor <lora:golden_teapot:1>") == "a-teapot-watercolor"
    assert slug("<lora:x:1> !!!") == "prompt"
    assert len(slug("word " * 40)) <= 40


def test_single_process_batch_writes_one_folder_per_line(single_process_run: tuple[Path, Path, dict]) -> None:
    _, out, document = single_process_run
    assert document["prompts"] == 3
    assert document["processes"] == 1
    assert [item["index"] for item in document["items"]] == [0, 1, 2]
    assert [[a["name"] for a in item["adapters"]] for item in document["items"]] == [
        ["corgi_astronaut"],
        ["pixel_knight", "neon_city"],
        ["golden_teapot", "watercolor"],
    ]
    for folder, item in zip(FOLDERS, document["items"]):
        png = out / folder / "0-0.png"
        assert item["images"] == [str(png)]
        with Image.open(png) as image:
            assert "Steps: 2" in image.text["parameters"]
        assert (out / folder / "0-0.json").is_file()
    assert json.loads((out / "batch.json").read_text())["items"] == document["items"]
    assert not (out / ".batch").exists()


def test_human_report_and_options_after_the_file(library: Path, prompts_file: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "out"
    argv = ["batch", str(prompts_file), "--processes", "1", "--library", str(library), "--out", str(out)]
    assert main([*argv, "--steps", "1", "--seed", "3"]) == 0
    text = capsys.readouterr().out
    assert "pixel_knight, neon_city" in text
    assert "3 image(s) for 3 prompt(s) with 1 process(es)" in text
    assert (out / FOLDERS[2] / "3-0.png").is_file()


def test_unknown_adapter_exits_1(library: Path, tmp_path: Path, capsys) -> None:
    prompts = tmp_path / "p.txt"
    prompts.write_text("a dog <lora:no_such_adapter:1>\n")
    code = main(["batch", str(prompts), "--library", str(library), "--out", str(tmp_path / "out")])
    assert code == EXIT_ERROR
    assert "no adapter named 'no_such_adapter'" in capsys.readouterr().err


@pytest.mark.parametrize("extra", [["--method", "blend"], ["--steps", "x"], ["--bogus"]])
def test_bad_generate_options_exit_2(prompts_file: Path, extra: list[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["batch", str(prompts_file), *extra])
    assert exit_info.value.code == EXIT_USAGE


@pytest.mark.slow
def test_two_accelerate_processes_give_the_single_process_images(
    library: Path, single_process_run: tuple[Path, Path, dict], tmp_path: Path
) -> None:
    prompts_file, single, _ = single_process_run
    double = tmp_path / "double"
    options = ["--library", str(library), "--steps", "2", "--json"]
    command = [sys.executable, "-m", "composer.cli", "batch", str(prompts_file), "--processes", "2"]
    completed = subprocess.run(
        [*command, "--out", str(double), *options],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        check=False,
    )
    assert completed.returncode == 0, completed.stderr[-2000:]
    document = json.loads(completed.stdout)
    assert document["processes"] == 2
    assert sorted({item["rank"] for item in document["items"]}) == [0, 1]
    for folder in FOLDERS:
        assert np.array_equal(_pixels(double / folder / "0-0.png"), _pixels(single / folder / "0-0.png")), folder


def test_plots_go_to_one_folder_per_prompt(library: Path, prompts_file: Path, tmp_path: Path) -> None:
    out, plots = tmp_path / "out", tmp_path / "plots"
    argv = ["batch", str(prompts_file), "--processes", "1", "--library", str(library), "--out", str(out)]
    assert main([*argv, "--steps", "1", "--plot", str(plots)]) == 0
    written = sorted(p.relative_to(plots).as_posix() for p in plots.rglob("*-weights.png"))
    assert written == [f"{folder}/0-weights.png" for folder in FOLDERS]
