"""The Compose tab's ``/generate`` endpoint: the conditional-branch checkbox reaches the composition."""

from __future__ import annotations

from pathlib import Path

from gradio_client import Client
from PIL import Image

from app.compose_tab import EDITOR_HEADERS


def test_generate_with_the_conditional_branch_checkbox(running_app, tmp_path: Path) -> None:
    client = Client(running_app.url, verbose=False, download_files=str(tmp_path))
    table = {"headers": EDITOR_HEADERS, "data": [["corgi_astronaut", 0.8, "", "", "", ""]]}
    outputs = {}
    for conditional in (False, True):
        gallery, _, summary = client.predict(
            "a corgi on the moon", "manual", table, "merge", 2, 3, 1, conditional, api_name="/generate"
        )
        outputs[conditional] = (gallery[0], summary)
    assert "(conditional branch)" in outputs[True][1]
    assert "(conditional branch)" not in outputs[False][1]
    assert outputs[True][0]["caption"].endswith("merge (conditional branch)")
    with Image.open(outputs[True][0]["image"]) as cond, Image.open(outputs[False][0]["image"]) as both:
        assert cond.convert("RGB").tobytes() != both.convert("RGB").tobytes()
