"""The single-file checkpoint loading benchmark refuses a run count below one before it writes or loads anything."""

from __future__ import annotations

import pytest

from benchmarks import checkpoint_load


def test_repeats_below_one_are_refused(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as caught:
        checkpoint_load.main(["--quick", "--repeats", "0"])
    assert caught.value.code == 2
    assert "at least 1" in capsys.readouterr().err
