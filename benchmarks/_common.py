"""Fixtures the benchmarks share: seeded random LoRAs on a denoiser's attention projections, in our form and PEFT's."""

from __future__ import annotations

import resource
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fusion.adapters import LowRank

ATTENTION_PROJECTIONS = ("to_q", "to_k", "to_v", "to_out.0")


def cpu_hardware(threads: int) -> str:
    """The ``hardware`` line of a CPU benchmark's JSON: how many torch threads it ran on."""
    return f"CPU, {threads} torch thread{'s' if threads > 1 else ''}"


def random_lora(denoiser: nn.Module, seed: int, rank: int, scale: float = 0.01) -> dict[str, LowRank]:
    """A rank-``rank`` LoRA with seeded random factors on every attention projection (``Adapter.layers`` form)."""
    generator = torch.Generator().manual_seed(seed)
    layers = {}
    for name, module in denoiser.named_modules():
        if isinstance(module, nn.Linear) and name.endswith(ATTENTION_PROJECTIONS):
            down = torch.randn(rank, module.in_features, generator=generator) * scale
            up = torch.randn(module.out_features, rank, generator=generator) * scale
            layers[name] = LowRank(down=down, up=up)
    return layers


def peft_state_dict(layers: dict[str, LowRank], prefix: str = "unet.") -> dict[str, torch.Tensor]:
    """The same factors as a diffusers/PEFT LoRA state dict (what ``load_lora_weights`` takes)."""
    state = {f"{prefix}{key}.lora_A.weight": update.down.clone() for key, update in layers.items()}
    state |= {f"{prefix}{key}.lora_B.weight": update.up.clone() for key, update in layers.items()}
    return state


def denoiser_prefix(pipe: Any) -> str:
    """The pipeline's denoiser attribute (``transformer`` for Flux, else ``unet``): the prefix of its LoRA keys."""
    return "transformer" if getattr(pipe, "transformer", None) is not None else "unet"


class PeakMemory:
    """Peak memory of one call: ``torch.cuda.max_memory_allocated`` on CUDA; on Linux CPUs the process's peak
    resident set (VmHWM, reset through ``/proc/self/clear_refs`` before the call), else the process's lifetime
    maximum RSS. ``label`` says which was measured."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._proc = Path("/proc/self/status")
        if device.type == "cuda":
            self.label = "torch.cuda.max_memory_allocated"
        elif sys.platform.startswith("linux") and self._proc.exists() and self._can_reset():
            self.label = "process peak RSS (VmHWM, reset per call)"
        else:
            self.label = "process max RSS since start (ru_maxrss)"

    def _can_reset(self) -> bool:
        try:
            Path("/proc/self/clear_refs").write_text("5")
        except OSError:
            return False
        return True

    def reset(self) -> None:
        """Start a new peak."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        elif self.label.startswith("process peak RSS"):
            Path("/proc/self/clear_refs").write_text("5")

    def peak_bytes(self) -> int:
        """The peak since the last :meth:`reset`."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            return int(torch.cuda.max_memory_allocated(self.device))
        if self.label.startswith("process peak RSS"):
            for line in self._proc.read_text().splitlines():
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
        return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def interleaved_ms(
    runs: dict[str, Callable[[], Any]],
    repeats: int,
    device: torch.device,
    peaks: dict[str, int] | None = None,
) -> dict[str, float]:
    """Median wall time in ms of each run, timed round-robin (one call of each per round, after a warm-up round) so
    that load on the machine drifts over all of them alike; CUDA work is synchronised around each call.

    With ``peaks``, each run's peak memory over its calls (:class:`PeakMemory`, bytes) is written into it.
    """
    times: dict[str, list[float]] = {name: [] for name in runs}
    memory = PeakMemory(device) if peaks is not None else None
    for round_index in range(repeats + 1):
        for name, run in runs.items():
            if memory is not None:
                memory.reset()
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            run()
            if device.type == "cuda":
                torch.cuda.synchronize()
            if round_index:
                times[name].append((time.perf_counter() - start) * 1000)
            if memory is not None and peaks is not None:
                peaks[name] = max(peaks.get(name, 0), memory.peak_bytes())
    return {name: statistics.median(values) for name, values in times.items()}


def device_benchmark_main(
    description: str, quick_help: str, run: Callable[[bool, torch.device, torch.dtype, int | None], dict], argv: Any
) -> int:
    """The command line of a benchmark taking ``--quick --device --dtype --repeats``: runs it, prints its JSON."""
    import argparse
    import json
    import sys

    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--quick", action="store_true", help=quick_help)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--repeats", type=int, default=None)
    args = parser.parse_args(argv)
    document = run(args.quick, torch.device(args.device), getattr(torch, args.dtype), args.repeats)
    json.dump(document, sys.stdout, indent=2)
    sys.stdout.write("\n")
    return 0
