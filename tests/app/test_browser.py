"""The app in a real browser: headless Chromium fills a prompt, clicks Generate and waits for the image.

The screenshot is kept as a test artifact in ``tests/artifacts/`` (git-ignored by its own ``.gitignore``).
Skipped only when no Chromium is installed (`.ci/run` installs Debian's).
"""

from __future__ import annotations

from pathlib import Path

import pytest
from devtools_pipe import Browser, find_chromium

ARTIFACTS = Path(__file__).resolve().parents[1] / "artifacts"
PROMPT = "crgastro walking through a neon city at night"

pytestmark = [pytest.mark.browser, pytest.mark.slow]


@pytest.fixture
def browser(tmp_path: Path):
    """Headless Chromium with a fresh profile."""
    executable = find_chromium()
    if executable is None:
        pytest.skip("no chromium on PATH (apt-get install chromium)")
    chromium = Browser(executable, tmp_path / "profile")
    yield chromium
    chromium.close()


def _artifact_dir() -> Path:
    ARTIFACTS.mkdir(exist_ok=True)
    ignore = ARTIFACTS / ".gitignore"
    if not ignore.exists():
        ignore.write_text("*\n")
    return ARTIFACTS


def test_generate_in_browser_shows_image_and_why_table(running_app, browser: Browser) -> None:
    browser.navigate(running_app.url)
    browser.wait_for("document.querySelector('#prompt textarea') !== null")
    browser.evaluate("document.querySelector('#prompt textarea').focus()")
    browser.type_text(PROMPT)
    assert browser.evaluate("document.querySelector('#prompt textarea').value") == PROMPT
    browser.wait_for("document.querySelector('#generate') !== null")
    browser.evaluate("document.querySelector('#generate').click()")

    source = browser.wait_for(
        "(() => { const img = document.querySelector('#gallery img');"
        " return img && img.complete && img.naturalWidth > 0 ? img.getAttribute('src') : null; })()",
        timeout=120,
    )
    browser.wait_for("document.querySelector('#why').innerText.includes('corgi_astronaut')")
    shot = browser.screenshot(_artifact_dir() / "app_compose.png")

    assert "/gradio_api/file=" in source
    assert browser.evaluate("document.querySelector('#gallery img').naturalWidth") == 64
    why = browser.evaluate("document.querySelector('#why').innerText")
    assert "neon_city" in why
    assert "trigger word in prompt" in why
    summary = browser.evaluate("document.querySelector('#summary').innerText")
    assert "Prompt used" in summary
    assert PROMPT in summary
    assert shot.stat().st_size > 10_000
