"""``compose -v/-q``: the packages' loggers report at the chosen level on stderr, before or after the subcommand, and
a bare prompt still runs ``generate`` behind the flags."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest

from composer.cli import main
from composer.cli.verbosity import PACKAGES, level_for


@pytest.fixture(autouse=True)
def _restore_package_loggers() -> Any:
    """Put the packages' loggers back as they were, so the levels set here do not leak into other tests."""
    saved = {name: (logging.getLogger(name).level, list(logging.getLogger(name).handlers)) for name in PACKAGES}
    yield
    for name, (level, handlers) in saved.items():
        logger = logging.getLogger(name)
        logger.setLevel(level)
        logger.handlers[:] = handlers


def test_verbosity_levels() -> None:
    assert level_for(0, 0) == logging.WARNING
    assert level_for(1, 0) == logging.INFO
    assert level_for(2, 0) == logging.DEBUG
    assert level_for(5, 0) == logging.DEBUG
    assert level_for(0, 1) == logging.ERROR
    assert level_for(0, 3) == logging.ERROR


@pytest.mark.parametrize(
    ("flags_before", "flags_after", "level"),
    [([], [], logging.WARNING), (["-v"], [], logging.INFO), ([], ["-vv"], logging.DEBUG), (["-q"], [], logging.ERROR)],
)
def test_flags_set_every_package_logger(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], flags_before: list[str], flags_after: list[str], level: int
) -> None:
    assert main([*flags_before, "index", str(tmp_path), "--json", *flags_after]) == 0
    assert {logging.getLogger(name).level for name in PACKAGES} == {level}
    capsys.readouterr()
    logging.getLogger("retrieval.retriever").info("a progress note")
    logging.getLogger("composer.facade").warning("a warning")
    err = capsys.readouterr().err
    assert ("a progress note" in err) == (level <= logging.INFO)
    assert ("a warning" in err) == (level <= logging.WARNING)


def test_one_handler_however_often_the_command_runs(tmp_path: Path) -> None:
    main(["index", str(tmp_path), "--json"])
    main(["-v", "index", str(tmp_path), "--json"])
    assert len([h for h in logging.getLogger("composer").handlers if h.get_name() == "compose-cli"]) == 1


def test_a_bare_prompt_after_the_flags_runs_generate(monkeypatch: pytest.MonkeyPatch, capsys: Any) -> None:
    import composer.facade

    seen: dict[str, Any] = {}

    class Recorder:
        def __init__(self, model: str, library: Path | None, **options: Any) -> None:
            seen["model"] = model

        def run(self, prompt: str, **options: Any) -> Any:
            seen["prompt"] = prompt
            return type("Result", (), {"as_dict": lambda self: {"prompt": prompt}})()

    monkeypatch.setattr(composer.facade, "Composer", Recorder)
    assert main(["-v", "a red circle in the snow", "--json"]) == 0
    assert seen["prompt"] == "a red circle in the snow"
    assert '"a red circle in the snow"' in capsys.readouterr().out
