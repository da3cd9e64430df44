"""The suite's shared fixtures also work in a plain pytest run with the xdist plugin off (``pytest -p no:xdist``),
where xdist's own fixtures, such as ``worker_id``, do not exist."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_a_run_without_xdist_sets_up_the_autouse_fixtures(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_XDIST")}
    command = [sys.executable, "-m", "pytest", "-p", "no:xdist", "-p", "no:cacheprovider", "-q"]
    command += ["--basetemp", str(tmp_path / "run"), "tests/composer/test_prompts.py::test_named_options"]
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert "1 passed" in result.stdout
