"""One prepared check on a GPU: the ``gpu`` tests, then ours against diffusers timed in one process, in one table.

``python -m benchmarks.gpu_check [--device cuda] [--quick] [--out out/gpu-check] [--budget-s 480]`` (``make
gpu-check``) runs, each section under its own time budget (a section that runs out is stopped and recorded as
skipped with the reason, so the table is always written):

1. ``tests``: ``pytest -m gpu tests/gpu`` on the device (``LORA_COMPOSER_TEST_DEVICE``): fp16 and bf16 exactness of
   every method against diffusers/PEFT, bit-exact restore, model offload with per-step weights, torch.compile
   without recompiles;
2. on SD-1.5-, SDXL- and FLUX-shaped denoisers with random weights (:mod:`benchmarks._shapes`; 512² for SD 1.5,
   1024² for SDXL and FLUX), ours against the peer in this one process, with each one's peak memory:
   ``per_step`` — k = 5 LoRAs re-weighted every step vs diffusers ``set_adapters`` in a step callback
   (:mod:`benchmarks.per_step_pipeline`); ``static`` — k = 5 fused vs diffusers ``fuse_lora`` (same module);
   ``composite`` — Composite batched vs the reference loop of k passes, k = 4 (:mod:`benchmarks.composite_batched`);
   ``cmlora`` — CMLoRA vs Merge, k = 4 (:mod:`benchmarks.cmlora_speed`); ``gated`` — gated fusion vs Merge,
   k = 3, one denoiser call (:mod:`benchmarks.gated_overhead`); ``shira`` — SHiRA switch vs diffusers
   ``enable_lora_hotswap`` + ``load_lora_weights(hotswap=True)`` (:mod:`benchmarks.shira_switch`);
3. writes ``gpu_check.json`` and ``gpu_check.md`` (device, driver, torch / diffusers / PEFT versions, one table)
   into ``--out``, prints the JSON on stdout (as every benchmark does) and the table, with the ratios, on stderr.

``--quick`` runs the same sections on the tiny test presets at 32² with fewer steps and a smoke subset of the tests,
within a minute on two CPU cores (``--device cpu --quick`` in CI): it proves the script, not the numbers. Peak
memory is ``torch.cuda.max_memory_allocated`` on CUDA and the process's peak resident set on a CPU (the column's
label says which).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import json
import logging
import os
import platform
import re
import signal
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ElementTree
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import diffusers
import peft
import torch

from benchmarks import cmlora_speed, composite_batched, gated_overhead, per_step_pipeline, shira_switch
from benchmarks._common import PeakMemory, denoiser_prefix
from benchmarks._shapes import FAMILIES, FLUX_DEPTH, denoiser_parameters, shaped_pipeline, tiny_pipeline
from composer.presets import preset_family

log = logging.getLogger("benchmarks.gpu_check")

ROOT = Path(__file__).resolve().parents[1]
BUDGET_S = {"full": 470.0, "quick": 50.0}
"""The whole run's wall-clock budget, model builds included (the imports before it take a few seconds more)."""
SECTION_BUDGET_S = {
    "tests": (180, 22),
    "per_step": (60, 6),
    "static": (35, 3),
    "composite": (40, 3),
    "cmlora": (40, 4),
    "gated": (25, 3),
    "shira": (30, 3),
}
"""Each section's budget in seconds (full, quick), scaled with ``--budget-s``; a section also never runs past the
whole run's budget."""
BUILD_BUDGET_S = (40, 5)
"""The model builds' budget in seconds (full, quick), before the timed sections."""
QUICK_TESTS = (
    "tests/gpu/test_half_precision_methods.py::test_per_step_weights_match_set_adapters_in_a_step_callback[bf16]",
    "tests/gpu/test_half_precision_methods.py::"
    "test_shira_fused_weights_are_one_rounding_of_the_fp32_sum_and_switch_in_place_exactly[bf16]",
    "tests/gpu/test_offload_and_compile.py::test_model_offload_with_per_step_weights[bf16]",
)
"""The smoke subset of the gpu tests that ``--quick`` runs (the full set takes minutes on a CPU)."""
QUICK_FAMILIES = {"per_step": ("sd15", "sdxl", "flux"), "shira": ("sd15", "flux")}
"""With ``--quick`` a section runs on these families (every other section on ``sd15`` alone): each family's
pipeline path is exercised once, within the minute."""
TEST_TIMEOUT_S = 90
"""No one gpu test may take longer (pytest-timeout): a stuck compile fails alone instead of eating the section."""
WRITE_RESERVE_S = 3.0
"""Kept back from the last section for writing the outputs."""
TARGETS = {
    "per_step": "ours ≤ 1.10× plain",
    "static": "ours ≤ 1.02× plain",
    "composite": "batched ≤ 1.5× merge",
    "cmlora": "≤ 1.2× merge",
    "gated": "≤ 1.5× merge",
    "shira": "ours ≤ hotswap",
}


BUDGET_SPENT = re.compile(r"budget of \d+ s spent")
"""The message of a :class:`SectionTimeoutError`, as found inside another exception's message."""


class SectionTimeoutError(Exception):
    """Raised inside a section when its time budget is spent."""


@contextlib.contextmanager
def time_limit(seconds: float) -> Iterator[None]:
    """Raise :class:`SectionTimeoutError` in the block after ``seconds`` of wall time (SIGALRM; main thread only)."""

    def expire(_signum: int, _frame: Any) -> None:
        raise SectionTimeoutError(f"budget of {seconds:.0f} s spent")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, max(seconds, 0.01))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


@dataclass
class Workload:
    """What one model family runs at: image size, steps, dtype, extra pipeline arguments."""

    size: int
    steps: int
    dtype: torch.dtype
    extra_call: dict[str, Any] = field(default_factory=dict)


@dataclass
class Context:
    """The run's settings and the base pipelines built so far (one per family, shared by the sections)."""

    device: torch.device
    quick: bool
    repeats: int
    workloads: dict[str, Workload]
    pipelines: dict[str, Any] = field(default_factory=dict)
    build_s: dict[str, float] = field(default_factory=dict)

    def pipeline(self, family: str) -> Any:
        """The family's base pipeline, built on first use (its build time is recorded)."""
        if family not in self.pipelines:
            start = time.perf_counter()
            dtype = self.workloads[family].dtype
            build = tiny_pipeline if self.quick else shaped_pipeline
            self.pipelines[family] = build(family, self.device, dtype)
            _sync(self.device)
            self.build_s[family] = round(time.perf_counter() - start, 2)
        return self.pipelines[family]

    def families(self, section: str) -> tuple[str, ...]:
        """The families ``section`` runs on: all of them, or with ``--quick`` those of :data:`QUICK_FAMILIES`."""
        return QUICK_FAMILIES.get(section, ("sd15",)) if self.quick else FAMILIES

    def copy(self, family: str) -> Any:
        """A pipeline sharing the base's text encoders and VAE with its own copy of the denoiser."""
        base = self.pipeline(family)
        prefix = denoiser_prefix(base)
        return type(base)(**{**base.components, prefix: copy.deepcopy(getattr(base, prefix))})


def workloads(device: torch.device, quick: bool) -> dict[str, Workload]:
    """Sizes, steps and dtypes: 512² / 1024² in fp16 (FLUX in bf16) on a GPU; tiny presets at 32² in fp32 with
    ``--quick`` on a CPU (CPUs have no fast half-precision matmuls, so half would time the conversions)."""
    half = device.type == "cuda"
    if quick:
        dtype = torch.float16 if half else torch.float32
        return {
            "sd15": Workload(32, 2, dtype),
            "sdxl": Workload(32, 2, dtype),
            "flux": Workload(32, 2, torch.bfloat16 if half else dtype, {"max_sequence_length": 16}),
        }
    return {
        "sd15": Workload(512, 10, torch.float16),
        "sdxl": Workload(1024, 8, torch.float16),
        "flux": Workload(1024, 8, torch.bfloat16, {"max_sequence_length": 256}),
    }


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _mib(value: int | None) -> float | None:
    return None if value is None else round(value / 2**20, 1)


# --- sections -----------------------------------------------------------------------------------------------------


def run_tests(ctx: Context, budget_s: float) -> dict[str, Any]:
    """``pytest -m gpu tests/gpu`` on the device in a subprocess; counts, failures and skip reasons from its JUnit
    XML. A run cut off by the budget keeps the outcomes of the tests that finished (read from its verbose output)
    and is recorded as partial."""
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "junit.xml"
        command = [sys.executable, "-m", "pytest", *(QUICK_TESTS if ctx.quick else ["tests/gpu"]), "-m", "gpu", "-v"]
        command += ["-p", "no:cacheprovider", "-W", "ignore", f"--junitxml={report}", f"--timeout={TEST_TIMEOUT_S}"]
        env = {**os.environ, "LORA_COMPOSER_TEST_DEVICE": str(ctx.device)}
        try:
            done = subprocess.run(
                command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=budget_s, check=False
            )
        except subprocess.TimeoutExpired as exc:
            output = exc.stdout.decode(errors="replace") if isinstance(exc.stdout, bytes) else exc.stdout or ""
            return {"cut_off": f"the tests ran past the budget of {budget_s:.0f} s", **_verbose_outcomes(output)}
        if not report.exists():
            return {"exit_code": done.returncode, "error": done.stdout[-2000:] + done.stderr[-2000:]}
        return {"exit_code": done.returncode, "selection": "smoke subset" if ctx.quick else "all", **_junit(report)}


def _verbose_outcomes(output: str) -> dict[str, Any]:
    """Counts and failed test names from ``pytest -v`` lines (``path::name PASSED``) of a run that was cut off."""
    counts = {"passed": 0, "failed": 0, "skipped": 0}
    failures: dict[str, str] = {}
    for line in output.splitlines():
        parts = line.split()
        if len(parts) >= 2 and "::" in parts[0] and parts[1] in ("PASSED", "FAILED", "SKIPPED", "ERROR"):
            outcome = {"PASSED": "passed", "SKIPPED": "skipped"}.get(parts[1], "failed")
            counts[outcome] += 1
            if outcome == "failed":
                failures[parts[0].rsplit("/", 1)[-1]] = "see the test's output"
    return {"selection": "cut off", **counts, "failures": failures, "skip_reasons": {}}


def _junit(report: Path) -> dict[str, Any]:
    """Counts, failures (name: first line of the message) and skip reasons of a JUnit XML report."""
    counts = {"passed": 0, "failed": 0, "skipped": 0}
    failures: dict[str, str] = {}
    skips: dict[str, str] = {}
    for case in ElementTree.parse(report).getroot().iter("testcase"):
        name = f"{case.get('classname', '').rsplit('.', 1)[-1]}::{case.get('name')}"
        problem = case.find("failure")
        if problem is None:
            problem = case.find("error")
        skipped = case.find("skipped")
        if problem is not None:
            counts["failed"] += 1
            failures[name] = (problem.get("message") or "").splitlines()[0][:300] if problem.get("message") else ""
        elif skipped is not None:
            counts["skipped"] += 1
            skips[name] = (skipped.get("message") or "")[:300]
        else:
            counts["passed"] += 1
    return {**counts, "failures": failures, "skip_reasons": skips}


def per_step(ctx: Context, family: str, static: bool = False) -> dict[str, Any]:
    """k = 5: ours vs diffusers vs the plain pipeline (per-step ramps, or static and fused)."""
    work = ctx.workloads[family]
    (row,) = per_step_pipeline.measure(
        ctx.pipeline(family),
        (5,),
        size=work.size,
        steps=work.steps,
        repeats=ctx.repeats,
        static=static,
        extra_call=work.extra_call,
    )
    peaks = row["peak_bytes"]
    return {
        "baseline": "plain pipeline",
        "baseline_ms": row["plain_ms"],
        "ours_ms": row["ours_ms"],
        "peer": "diffusers fuse_lora" if static else "diffusers set_adapters in a step callback",
        "peer_ms": row["diffusers_ms"],
        "ours_vs_baseline": row["ours_vs_plain"],
        "peer_vs_baseline": row["diffusers_vs_plain"],
        "peer_vs_ours": row["diffusers_vs_ours"],
        "peak_mib": {"ours": _mib(peaks["ours"]), "peer": _mib(peaks["diffusers"]), "baseline": _mib(peaks["plain"])},
        "max_abs_diff": row["max_abs_diff"],
        "unit": "ms per generation",
    }


def composite(ctx: Context, family: str) -> dict[str, Any]:
    """k = 4: Composite as one batched pass vs the reference loop (k passes), Merge as the baseline."""
    work = ctx.workloads[family]
    _, (row,) = composite_batched.measure(
        ctx.copy(family), (4,), size=work.size, steps=work.steps, extra_call=work.extra_call
    )
    peaks = row["peak_bytes"]
    return {
        "baseline": "merge (fused)",
        "baseline_ms": row["merge_ms"],
        "ours_ms": row["batched_ms"],
        "peer": "reference loop (k passes)",
        "peer_ms": row["sequential_ms"],
        "ours_vs_baseline": row["batched_over_merge"],
        "peer_vs_baseline": round(row["sequential_ms"] / row["merge_ms"], 3),
        "peer_vs_ours": row["sequential_over_batched"],
        "peak_mib": {
            "ours": _mib(peaks["batched"]),
            "peer": _mib(peaks["sequential"]),
            "baseline": _mib(peaks["merge"]),
        },
        "unit": "ms per denoiser step",
    }


def cmlora(ctx: Context, family: str) -> dict[str, Any]:
    """k = 4: CMLoRA (feature caching on UNets, output caching on FLUX) vs Merge."""
    work = ctx.workloads[family]
    label = "cmlora_output" if family == "flux" else "cmlora_features"
    _, (row,) = cmlora_speed.measure(
        ctx.copy(family),
        (4,),
        size=work.size,
        steps=max(work.steps, 4),
        compositions=("merge", label),
        count_flops=False,
        extra_call=work.extra_call,
    )
    ours, merge = row[label], row["merge"]
    return {
        "baseline": "merge (fused)",
        "baseline_ms": round(1000 * merge["s_per_image"], 1),
        "ours": label,
        "ours_ms": round(1000 * ours["s_per_image"], 1),
        "ours_vs_baseline": ours["over_merge"],
        "cache_hit_rate": ours["cache_hit_rate"],
        "peak_mib": {"ours": _mib(ours["peak_bytes"]), "baseline": _mib(merge["peak_bytes"])},
        "unit": "ms per generation",
    }


def gated(ctx: Context, family: str) -> dict[str, Any]:
    """k = 3: one denoiser call with learned gates (reference init) and in table mode vs Merge (fused)."""
    work = ctx.workloads[family]
    pipe = ctx.pipeline(family)
    denoiser = getattr(pipe, denoiser_prefix(pipe))
    captured: list[tuple[tuple, dict[str, Any]]] = []

    def capture(_module: Any, args: tuple, kwargs: dict[str, Any]) -> None:
        if not captured:
            captured.append((args, dict(kwargs)))

    hook = denoiser.register_forward_pre_hook(capture, with_kwargs=True)
    try:
        with torch.inference_mode():
            pipe(
                "a photo",
                num_inference_steps=1,
                height=work.size,
                width=work.size,
                output_type="latent",
                **work.extra_call,
            )
    finally:
        hook.remove()
    ms, peaks = gated_overhead.measure(denoiser, preset_family(pipe), captured[0], ctx.device, ctx.repeats + 2)
    return {
        "baseline": "merge (fused)",
        "baseline_ms": round(ms["merge"], 2),
        "ours": "gated (learned gates)",
        "ours_ms": round(ms["gated"], 2),
        "ours_vs_baseline": round(ms["gated"] / ms["merge"], 3),
        "table_ms": round(ms["gated_table"], 2),
        "table_vs_baseline": round(ms["gated_table"] / ms["merge"], 3),
        "peak_mib": {"ours": _mib(peaks["gated"]), "baseline": _mib(peaks["merge"])},
        "unit": "ms per denoiser call",
    }


def shira(ctx: Context, family: str) -> dict[str, Any]:
    """SHiRA switch (fused, cached states; and from file) vs diffusers hotswap of a rank-32 LoRA."""
    result = shira_switch.against_hotswap(ctx.copy(family), ctx.repeats + 2)
    peaks = result["peak_bytes"]
    return {
        "ours_ms": result["ours_memory_ms"],
        "ours_file_ms": result["ours_file_ms"],
        "peer": "diffusers hotswap",
        "peer_ms": result["peer_hotswap_ms"],
        "peer_vs_ours": result["peer_hotswap_vs_ours_memory"],
        "peer_vs_ours_file": result["peer_hotswap_vs_ours_file"],
        "restored_bit_exact": result["restored_bit_exact"],
        "peak_mib": {"ours": _mib(peaks["ours_memory_ms"]), "peer": _mib(peaks["peer_hotswap_ms"])},
        "unit": "ms per switch",
    }


FAMILY_SECTIONS: dict[str, Callable[[Context, str], dict[str, Any]]] = {
    "per_step": per_step,
    "static": lambda ctx, family: per_step(ctx, family, static=True),
    "composite": composite,
    "cmlora": cmlora,
    "gated": gated,
    "shira": shira,
}
SECTIONS = ("tests", *FAMILY_SECTIONS)


# --- running ------------------------------------------------------------------------------------------------------


def run_section(name: str, ctx: Context, budget_s: float) -> dict[str, Any]:
    """One section under its budget: ``status`` done / partial / skipped / failed, the reason, per-family results."""
    start = time.perf_counter()
    entry: dict[str, Any] = {"budget_s": round(max(budget_s, 0.0), 1)}
    try:
        if budget_s < 1:
            entry["results"] = {}
            raise SectionTimeoutError("the run's budget is spent")
        if name == "tests":
            entry["results"] = run_tests(ctx, budget_s)
            failed = entry["results"].get("failed", 0) or "error" in entry["results"]
            cut_off = entry["results"].pop("cut_off", None)
            entry["status"] = "failed" if failed else ("partial" if cut_off else "done")
            if cut_off:
                entry["reason"] = cut_off
        else:
            entry["results"] = {}
            entry["skipped"] = {}
            with time_limit(budget_s):
                for family in ctx.families(name):
                    log.info("%s: %s", name, family)
                    entry["results"][family] = FAMILY_SECTIONS[name](ctx, family)
                    _release(ctx.device)
            entry["status"] = "done"
    except Exception as exc:  # the table is written whatever one section does; the error is recorded in it
        if not _spent(exc):
            log.exception("section %s failed", name)
            entry["status"] = "failed"
            entry["reason"] = f"{type(exc).__name__}: {exc}"[:500]
        else:
            _record_timeout(entry, name, exc, ctx.families(name))
    if name != "tests":
        left_out = {family: "not run with --quick" for family in FAMILIES if family not in ctx.families(name)}
        entry["skipped"] = entry.get("skipped", {}) | left_out
    if not entry.get("skipped"):
        entry.pop("skipped", None)
    if budget_s >= 1:
        _release(ctx.device)
    entry["wall_s"] = round(time.perf_counter() - start, 2)
    return entry


def _spent(exc: BaseException | None) -> bool:
    """Whether ``exc`` is, or was raised while handling, a :class:`SectionTimeoutError` (libraries wrap it; torch's
    ``load_state_dict`` folds it into its own message without chaining it)."""
    while exc is not None:
        if isinstance(exc, SectionTimeoutError) or BUDGET_SPENT.search(str(exc)):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def _record_timeout(entry: dict[str, Any], name: str, exc: BaseException, families: tuple[str, ...]) -> None:
    """Mark ``entry`` partial or skipped with the budget's reason; the families left undone are listed."""
    cause: BaseException | None = exc
    while cause is not None and not isinstance(cause, SectionTimeoutError):
        cause = cause.__cause__ or cause.__context__
    reason = str(cause)
    entry["status"] = "partial" if entry.get("results") else "skipped"
    entry["reason"] = reason
    if name != "tests":
        entry["skipped"] = {family: reason for family in families if family not in entry["results"]}


def build_models(ctx: Context, budget_s: float) -> dict[str, Any]:
    """Build every family's base pipeline before the timed sections, under its own budget."""
    start = time.perf_counter()
    entry: dict[str, Any] = {"budget_s": round(budget_s, 1), "status": "done"}
    try:
        with time_limit(budget_s):
            for family in sorted({f for name in FAMILY_SECTIONS for f in ctx.families(name)}, key=FAMILIES.index):
                ctx.pipeline(family)
    except Exception as exc:
        if not _spent(exc):
            raise
        entry |= {"status": "partial", "reason": f"model builds ran past {budget_s:.0f} s"}
    entry["build_s"] = dict(ctx.build_s)
    entry["wall_s"] = round(time.perf_counter() - start, 2)
    return entry


def _release(device: torch.device) -> None:
    """Hand a finished section's CUDA memory back to the driver; on the CPU reference counting already freed it (a
    full collection there costs about half a second and frees nothing)."""
    if device.type == "cuda":
        gc.collect()
        torch.cuda.empty_cache()


def hardware(device: torch.device) -> dict[str, Any]:
    """Device, driver and library versions for the report."""
    info: dict[str, Any] = {
        "device": str(device),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "peft": peft.__version__,
        "python": platform.python_version(),
        "cpu": platform.processor() or platform.machine(),
        "cpu_threads": torch.get_num_threads(),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
        info["driver"] = _nvidia_driver()
    else:
        info["gpu"] = None
    return info


def _nvidia_driver() -> str | None:
    try:
        done = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout.strip().splitlines()[0] if done.returncode == 0 and done.stdout.strip() else None


def run(
    device: torch.device, quick: bool, budget_s: float | None = None, sections: tuple[str, ...] = SECTIONS
) -> dict[str, Any]:
    """Run the sections in order within the budget; return the JSON document."""
    mode = "quick" if quick else "full"
    budget_s = budget_s or BUDGET_S[mode]
    start = time.perf_counter()
    ctx = Context(device, quick, 1 if quick else 3, workloads(device, quick))
    scale = budget_s / BUDGET_S[mode]
    results: dict[str, Any] = {}
    for name in sections:
        if name in FAMILY_SECTIONS and "builds" not in results:  # after the tests: they run in their own process
            left = budget_s - (time.perf_counter() - start) - WRITE_RESERVE_S
            results["builds"] = build_models(ctx, min(scale * BUILD_BUDGET_S[1 if quick else 0], max(left, 0.0)))
        left = budget_s - (time.perf_counter() - start) - WRITE_RESERVE_S
        share = scale * SECTION_BUDGET_S[name][1 if quick else 0]
        log.info("section %s (budget %.0f s, %.0f s left)", name, max(min(share, left), 0), max(left, 0))
        results[name] = run_section(name, ctx, min(share, left))
    return {
        "benchmark": "gpu_check",
        "mode": mode,
        "hardware": hardware(device),
        "peak_memory": PeakMemory(device).label,
        "models": {
            family: {
                "denoiser": "tiny test preset" if quick else _shape_label(family),
                "parameters": denoiser_parameters(ctx.pipelines[family]) if family in ctx.pipelines else None,
                "size": work.size,
                "steps": work.steps,
                "dtype": str(work.dtype).removeprefix("torch."),
                "build_s": ctx.build_s.get(family),
            }
            for family, work in ctx.workloads.items()
        },
        "budget_s": budget_s,
        "wall_s": round(time.perf_counter() - start, 2),
        "targets": TARGETS,
        "sections": results,
    }


def _shape_label(family: str) -> str:
    return {
        "sd15": "SD 1.5 UNet shapes",
        "sdxl": "SDXL base UNet shapes",
        "flux": f"FLUX.1 widths, {FLUX_DEPTH[0]} double + {FLUX_DEPTH[1]} single blocks",
    }[family]


# --- the table ----------------------------------------------------------------------------------------------------


def _cell(value: Any) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 100 else f"{value:.0f}"
    return str(value)


def markdown(document: dict[str, Any]) -> str:
    """The report as Markdown: hardware line, the tests' outcome, one row per section and model."""
    hw = document["hardware"]
    where = hw["gpu"] or f"CPU ({hw['cpu']}, {hw['cpu_threads']} torch threads)"
    lines = [
        f"**{'GPU check' if document['mode'] == 'full' else 'GPU check, CPU quick run'}** on {where}"
        + (f", driver {hw['driver']}, CUDA {hw['cuda']}" if hw.get("gpu") else "")
        + f"; torch {hw['torch']}, diffusers {hw['diffusers']}, PEFT {hw['peft']}; "
        f"{document['wall_s']:.0f} s of a {document['budget_s']:.0f} s budget. Peak memory: {document['peak_memory']}.",
        "",
    ]
    tests = document["sections"].get("tests")
    if tests is not None:
        lines += [_tests_line(tests), ""]
    builds = document["sections"].get("builds")
    if builds is not None:
        built = ", ".join(f"{family} {seconds:.1f} s" for family, seconds in builds["build_s"].items())
        lines += [f"Model builds ({builds['status']}): {built or 'none'}.", ""]
    lines += [
        "| Check | Model | Baseline | Ours | Peer | Ours ÷ baseline | Peer ÷ ours | Peak MiB ours / peer | Target |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, section in document["sections"].items():
        if name not in FAMILY_SECTIONS:
            continue
        for family in FAMILIES:
            model = document["models"][family]
            label = f"{family} {model['size']}² {model['dtype']}"
            result = section.get("results", {}).get(family)
            if result is None:
                reason = section.get("skipped", {}).get(family) or section.get("reason") or section["status"]
                status = "not run" if reason == "not run with --quick" else section["status"]
                lines.append(f"| {name} | {label} | {status}: {reason} | | | | | | {TARGETS[name]} |")
                continue
            peak = result["peak_mib"]
            baseline = f"{result['baseline']} {_cell(result['baseline_ms'])}" if "baseline" in result else "—"
            peer = f"{result['peer']} {_cell(result['peer_ms'])}" if "peer" in result else "—"
            cells = [
                name,
                label,
                baseline,
                f"{result.get('ours', 'ours')} {_cell(result['ours_ms'])}",
                peer,
                _cell(result.get("ours_vs_baseline")),
                _cell(result.get("peer_vs_ours")),
                f"{_cell(peak.get('ours'))} / {_cell(peak.get('peer'))}",
                TARGETS[name],
            ]
            lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Times in ms: " + "; ".join(f"{name}: {_unit(document, name)}" for name in FAMILY_SECTIONS) + "."]
    return "\n".join(lines) + "\n"


def _unit(document: dict[str, Any], name: str) -> str:
    results = document["sections"].get(name, {}).get("results", {})
    return next((r["unit"] for r in results.values() if isinstance(r, dict) and "unit" in r), "not measured")


def _tests_line(tests: dict[str, Any]) -> str:
    results = tests.get("results", {})
    if tests["status"] == "skipped" or "passed" not in results:
        return f"gpu tests: {tests['status']} ({tests.get('reason') or results.get('error', '')[:200]})"
    line = (
        f"gpu tests ({results['selection']}): {results['passed']} passed, {results['failed']} failed, "
        f"{results['skipped']} skipped in {tests['wall_s']:.0f} s"
    )
    if tests.get("reason"):
        line += f" ({tests['reason']})"
    if results["failures"]:
        line += "; failed: " + "; ".join(f"`{k}` ({v})" for k, v in results["failures"].items())
    reasons = sorted(set(results["skip_reasons"].values()))
    if reasons:
        line += "; skipped because: " + "; ".join(reasons)
    return line + "."


def main(argv: list[str] | None = None) -> int:
    """Parse the flags, run, write the JSON and Markdown; print the JSON (stdout, as every benchmark) and the table
    (stderr). Exit 1 when a section or a gpu test failed."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="tiny presets, fewer steps, a smoke subset of the tests")
    parser.add_argument("--out", type=Path, default=ROOT / "out" / "gpu-check", help="folder for the JSON and table")
    parser.add_argument(
        "--budget-s",
        type=float,
        default=None,
        help="the whole run's budget (470 s; 50 s quick); sections scale with it",
    )
    parser.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    diffusers.utils.logging.set_verbosity_error()  # per-load notices would bury the progress lines and the table
    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(min(torch.get_num_threads(), 2))
    document = run(device, args.quick, args.budget_s, tuple(args.sections))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gpu_check.json").write_text(json.dumps(document, indent=2) + "\n")
    table = markdown(document)
    (args.out / "gpu_check.md").write_text(table)
    json.dump(document, sys.stdout, indent=2)
    sys.stdout.write("\n")
    sys.stderr.write("\n" + table)
    return 1 if any(section["status"] == "failed" for section in document["sections"].values()) else 0


if __name__ == "__main__":
    sys.exit(main())
