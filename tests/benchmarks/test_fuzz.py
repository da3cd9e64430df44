"""A seeded, bounded run of the fuzz campaign's file and command-line generators (``benchmarks/fuzz.py``; ``make
fuzz`` runs the long campaign with other seeds): no traceback, hang or NaN image, and every bad file a typed row."""

from __future__ import annotations

import random
from collections import Counter
from pathlib import Path

from benchmarks import fuzz


def _bad(results: list[fuzz.Outcome]) -> list[fuzz.Outcome]:
    return [r for r in results if r.outcome in fuzz.BAD_OUTCOMES]


def test_mutated_files_are_typed_rows_or_compose_finite(tmp_path: Path, tiny_sd: object) -> None:
    from composer import make_composable

    pipe = make_composable(tiny_sd)
    pipe.set_progress_bar_config(disable=True)
    rng = random.Random(20261206)
    results = []
    for index in range(36):
        label, path = fuzz.make_file_case(tmp_path / f"f{index}", rng)
        results.append(fuzz.classify("files", label, lambda path=path: fuzz.run_file_case(path, pipe)))
    assert _bad(results) == []
    counts = Counter(r.outcome for r in results)
    assert counts["typed error"] > 0
    assert counts["ok"] > 0


def test_command_lines_exit_cleanly(tmp_path: Path) -> None:
    cases = [
        case
        for case in fuzz.cli_cases(60, 424242, tmp_path)
        if fuzz.PARSE_ONLY in case[1] or case[0].startswith(("index", "judge", "export", "convert"))
    ]
    results = [fuzz.classify("cli", label, lambda argv=argv: fuzz.run_cli_case(argv)) for label, argv in cases]
    assert len(results) >= 20
    assert _bad(results) == []
