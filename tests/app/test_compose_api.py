"""The Compose tab's ``/generate`` endpoint: the unconditional-share slider reaches the composition."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image


def test_generate_with_the_unconditional_share_slider(running_app, api_client, tmp_path: Path) -> None:
    from app.compose_tab import EDITOR_HEADERS

    client = api_client(running_app.url, download_files=str(tmp_path))
    table = {"headers": EDITOR_HEADERS, "data": [["corgi_astronaut", 0.8, "", "", "", ""]]}
    outputs = {}
    for share in (1.0, 0.0, 0.5):
        gallery, _, summary = client.predict(
            "a corgi on the moon", "manual", table, "merge", 2, 3, 1, share, api_name="/generate"
        )
        outputs[share] = (gallery[0], summary)
    assert "(conditional branch)" in outputs[0.0][1]
    assert "(conditional branch)" not in outputs[1.0][1]
    assert outputs[0.0][0]["caption"].endswith("merge (conditional branch)")
    assert outputs[0.5][0]["caption"].endswith("merge (unconditional share 0.5)")
    images = {}
    for share, (shown, _) in outputs.items():
        with Image.open(shown["image"]) as image:
            images[share] = image.convert("RGB").tobytes()
    assert len(set(images.values())) == 3


def test_model_switching_is_no_public_endpoint(running_app, api_client) -> None:
    """The model picker is a UI control only: switching models is not offered on the public API."""
    client = api_client(running_app.url)
    endpoints = client.view_api(print_info=False, return_format="dict")["named_endpoints"]
    assert "/generate" in endpoints
    assert "/model" not in endpoints


def test_the_summary_names_what_the_cap_left_out(running_app, api_client) -> None:
    """An automatic pick capped at one adapter says in the summary which named adapter it left out and how to keep
    it."""
    from app.compose_tab import EDITOR_HEADERS

    client = api_client(running_app.url)
    empty = {"headers": EDITOR_HEADERS, "data": []}
    _, why, summary = client.predict(
        "crgastro wearing a redscarf", "auto", empty, "merge", 2, 3, 1, 1.0, 1, api_name="/generate"
    )
    chosen = [row[0] for row in why["data"] if row[2] != "left out"]
    left = [row[0] for row in why["data"] if row[2] == "left out"]
    assert len(chosen) == 1
    assert len(left) == 1
    assert {*chosen, *left} == {"corgi_astronaut", "red_scarf"}
    assert f"**Left out:** `{left[0]}`" in summary
    assert "raise 'Most adapters' to include it" in summary


def test_a_refused_request_reaches_the_client_as_its_error(running_app, api_client) -> None:
    """A request the composer refuses (an empty prompt) comes back as the composer's message, not a bare failure."""
    from gradio_client.exceptions import AppError

    from app.compose_tab import EDITOR_HEADERS

    client = api_client(running_app.url)
    empty = {"headers": EDITOR_HEADERS, "data": []}
    with pytest.raises(AppError, match="the prompt is empty"):
        client.predict("", "auto", empty, "merge", 2, 3, 1, 1.0, 1, api_name="/generate")
