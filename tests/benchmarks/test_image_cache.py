"""The benchmarks' image cache: drawn images re-read only under the same drawing code, weights and recipe."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from benchmarks._image_cache import ImageCache, drawing_fingerprint


def test_a_recipe_is_drawn_once_and_read_back_exactly_with_its_drawing_time(tmp_path: Path) -> None:
    calls = []

    def make() -> torch.Tensor:
        calls.append(1)
        return torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(len(calls)))

    cache = ImageCache(tmp_path, "fingerprint")
    first, seconds = cache.draw({"prompt": "a"}, make)
    again, seconds_again = ImageCache(tmp_path, "fingerprint").draw({"prompt": "a"}, make)
    assert len(calls) == 1
    assert torch.equal(first, again)
    assert seconds_again == seconds
    cache.draw({"prompt": "b"}, make)
    ImageCache(tmp_path, "other code").draw({"prompt": "a"}, make)
    assert len(calls) == 3, "another recipe or another fingerprint draws again"
    assert (cache.drawn, cache.reused) == (4, 0)
    assert not list(tmp_path.glob("*.partial"))


def test_without_a_folder_every_call_draws() -> None:
    cache = ImageCache(None, "")
    for _ in range(2):
        cache.draw({"prompt": "a"}, lambda: torch.zeros(1, 3, 64, 64))
    assert (cache.drawn, cache.reused) == (2, 0)


def test_the_fingerprint_follows_drawing_files_but_not_the_judges_or_markdown(tmp_path: Path) -> None:
    files = {
        "composer/pipeline.py": "draw",
        "fusion/merge.py": "merge",
        "composer/toyworld/weights/unet.safetensors": "unet",
        "composer/toyworld/judge.py": "judge code",
        "composer/toyworld/verdict.py": "verdict code",
        "composer/toyworld/weights/judge.safetensors": "judge weights",
        "composer/toyworld/weights/README.md": "notes",
        "composer/toyworld/train.py": "training command",
    }
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    before = drawing_fingerprint(tmp_path)
    for name in (
        "composer/toyworld/judge.py",
        "composer/toyworld/verdict.py",
        "composer/toyworld/weights/judge.safetensors",
        "composer/toyworld/weights/README.md",
        "composer/toyworld/train.py",
    ):
        (tmp_path / name).write_text("changed")
    assert drawing_fingerprint(tmp_path) == before
    for name in ("composer/pipeline.py", "fusion/merge.py", "composer/toyworld/weights/unet.safetensors"):
        (tmp_path / name).write_text("changed " + name)
        changed = drawing_fingerprint(tmp_path)
        assert changed != before, name
        before = changed


def test_a_quality_rerun_reads_its_images_back_and_judges_them_alike(
    tmp_path: Path, capsys, toy_quality_pipeline
) -> None:
    from benchmarks.composition_quality import main

    argv = ["--quick", "--methods", "merge", "--library", str(tmp_path / "lib"), "--image-cache", str(tmp_path / "img")]
    assert main(argv) == 0
    first = json.loads(capsys.readouterr().out)
    assert main(argv) == 0
    second = json.loads(capsys.readouterr().out)
    assert first["images"] == {"drawn": 1, "reused": 0}
    assert second["images"] == {"drawn": 0, "reused": 1}
    assert second["compositions"] == first["compositions"]


def test_default_path_rows_are_drawn_once_and_judged_again_from_the_cache(tmp_path: Path) -> None:
    """The quality benchmark's default-path cells go through the cache too: a rerun after a judge change reads the
    images back instead of running the facade again."""
    from types import SimpleNamespace

    from PIL import Image

    from benchmarks.composition_quality import _default_path_cell

    class Facade:
        runs = 0

        def run(self, prompt: str, loras: str, seed: int) -> SimpleNamespace:
            Facade.runs += 1
            return SimpleNamespace(images=[Image.new("RGB", (64, 64), (200, 40, 40))])

        def choose(self, prompt: str, loras: str) -> tuple[str, list[SimpleNamespace]]:
            return prompt, [SimpleNamespace(name="zorbex"), SimpleNamespace(name="crown")]

    trials = [(("zorbex", "crown"), 0), (("zorbex", "sunset"), 1)]
    cells = [_default_path_cell(Facade(), "default path", trials, 2, ImageCache(tmp_path, "code")) for _ in range(2)]
    assert Facade.runs == 2, "each trial drawn once"
    assert cells[0] == cells[1]
    assert cells[0]["retrieved_exactly"] == 1
    assert cells[0]["all_elements"] == 0.0, "a plain red square shows neither concept"
