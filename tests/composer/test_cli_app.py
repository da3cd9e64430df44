"""`compose app` runs `python -m app` as a child: signals sent to it reach the child, and it exits with the child."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import pytest

REPO = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "PYTHONPATH": str(REPO)}
SLEEPER = "import os, sys, time; open(sys.argv[1], 'w').write(str(os.getpid())); time.sleep(120)"
PARENT = "import sys; from composer.cli.commands.app import run_child; sys.exit(run_child(sys.argv[1:]))"

T = TypeVar("T")

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _wait_for(check: Callable[[], T], timeout: float = 60.0) -> T:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError("timed out")


def _children(pid: int) -> list[int]:
    text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    return [int(part) for part in text.split()]


@pytest.mark.parametrize(("sig", "code"), [(signal.SIGTERM, 128 + signal.SIGTERM), (signal.SIGINT, 130)])
def test_signal_is_forwarded_and_the_exit_code_is_the_childs(tmp_path: Path, sig: int, code: int) -> None:
    pid_file = tmp_path / "child.pid"
    parent = subprocess.Popen(
        [sys.executable, "-c", PARENT, sys.executable, "-c", SLEEPER, str(pid_file)], env=ENV, cwd=REPO
    )
    child = int(_wait_for(lambda: pid_file.exists() and pid_file.read_text()))
    parent.send_signal(sig)
    assert parent.wait(timeout=30) == code
    assert not _alive(child)


def test_child_exit_code_passes_through() -> None:
    parent = subprocess.run([sys.executable, "-c", PARENT, sys.executable, "-c", "raise SystemExit(3)"], env=ENV)
    assert parent.returncode == 3


def test_sigterm_to_compose_app_leaves_no_child(tmp_path: Path) -> None:
    command = [sys.executable, "-m", "composer.cli", "app", "--port", "0", "--out", str(tmp_path / "out")]
    parent = subprocess.Popen(command, env=ENV, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        (child,) = _wait_for(lambda: _children(parent.pid))
        time.sleep(0.5)  # let the child get going (it is importing the app)
        parent.send_signal(signal.SIGTERM)
        assert parent.wait(timeout=30) == 128 + signal.SIGTERM
        _wait_for(lambda: not _alive(child), timeout=10)
    finally:
        if parent.poll() is None:
            parent.kill()
