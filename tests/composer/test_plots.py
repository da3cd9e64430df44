"""Composition plots: score charts and weight-table heatmaps are valid PNGs of the expected size; `--plot DIR` writes
them (and the gate heatmap for gated) and `--json` lists them."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from composer.analysis import plots
from composer.cli import main
from fusion.errors import CompositionError

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "examples"))

from make_library import build_library  # noqa: E402  (examples/ is not a package)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _png_size(path: Path) -> tuple[int, int]:
    assert path.read_bytes()[:8] == PNG_MAGIC
    with Image.open(path) as image:
        image.verify()
    with Image.open(path) as image:
        return image.size


@pytest.fixture(scope="module")
def library(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("plots") / "library"
    build_library(root)
    return root


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


def test_score_chart_is_a_png_sized_by_adapter_count(tmp_path: Path) -> None:
    scores = torch.tensor([[1.0, float("nan"), 0.3, -0.2], [float("nan"), 2.0, float("nan"), 0.4]] * 3)
    path = plots.write_score_chart([f"adapter{i}" for i in range(6)], scores, torch.rand(6), tmp_path / "s.png")
    width, height = _png_size(path)
    panels = 1 + len(plots.SIGNALS)
    assert width == pytest.approx((2.0 + 2.6 * panels) * plots.DPI, abs=1)
    assert height == pytest.approx((1.2 + 0.32 * 6) * plots.DPI, abs=1)


def test_weight_table_is_a_png_with_one_panel_per_adapter(tmp_path: Path) -> None:
    table = torch.linspace(0, 1, 3 * 5 * 4).reshape(3, 5, 4)
    groups = ["BASE", "IN00", "M00", "OUT00", "OTHER"]
    path = plots.write_weight_table(table, ["a", "b", "c"], groups, tmp_path / "nested" / "w.png")
    width, height = _png_size(path)
    assert width == pytest.approx((2.2 + 2.4 * 3) * plots.DPI, abs=1)
    assert height == pytest.approx((1.5 + 0.16 * 5) * plots.DPI, abs=1)
    with pytest.raises(CompositionError, match="does not match"):
        plots.write_weight_table(table, ["a", "b"], groups, tmp_path / "bad.png")


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
    sizes = {kind: _png_size(Path(path)) for kind, path in expected.items()}
    adapters = len(document["adapters"])
    assert adapters >= 1
    ranked = round((sizes["scores"][1] / plots.DPI - 1.2) / 0.32)
    assert adapters <= ranked <= plots.SCORE_TOP_K
    assert sizes["weights"][0] == pytest.approx((2.2 + 2.4 * adapters) * plots.DPI, abs=1)
    assert sizes["gates"][0] > 0


def test_cli_plot_without_retrieval_writes_only_the_weight_table(library: Path, tmp_path: Path, capsys) -> None:
    plot_dir = tmp_path / "plots"
    code = main(
        [
            *["a knight", "--loras", "pixel_knight:0.9,red_scarf:0@0,1@0.5", "--library", str(library)],
            *["--out", str(tmp_path / "out"), "--plot", str(plot_dir), "--steps", "2"],
        ]
    )
    out = capsys.readouterr().out
    assert code == 0
    assert sorted(p.name for p in plot_dir.iterdir()) == ["0-weights.png"]
    assert f"wrote {plot_dir / '0-weights.png'}" in out
    width, _ = _png_size(plot_dir / "0-weights.png")
    assert width == pytest.approx((2.2 + 2.4 * 2) * plots.DPI, abs=1)
