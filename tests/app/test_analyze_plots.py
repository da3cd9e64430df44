"""The Analyze tab over HTTP: the retrieval score chart beside the score table, and a composition's weight table,
gate heatmap and retrieval chart drawn by `composer.analysis.plots`."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image


def _size(path: str | Path) -> tuple[int, int]:
    with Image.open(path) as image:
        assert image.format == "PNG"
        return image.size


def test_score_chart_of_ranked_hits(running_app) -> None:
    from app.analyze_tab import score_chart

    hits = running_app.service.rank("a corgi astronaut", k=5)
    path = score_chart(running_app.service, hits)
    assert path.is_relative_to(running_app.service.out)
    height = _size(path)[1]
    assert len(hits) >= 2
    assert _size(score_chart(running_app.service, hits[:1]))[1] < height, "one row per ranked adapter"


def test_plots_endpoint_draws_gates_weights_and_scores(running_app, api_client, tmp_path: Path) -> None:
    client = api_client(running_app.url, download_files=str(tmp_path))
    image, weights, gates, scores = client.predict("a corgi astronaut on the moon", [], "gated", 2, api_name="/plots")
    assert _size(image) == (64, 64)
    assert all(_size(p)[0] > 200 for p in (weights, gates, scores))

    widths = []
    for adapters in (["pixel_knight"], ["pixel_knight", "red_scarf"]):
        image, weights, gates, scores = client.predict("a knight", adapters, "merge", 2, api_name="/plots")
        assert gates is None
        assert scores is None
        widths.append(_size(weights)[0])
    assert widths[0] < widths[1], "one weight-table panel per composed adapter"


@pytest.mark.slow
def test_spectra_endpoint_scores_the_library_and_draws_profiles(running_app, api_client, tmp_path: Path) -> None:
    client = api_client(running_app.url, download_files=str(tmp_path))
    table, summary, profiles = client.predict("a quiet room", 2, api_name="/spectra")
    rows = {row[0]: row for row in table["data"]}
    scored = [row for row in rows.values() if row[1] is not None]
    assert len(scored) >= 6
    assert all(row[2] in ("H", "L") for row in scored)
    assert _size(summary)[0] > 200
    assert len(profiles) == len(scored)
    library = running_app.service._require_library()
    stored = library.get(scored[0][0]).scores["delta_h"]
    assert stored == float(scored[0][1])
