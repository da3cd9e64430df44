"""Gated fusion overhead: time per denoiser step of gated k=3 vs Merge on the ``small-sd`` UNet.

``python -m benchmarks.gated_overhead [--quick] [--device cuda] [--dtype float16]`` builds the ``small-sd`` UNet
(block_out_channels (64, 128, 256), cross-attention 768), gives it k = 3 rank-16 LoRAs on every attention projection,
and times one CFG-batched UNet forward (batch 2, 16×16 latents = 128² images) for:

- ``base``: the bare UNet;
- ``merge``: Merge at 0.8 each, fused (what a static composition costs: the base);
- ``merge_unfused``: Merge with ``fuse=False`` (the per-step-reweightable weighted sum);
- ``gated``: learned gates (reference init, timestep input) on every adapted layer — per layer the base output,
  every adapter's own output in one batched op, two LayerNorms and the gate;
- ``gated_table``: the training-free table mode (a weighted sum looked up per step).

Each runs on its own copy of the UNet, timed round-robin (median of ``repeats`` rounds, after a warm-up round).
Prints one JSON document with the ratios to Merge. Target: gated ≤ 1.5× Merge.
"""

from __future__ import annotations

import copy
import platform
import sys
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from benchmarks._common import (
    ATTENTION_PROJECTIONS,
    PeakMemory,
    device_benchmark_main,
    interleaved_ms,
    random_lora,
)
from composer.presets import load_preset
from fusion.adapters import Adapter
from fusion.engine import FusionEngine
from fusion.strategies import get_strategy
from fusion.strategies.gated import initial_gates

RANK = 16
K = 3


def measure(
    base: nn.Module,
    family: str,
    inputs: tuple[tuple, dict[str, Any]],
    device: torch.device,
    repeats: int,
) -> tuple[dict[str, float], dict[str, int]]:
    """(ms per denoiser call, peak memory bytes) of ``base`` and of each configuration on its own copy of it, the
    denoiser called on ``inputs`` (positional and keyword arguments, as the pipeline passes them)."""
    adapters = [Adapter(f"a{i}", family, random_lora(base, i, RANK)) for i in range(K)]
    weights = {adapter.name: 0.8 for adapter in adapters}
    configs = {
        "merge": ("merge", {}),
        "merge_unfused": ("merge", {"fuse": False}),
        "gated": ("gated", {}),
        "gated_table": ("gated", {"mode": "table"}),
    }
    denoisers: dict[str, nn.Module] = {"base": base}
    engines = []
    for name, (method, options) in configs.items():
        denoiser = copy.deepcopy(base)
        engine = FusionEngine(denoiser, family=family)
        engine.add_adapters(adapters)
        if name == "gated":
            options = {"gates": initial_gates(engine)}
        engine.set_strategy(get_strategy(method)(weights, **options))
        engines.append(engine)
        denoisers[name] = denoiser
    args, kwargs = inputs

    def forward(denoiser: nn.Module) -> Callable[[], Any]:
        def call() -> None:
            with torch.inference_mode():
                denoiser(*args, **kwargs)

        return call

    peaks: dict[str, int] = {}
    ms = interleaved_ms({name: forward(d) for name, d in denoisers.items()}, repeats, device, peaks)
    for engine in engines:
        engine.clear()
    return ms, peaks


def run(quick: bool, device: torch.device, dtype: torch.dtype, repeats: int | None) -> dict[str, Any]:
    """Build the UNets, time every configuration, return the JSON document."""
    repeats = repeats or (5 if quick else 15)
    base = load_preset("small-sd").unet.to(device, dtype)
    g = torch.Generator().manual_seed(0)
    sample = torch.randn(2, 4, 16, 16, generator=g).to(device, dtype)
    text = torch.randn(2, 77, base.config.cross_attention_dim, generator=g).to(device, dtype)
    ms, peaks = measure(base, "sd1", ((sample, torch.tensor(500, device=device), text), {}), device, repeats)
    merge = ms["merge"]
    return {
        "benchmark": "gated_overhead",
        "model": "small-sd UNet, batch 2, 16x16 latents",
        "adapters": f"k={K}, rank {RANK} on {', '.join(ATTENTION_PROJECTIONS)}",
        "device": str(device),
        "dtype": str(dtype).removeprefix("torch."),
        "torch_threads": torch.get_num_threads(),
        "machine": platform.processor() or platform.machine(),
        "repeats": repeats,
        "ms_per_step": {name: round(value, 3) for name, value in ms.items()},
        "ratio_to_merge": {name: round(value / merge, 3) for name, value in ms.items()},
        "peak_bytes": peaks,
        "peak_memory": PeakMemory(device).label,
        "target": "gated <= 1.5x merge",
        "meets_target": ms["gated"] <= 1.5 * merge,
    }


def main(argv: list[str] | None = None) -> int:
    """Parse the flags and print one JSON document."""
    return device_benchmark_main(__doc__.splitlines()[0], "fewer repeats", run, argv)


if __name__ == "__main__":
    sys.exit(main())
