"""Run the scripts in ``examples/`` as a user does, inside the test process: the script's own folder first on
``sys.path`` for the run only (as ``python examples/SCRIPT.py`` puts it), nothing of it left behind afterwards."""

from __future__ import annotations

import runpy
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
EXAMPLE_MODULES = ("make_library",)
"""Modules of ``examples/`` that the scripts import from each other (dropped after each run)."""


def run_example(script: str, args: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """Run ``examples/<script> ARGS`` as ``__main__`` (its prints go to the caller's ``capsys``)."""
    monkeypatch.setattr(sys, "argv", [str(EXAMPLES / script), *args])
    monkeypatch.syspath_prepend(str(EXAMPLES))
    try:
        runpy.run_path(str(EXAMPLES / script), run_name="__main__")
    finally:
        for name in EXAMPLE_MODULES:
            sys.modules.pop(name, None)


def build_example_library(out: Path) -> Path:
    """Write the demo library of ``examples/make_library.py`` for tiny-sd into ``out`` (the script's own
    ``build_library``, run from its file: nothing is imported from ``examples/``)."""
    script = runpy.run_path(str(EXAMPLES / "make_library.py"), run_name="make_library")
    script["build_library"](out)
    return out
