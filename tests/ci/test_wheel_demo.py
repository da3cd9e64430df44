"""The packaging check (``.ci/wheel_demo.sh``) removes the work folder it made itself, pass or fail: each run writes
about 2 GB (a virtualenv with torch), and left behind they fill the disk that later runs share."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / ".ci" / "wheel_demo.sh"


def _failing_python(tmp_path: Path) -> tuple[Path, Path]:
    """An interpreter stand-in that writes down the arguments it was given, then fails."""
    calls = tmp_path / "calls.txt"
    fake = tmp_path / "fake-python"
    fake.write_text(f'#!/usr/bin/env bash\necho "$@" >> "{calls}"\nexit 1\n', encoding="utf-8")
    fake.chmod(0o755)
    return fake, calls


def _work_folder(calls: Path) -> Path:
    words = calls.read_text(encoding="utf-8").split()
    return Path(words[words.index("--wheel-dir") + 1]).parent


def test_a_work_folder_of_its_own_making_is_removed_when_the_check_fails(tmp_path: Path) -> None:
    fake, calls = _failing_python(tmp_path)
    env = {**os.environ, "PYTHON": str(fake), "TMPDIR": str(tmp_path)}
    result = subprocess.run(["bash", str(SCRIPT)], env=env, capture_output=True, text=True, check=False)
    assert result.returncode != 0
    work = _work_folder(calls)
    assert work.name.startswith("lora-composer-wheel.")
    assert not work.exists()


def test_a_work_folder_named_by_the_caller_is_kept(tmp_path: Path) -> None:
    fake, calls = _failing_python(tmp_path)
    named = tmp_path / "kept"
    env = {**os.environ, "PYTHON": str(fake)}
    result = subprocess.run(["bash", str(SCRIPT), str(named)], env=env, capture_output=True, text=True, check=False)
    assert result.returncode != 0
    assert _work_folder(calls) == named
    assert named.is_dir()
