"""The GPU check's bookkeeping, without models: section budgets stop a section and record why, errors are recorded
instead of stopping the run, the JUnit report is read, and the table is written whatever the sections did."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
import torch

from benchmarks import gpu_check
from benchmarks.gpu_check import Context, SectionTimeoutError, markdown, run_section, time_limit, workloads


def _context(quick: bool = False) -> Context:
    device = torch.device("cpu")
    return Context(device, quick, 1, workloads(device, quick))


def _result(ms: float) -> dict[str, Any]:
    return {
        "baseline": "plain pipeline",
        "baseline_ms": ms,
        "ours_ms": ms * 1.05,
        "peer": "diffusers",
        "peer_ms": ms * 1.5,
        "ours_vs_baseline": 1.05,
        "peer_vs_ours": 1.43,
        "peak_mib": {"ours": 10.0, "peer": 12.0},
        "unit": "ms per generation",
    }


def _spin_forever() -> None:
    while True:
        pass


@pytest.mark.timeout(120, method="thread")  # a guard only: without the interrupt the block never ends
def test_time_limit_interrupts_a_busy_block() -> None:
    with time_limit(0.2), pytest.raises(SectionTimeoutError, match="budget of 0 s"):
        _spin_forever()


def test_a_section_out_of_budget_keeps_what_it_finished_and_names_what_it_skipped(monkeypatch) -> None:
    finished: list[str] = []

    def slow_for_sdxl(_ctx: Context, family: str) -> dict[str, Any]:
        if family == "sdxl":
            time.sleep(10)
        finished.append(family)
        return _result(100.0)

    monkeypatch.setitem(gpu_check.FAMILY_SECTIONS, "per_step", slow_for_sdxl)
    entry = run_section("per_step", _context(), budget_s=1.0)
    assert entry["status"] == "partial"
    assert list(entry["results"]) == ["sd15"]
    assert set(entry["skipped"]) == {"sdxl", "flux"}
    assert "budget of 1 s spent" in entry["skipped"]["sdxl"]
    assert finished == ["sd15"]  # the budget cut the sdxl sleep short; flux never started


def test_a_timeout_wrapped_by_a_library_counts_as_the_budget_not_a_failure(monkeypatch) -> None:
    def wrapping(_ctx: Context, _family: str) -> dict[str, Any]:
        try:
            raise SectionTimeoutError("budget of 3 s spent")
        except SectionTimeoutError as exc:
            raise RuntimeError("could not load the cached preset") from exc

    monkeypatch.setitem(gpu_check.FAMILY_SECTIONS, "gated", wrapping)
    entry = run_section("gated", _context(), budget_s=30.0)
    assert entry["status"] == "skipped"
    assert entry["reason"] == "budget of 3 s spent"


def test_an_error_is_recorded_and_the_table_still_written(monkeypatch) -> None:
    def broken(_ctx: Context, family: str) -> dict[str, Any]:
        if family == "flux":
            raise ValueError("no such layer")
        return _result(50.0)

    monkeypatch.setitem(gpu_check.FAMILY_SECTIONS, "static", broken)
    ctx = _context(quick=True)
    sections = {
        "static": run_section("static", ctx, budget_s=30.0),
        "shira": run_section("shira", ctx, budget_s=0.0),
    }
    assert sections["static"]["status"] == "done", "quick runs static on sd15 alone"
    assert sections["static"]["skipped"]["flux"] == "not run with --quick"
    assert sections["shira"]["status"] == "skipped"
    monkeypatch.setattr(gpu_check, "QUICK_FAMILIES", {"static": ("sd15", "flux")})
    failed = run_section("static", ctx, budget_s=30.0)
    assert failed["status"] == "failed"
    assert failed["reason"] == "ValueError: no such layer"
    assert list(failed["results"]) == ["sd15"]

    document = {
        "mode": "quick",
        "hardware": gpu_check.hardware(ctx.device),
        "peak_memory": "process peak RSS",
        "models": {family: {"size": w.size, "dtype": "float32"} for family, w in ctx.workloads.items()},
        "wall_s": 12.0,
        "budget_s": 50.0,
        "sections": {"static": failed, "shira": sections["shira"]},
    }
    table = markdown(document)
    assert (
        "| static | sd15 32² float32 | plain pipeline 50 | ours 52.5 | diffusers 75 | 1.05 | 1.43 | 10 / 12 |" in table
    )
    assert "| static | flux 32² float32 | failed: ValueError: no such layer |" in table
    assert "| shira | sd15 32² float32 | skipped: the run's budget is spent |" in table
    assert "| shira | sdxl 32² float32 | not run: not run with --quick |" in table
    assert "CPU quick run" in table


def test_junit_report_counts_failures_and_skip_reasons(tmp_path: Path) -> None:
    report = tmp_path / "junit.xml"
    report.write_text(
        """<testsuites><testsuite>
        <testcase classname="tests.gpu.test_a" name="test_ok[bf16]"/>
        <testcase classname="tests.gpu.test_a" name="test_bad[fp16]"><failure message="ours 3e-2 from fp32&#10;more"/>
        </testcase>
        <testcase classname="tests.gpu.test_b" name="test_half[fp16]"><skipped message="no fp16 conv2d on cpu"/>
        </testcase>
        </testsuite></testsuites>"""
    )
    parsed = gpu_check._junit(report)
    assert (parsed["passed"], parsed["failed"], parsed["skipped"]) == (1, 1, 1)
    assert parsed["failures"] == {"test_a::test_bad[fp16]": "ours 3e-2 from fp32"}
    assert parsed["skip_reasons"] == {"test_b::test_half[fp16]": "no fp16 conv2d on cpu"}


def test_a_test_run_cut_off_keeps_the_outcomes_it_printed() -> None:
    output = """tests/gpu/test_a.py::test_ok[bf16] PASSED          [ 10%]
tests/gpu/test_a.py::test_bad[fp16] FAILED         [ 20%]
tests/gpu/test_b.py::test_half[fp16] SKIPPED (no fp16)  [ 30%]
tests/gpu/test_b.py::test_compile[fp16]"""
    parsed = gpu_check._verbose_outcomes(output)
    assert (parsed["passed"], parsed["failed"], parsed["skipped"]) == (1, 1, 1)
    assert list(parsed["failures"]) == ["test_a.py::test_bad[fp16]"]


def test_a_budget_spent_inside_load_state_dict_is_a_timeout_not_a_failure() -> None:
    from benchmarks.gpu_check import SectionTimeoutError, _spent

    # torch's load_state_dict folds an exception raised while copying a tensor into its own message, unchained
    wrapped = RuntimeError(
        'Error(s) in loading state_dict for FluxTransformer2DModel:\n\tWhile copying the parameter named "w", '
        f"an exception occurred : ({str(SectionTimeoutError('budget of 6 s spent'))!r},)."
    )
    assert _spent(wrapped)
    assert not _spent(RuntimeError("Error(s) in loading state_dict: size mismatch"))
