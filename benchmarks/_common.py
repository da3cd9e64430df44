"""Fixtures the benchmarks share: seeded random LoRAs on a denoiser's attention projections, in our form and PEFT's."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
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


def interleaved_ms(runs: dict[str, Callable[[], Any]], repeats: int, device: torch.device) -> dict[str, float]:
    """Median wall time in ms of each run, timed round-robin (one call of each per round, after a warm-up round) so
    that load on the machine drifts over all of them alike; CUDA work is synchronised around each call."""
    times: dict[str, list[float]] = {name: [] for name in runs}
    for round_index in range(repeats + 1):
        for name, run in runs.items():
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            run()
            if device.type == "cuda":
                torch.cuda.synchronize()
            if round_index:
                times[name].append((time.perf_counter() - start) * 1000)
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
