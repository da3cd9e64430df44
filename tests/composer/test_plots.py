"""Composition plots: score charts and weight-table heatmaps are valid PNGs of the expected size; `--plot DIR` writes
them (and the gate heatmap for gated) and `--json` lists them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from composer.analysis import plots
from composer.cli import main
from fusion.errors import CompositionError

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _png_size(path: Path) -> tuple[int, int]:
    assert path.read_bytes()[:8] == PNG_MAGIC
    with Image.open(path) as image:
        image.verify()
    with Image.open(path) as image:
        return image.size


@pytest.fixture(scope="module")
def library(example_library: Path) -> Path:
    return example_library


def test_hit_scores_leave_unscored_signals_blank() -> None:
    hits = [
        {"name": "a", "score": 0.05, "signals": {"trigger": {"rank": 1, "score": 15.0}, "zero_shot": {"score": 0.5}}},
        {"name": "b", "score": 0.02, "signals": {"metadata": {"rank": 2, "score": 3.0}}},
    ]
    names, scores, fused = plots.hit_scores(hits)
    assert names == ["a", "b"]
    assert scores.shape == (2, len(plots.SIGNALS))
    assert scores[0, plots.SIGNALS.index("trigger")] == 15.0
    assert scores[1, plots.SIGNALS.index("metadata")] == 3.0
    assert torch.isnan(scores[0, plots.SIGNALS.index("metadata")])
    assert torch.isnan(scores[1, plots.SIGNALS.index("learned")])
    assert torch.equal(fused, torch.tensor([0.05, 0.02]))


def test_score_chart_grows_a_row_per_adapter_and_keeps_its_panels(tmp_path: Path) -> None:
    def chart(count: int) -> tuple[int, int]:
        scores = torch.tensor([[1.0, float("nan"), 0.3, -0.2], [float("nan"), 2.0, float("nan"), 0.4]] * 3)[:count]
        names = [f"adapter{i}" for i in range(count)]
        return _png_size(plots.write_score_chart(names, scores, torch.rand(count), tmp_path / f"{count}.png"))

    (width2, height2), (width4, height4), (width6, height6) = chart(2), chart(4), chart(6)
    assert width2 == width4 == width6, "one panel per signal whatever the adapter count"
    assert height2 < height4 < height6
    assert height6 - height4 == pytest.approx(height4 - height2, abs=2), "every adapter row is as tall"


def test_weight_table_grows_a_panel_per_adapter_and_a_row_per_block_group(tmp_path: Path) -> None:
    def table(adapters: int, groups: int) -> tuple[int, int]:
        weights = torch.linspace(0, 1, adapters * groups * 4).reshape(adapters, groups, 4)
        names = ["a", "b", "c"][:adapters]
        labels = ["BASE", "IN00", "M00", "OUT00", "OTHER"][:groups]
        return _png_size(
            plots.write_weight_table(weights, names, labels, tmp_path / "nested" / f"{adapters}x{groups}.png")
        )

    (width1, height1), (width3, height3), (width3_, height3_) = table(1, 5), table(3, 5), table(3, 2)
    assert width1 < width3 == width3_
    assert height1 == height3 > height3_
    with pytest.raises(CompositionError, match="does not match"):
        plots.write_weight_table(torch.zeros(3, 5, 4), ["a", "b"], ["BASE"] * 5, tmp_path / "bad.png")


def test_cli_plot_writes_scores_weights_and_gates(library: Path, tmp_path: Path, capsys) -> None:
    plot_dir = tmp_path / "plots"
    code = main(
        [
            *["a corgi astronaut on the moon", "--loras", "auto", "--library", str(library), "--method", "gated"],
            *["--out", str(tmp_path / "out"), "--plot", str(plot_dir), "--steps", "3", "--seed", "4", "--json"],
        ]
    )
    document = json.loads(capsys.readouterr().out)
    assert code == 0
    expected = {kind: str(plot_dir / f"4-{kind}.png") for kind in ("scores", "weights", "gates")}
    assert document["plots"] == expected
    assert sorted(p.name for p in plot_dir.iterdir()) == sorted(Path(p).name for p in expected.values())
    assert len(document["adapters"]) >= 1
    for path in expected.values():
        assert min(_png_size(Path(path))) > 0


def test_cli_plot_without_retrieval_writes_only_the_weight_table(library: Path, tmp_path: Path, capsys) -> None:
    def weight_table_width(loras: str, plot_dir: Path) -> int:
        argv = ["a knight", "--loras", loras, "--library", str(library), "--out", str(tmp_path / "out")]
        assert main([*argv, "--plot", str(plot_dir), "--steps", "2"]) == 0
        assert f"wrote {plot_dir / '0-weights.png'}" in capsys.readouterr().out
        assert sorted(p.name for p in plot_dir.iterdir()) == ["0-weights.png"]
        return _png_size(plot_dir / "0-weights.png")[0]

    one = weight_table_width("pixel_knight:0.9", tmp_path / "one")
    two = weight_table_width("pixel_knight:0.9,red_scarf:0@0,1@0.5", tmp_path / "two")
    assert two > one, "one panel per composed adapter"
