"""A seeded, bounded run of the fuzz campaign's route variants against the served app: every answer is a refusal
or a file the app may serve, never bytes from outside the library or from the catalog."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import OUTSIDE_TEXT

from benchmarks import fuzz


@pytest.mark.slow
def test_route_variants_never_read_outside(running_app, demo_library: Path, http_client) -> None:
    secret = demo_library.parent / "outside" / "secret.png"
    catalog = (demo_library / ".lora-composer" / "catalog.sqlite").read_bytes()[:100]
    forbidden = [OUTSIDE_TEXT.encode(), catalog, Path("/etc/passwd").read_bytes()[:64]]
    targets = fuzz.route_variants(120, 77, demo_library, running_app.service.out, secret)
    results = [
        fuzz.classify("routes", t, lambda t=t: fuzz.run_route(http_client, running_app.url, t, forbidden))
        for t in targets
    ]
    assert [r for r in results if r.outcome in fuzz.BAD_OUTCOMES] == []
    assert any(r.outcome == "ok" for r in results)


def test_editor_requests_naming_files_are_refused(running_app, demo_library: Path) -> None:
    secret = demo_library.parent / "outside" / "secret.png"
    names = [str(secret), "../outside/secret.png", "character/../../outside/secret.png", "/etc/passwd", "~/x"]
    results = [
        fuzz.classify("routes", n, lambda n=n: fuzz.run_editor_request(running_app.service, n, [secret.name]))
        for n in names
    ]
    assert {r.outcome for r in results} == {"typed error"}
