"""The history lint (``.ci/history_lint.py``, run by ``make lint``) fails on a planted history sentence and passes
plain product text."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

LINT = Path(__file__).resolve().parents[2] / ".ci" / "history_lint.py"

# Assembled from parts so that this file itself stays clean for the lint.
ORDINAL_ROUND = "Measured in the twenty-fir" + "st session on the CPU machine."
PLANTED = [
    ORDINAL_ROUND,
    "Made on branch `stage" + "19`.",
    "Targets (CPU, issue " + "15): the switch.",
    "Measured 2026-" + "11-26 on an idle machine.",
    "Before " + "→ now: merge 62% → 79%.",
    "These numbers super" + "sede the loaded ones.",
    "The judge was fine-tuned in earlier " + "sessions.",
]


def _lint(tmp_path: Path, text: str) -> subprocess.CompletedProcess[str]:
    path = tmp_path / "README.md"
    path.write_text(f"# LoRA Composer\n\nComposes LoRA adapters.\n{text}\n", encoding="utf-8")
    return subprocess.run([sys.executable, str(LINT), str(path)], capture_output=True, text=True, check=False)


@pytest.mark.parametrize("sentence", PLANTED)
def test_a_planted_history_sentence_fails_the_lint(tmp_path: Path, sentence: str) -> None:
    result = _lint(tmp_path, sentence)
    assert result.returncode == 1
    assert "README.md:4:" in result.stdout  # the planted line, named by its number


def test_product_text_passes_the_lint(tmp_path: Path) -> None:
    text = (
        "Stage 1 draws the dominant adapter from H; the app runs in its own session; seed 2026 is a held-out set;\n"
        "merge reaches 89% at k = 2 (docs/benchmarks.md)."
    )
    result = _lint(tmp_path, text)
    assert result.returncode == 0, result.stdout
    assert result.stdout == ""
