"""Twelve concurrent API requests with different adapter sets each get exactly the image their composition gives
alone."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from composer.service import CompositionService

STEPS = 1
NAMES = [
    "corgi_astronaut",
    "pixel_knight",
    "red_scarf",
    "film_grain",
    "watercolor",
    "neon_city",
    "mossy_forest",
    "golden_teapot",
]


def _adapter_sets() -> list[list[list[object]]]:
    """12 distinct editor tables: singles, pairs and triples with varied weights, block weights, a schedule and an
    unconditional share."""
    singles = [[[name, 1.0, "", "", "", ""]] for name in NAMES[:4]]
    pairs = [[[a, 0.7, "", "", "", ""], [b, 0.9, "", "", "", ""]] for a, b in itertools.pairwise(NAMES[4:])]
    triples = [
        [[NAMES[0], 0.5, "", "", "", ""], [NAMES[4], 0.8, "", "OUTALL", "", ""], [NAMES[5], 1.0, "", "", "", ""]],
        [[NAMES[1], 1.2, "", "", "", ""], [NAMES[3], 0.6, "", "", "", ""], [NAMES[6], 0.9, "", "", "", ""]],
        [[NAMES[2], 0.8, "", "", "", ""], [NAMES[7], 1.0, "0@0,1@0.5", "", "", ""]],
        [[NAMES[0], 1.5, "", "", "", ""], [NAMES[7], 1.5, "", "", "", ""]],
        [[NAMES[4], 1.0, "", "", "0.5", ""]],
    ]
    return singles + pairs + triples


def _pixels(path: str | Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


@pytest.mark.slow
def test_concurrent_requests_each_get_their_own_composition(
    running_app, api_client, demo_library: Path, tmp_path: Path
) -> None:
    from app.compose_tab import EDITOR_HEADERS, adapter_requests

    tables = _adapter_sets()
    assert len(tables) == 12
    prompts = [f"a test scene number {i}" for i in range(len(tables))]

    alone = CompositionService("tiny-sd", demo_library, out=tmp_path / "alone")
    expected = [
        np.asarray(alone.compose(prompt, adapter_requests(rows), steps=STEPS, seed=7).images[0].convert("RGB"))
        for prompt, rows in zip(prompts, tables)
    ]
    assert len({e.tobytes() for e in expected}) == len(expected), "adapter sets must give distinguishable images"

    # one client with every job in flight at once (its pool sends them concurrently); on a busy 2-core machine wait
    # for the server as long as it needs (httpx's 5 s default is a speed limit, not a correctness check)
    client = api_client(running_app.url, download_files=str(tmp_path / "client"), httpx_kwargs={"timeout": 300})
    jobs = [
        client.submit(
            prompts[index],
            "manual",
            {"headers": EDITOR_HEADERS, "data": tables[index]},
            "merge",
            STEPS,
            7,
            1,
            1.0,
            api_name="/generate",
        )
        for index in range(len(tables))
    ]
    received = []
    for index, job in enumerate(jobs):
        gallery, why, _ = job.result(timeout=300)
        assert [row[0] for row in why["data"]] == [row[0] for row in tables[index]]
        received.append(_pixels(gallery[0]["image"]))

    for index, (got, want) in enumerate(zip(received, expected)):
        assert np.array_equal(got, want), f"request {index} got another composition's image"
