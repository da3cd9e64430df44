"""LoRA Composite: reference sequential (k denoiser passes) vs ours batched (one pass, per-sample gates) vs Merge.

``python -m benchmarks.composite_batched [--quick]`` builds the ``small-sd`` preset (``tiny-sd`` with ``--quick``),
attaches k rank-16 LoRAs on every attention projection, and for k = 2…5 times one denoiser step (the CFG batch of
2, at 128² or 64² with ``--quick``) under three compositions in this one process:

- ``merge``: Merge, fused — the cost of the base model, the floor;
- ``sequential``: Composite as published, k passes per step;
- ``batched``: Composite as one forward on the batch repeated k times.

A step's time is measured around the denoiser call (forward hooks), median over the steps of a generation after
a warm-up generation. Prints one JSON document with ms per step and the ratios; the target is batched at k = 4
within 1.6× Merge. Absolute times and that target are for a GPU (CUDA, fp16 by default there), where a k-times
batch costs far less than k passes; on CPU only the ratios are meaningful.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from typing import Any

import torch
from torch import nn

from benchmarks._common import PeakMemory, denoiser_prefix, random_lora
from composer.mixin import make_composable
from composer.presets import load_preset, preset_family
from fusion.adapters import Adapter

RANK = 16


class _StepTimer:
    """Wall time of every denoiser call (around the strategy, so it includes all of Composite's passes)."""

    def __init__(self, module: nn.Module, device: torch.device) -> None:
        self.device = device
        self.times: list[float] = []
        self._start = 0.0
        self._hooks = [
            module.register_forward_pre_hook(lambda *_: self._begin()),
            module.register_forward_hook(lambda *_: self._end()),
        ]

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _begin(self) -> None:
        self._sync()
        self._start = time.perf_counter()

    def _end(self) -> None:
        self._sync()
        self.times.append(time.perf_counter() - self._start)

    def remove(self) -> None:
        for hook in self._hooks:
            hook.remove()


def _step_ms(pipe: Any, size: int, steps: int, extra_call: dict[str, Any] | None = None) -> float:
    """Median ms per denoiser call over one generation, after a warm-up generation."""
    kwargs = {"num_inference_steps": steps, "height": size, "width": size, "output_type": "latent"}
    kwargs |= extra_call or {}
    denoiser = getattr(pipe, denoiser_prefix(pipe))
    device = denoiser.device
    with torch.inference_mode():
        pipe("a corgi astronaut", generator=torch.Generator().manual_seed(0), **kwargs)
        timer = _StepTimer(denoiser, device)
        try:
            pipe("a corgi astronaut", generator=torch.Generator().manual_seed(0), **kwargs)
        finally:
            timer.remove()
    times = sorted(timer.times)
    return 1000.0 * times[len(times) // 2]


def measure(
    pipe: Any, ks: tuple[int, ...], *, size: int, steps: int, extra_call: dict[str, Any] | None = None
) -> tuple[float, list[dict[str, Any]]]:
    """(base ms per step, one row per k: merge / sequential / batched ms per step, their ratios and each one's peak
    memory) with k rank-16 LoRAs attached to ``pipe`` (made composable in place)."""
    pipe = make_composable(pipe)
    pipe.set_progress_bar_config(disable=True)
    denoiser = getattr(pipe, denoiser_prefix(pipe))
    memory = PeakMemory(denoiser.device)
    for i in range(max(ks)):
        pipe.add_adapter(Adapter(f"a{i}", preset_family(pipe), random_lora(denoiser, i, RANK)))
    base_ms = _step_ms(pipe, size, steps, extra_call)
    results = []
    for k in ks:
        weights = {f"a{i}": 0.8 for i in range(k)}
        row: dict[str, Any] = {"k": k, "peak_bytes": {}}
        for label, method, options in (
            ("merge", "merge", {}),
            ("sequential", "composite", {"mode": "sequential"}),
            ("batched", "composite", {"mode": "batched"}),
        ):
            pipe.set_composition(weights, method=method, **options)
            memory.reset()
            row[f"{label}_ms"] = round(_step_ms(pipe, size, steps, extra_call), 2)
            row["peak_bytes"][label] = memory.peak_bytes()
        row["batched_over_merge"] = round(row["batched_ms"] / row["merge_ms"], 2)
        row["sequential_over_batched"] = round(row["sequential_ms"] / row["batched_ms"], 2)
        results.append(row)
    pipe.clear_composition()
    return base_ms, results


def run(quick: bool, device: str | None) -> dict[str, Any]:
    """Time the three compositions for each k and return the JSON document."""
    preset = "tiny-sd" if quick else "small-sd"
    size, steps = (64, 3) if quick else (128, 4)
    ks = (2, 4) if quick else (2, 3, 4, 5)
    target = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = torch.float16 if target.type == "cuda" else torch.float32
    base_ms, results = measure(load_preset(preset, torch_dtype=dtype, device=target), ks, size=size, steps=steps)
    return {
        "benchmark": "composite_batched",
        "preset": preset,
        "size": size,
        "cfg_batch": 2,
        "rank": RANK,
        "device": str(target),
        "dtype": str(dtype).replace("torch.", ""),
        "gpu": torch.cuda.get_device_name(target) if target.type == "cuda" else None,
        "torch_threads": torch.get_num_threads(),
        "machine": platform.processor() or platform.machine(),
        "base_ms": round(base_ms, 2),
        "results": results,
        "peak_memory": PeakMemory(target).label,
        "target": "batched at k=4 <= 1.6x merge (GPU)",
    }


def main(argv: list[str] | None = None) -> int:
    """Parse options and print one JSON document."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny preset at 64², k in (2, 4): a few seconds")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    args = parser.parse_args(argv)
    json.dump(run(args.quick, args.device), sys.stdout, indent=2)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
