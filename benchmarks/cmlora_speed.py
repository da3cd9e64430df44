"""CMLoRA vs LoRA Composite (sequential and batched) vs Merge: time per image, full vs cached passes, FLOPs.

``python -m benchmarks.cmlora_speed [--quick]`` builds the ``small-sd`` preset (``tiny-sd`` with ``--quick``),
attaches k rank-16 LoRAs on every attention projection, and for k = 2…5 generates one image (latents, CFG batch of
2, 20 steps at 128²; ``--quick``: 8 steps at 64², k in (2, 4)) under each composition in this one process:

- ``merge``: Merge, fused — the floor;
- ``composite_sequential`` / ``composite_batched``: Composite as published (k passes per step) and as one batched pass;
- ``cmlora_features``: CMLoRA with DeepCache-style feature caching (``cache="features"``);
- ``cmlora_output``: CMLoRA with output-level caching (the DiT path; full passes fused).

For CMLoRA it reports full and cached passes, the cache hit rate (cached / all adapter passes), and the FLOPs and time
saved against Composite. FLOPs are counted with ``torch.utils.flop_counter`` once per k for one full pass (fused and
unfused), one feature-cached pass and one fuse, then multiplied by the pass counts of the generation. Times are the best
of two generations after a warm-up generation, single-threaded on CPU by default (``--threads``). One JSON
document; the target is CMLoRA at k = 4 within 1.4× Merge.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

from benchmarks._common import PeakMemory, denoiser_prefix, random_lora
from composer.mixin import make_composable
from composer.presets import load_preset, preset_family
from fusion.adapters import Adapter
from fusion.feature_cache import UNetFeatureCache

RANK = 16
REPEATS = 2
"""Timed generations per composition; the fastest counts (other processes on a shared machine only add time)."""
PROMPT = "a corgi astronaut"


def _generate(pipe: Any, size: int, steps: int, extra_call: dict[str, Any] | None = None) -> float:
    """Seconds for one generation (denoising to latents)."""
    device = getattr(pipe, denoiser_prefix(pipe)).device
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    with torch.inference_mode():
        pipe(
            PROMPT,
            num_inference_steps=steps,
            height=size,
            width=size,
            output_type="latent",
            generator=torch.Generator().manual_seed(0),
            **(extra_call or {}),
        )
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def _flops(fn: Any) -> int:
    with FlopCounterMode(display=False) as counter, torch.inference_mode():
        fn()
    return int(counter.get_total_flops())


def _pass_flops(pipe: Any, weights: dict[str, float], size: int) -> dict[str, int]:
    """FLOPs of one denoiser call: fused (base), unfused (k adapters attached), feature-cached; and of one fuse."""
    captured: list[tuple[tuple, dict]] = []
    hook = pipe.unet.register_forward_pre_hook(
        lambda _m, args, kwargs: captured.append((args, dict(kwargs))) if not captured else None, with_kwargs=True
    )
    pipe.set_composition(weights, method="merge")
    _generate(pipe, size, 1)
    hook.remove()
    args, kwargs = captured[0]
    unet = pipe.unet
    counts = {"fused_pass": _flops(lambda: unet(*args, **kwargs))}
    pipe.set_composition(weights, method="merge", fuse=False)
    counts["unfused_pass"] = _flops(lambda: unet(*args, **kwargs))
    cache = UNetFeatureCache(unet)
    with torch.inference_mode():
        _, feature = cache.full(lambda: unet(*args, **kwargs))
    counts["cached_pass"] = _flops(lambda: cache.shallow(lambda: unet(*args, **kwargs), feature))
    counts["fuse"] = _fuse_flops(pipe.composition_engine)
    return counts


def _fuse_flops(engine: Any) -> int:
    """FLOPs of one fuse: per composed layer one GEMM up_cat (out×R) · down_cat (R×in) added into the weight (the
    flop counter does not see in-place ``addmm_``)."""
    total = 0
    for layer in engine.layers.values():
        if layer.rank:
            total += 2 * layer.up_cat.shape[0] * layer.down_cat[0].numel() * layer.rank
    return total


COMPOSITIONS = ("merge", "composite_sequential", "composite_batched", "cmlora_features", "cmlora_output")
"""Every composition this benchmark can time, by label."""


def measure(
    pipe: Any,
    ks: tuple[int, ...],
    *,
    size: int,
    steps: int,
    compositions: tuple[str, ...] = COMPOSITIONS,
    count_flops: bool = True,
    extra_call: dict[str, Any] | None = None,
) -> tuple[float, list[dict[str, Any]]]:
    """(base seconds per image, one row per k) with k rank-16 LoRAs attached to ``pipe`` (made composable in
    place): each composition's seconds per image (best of two after a warm-up), its ratio to Merge and its peak
    memory; with ``count_flops`` (UNets only) the pass FLOPs and the savings against Composite."""
    pipe = make_composable(pipe)
    pipe.set_progress_bar_config(disable=True)
    denoiser = getattr(pipe, denoiser_prefix(pipe))
    memory = PeakMemory(denoiser.device)
    for i in range(max(ks)):
        pipe.add_adapter(Adapter(f"a{i}", preset_family(pipe), random_lora(denoiser, i, RANK)))
    _generate(pipe, size, steps, extra_call)  # warm-up
    base_s = _generate(pipe, size, steps, extra_call)
    options_of = {
        "merge": ("merge", {}),
        "composite_sequential": ("composite", {"mode": "sequential"}),
        "composite_batched": ("composite", {"mode": "batched"}),
        "cmlora_features": ("cmlora", {"cache": "features"}),
        "cmlora_output": ("cmlora", {"cache": "output"}),
    }
    results = []
    for k in ks:
        weights = {f"a{i}": 0.8 for i in range(k)}
        delta_h = {f"a{i}": 0.1 * (k - i) - 0.15 for i in range(k)}  # a0…a(k-2) in H, the last in L
        flops = _pass_flops(pipe, weights, size) if count_flops else None
        row: dict[str, Any] = {"k": k} | ({"flops_per_pass": flops} if flops else {})
        for label in compositions:
            method, options = options_of[label]
            if method == "cmlora":
                options = {**options, "delta_h": delta_h}
            pipe.set_composition(weights, method=method, **options)
            _generate(pipe, size, steps, extra_call)  # warm-up of this composition
            memory.reset()
            seconds = min(_generate(pipe, size, steps, extra_call) for _ in range(REPEATS))
            entry: dict[str, Any] = {"s_per_image": round(seconds, 3), "peak_bytes": memory.peak_bytes()}
            if method == "cmlora":
                strategy = pipe.composition_strategy
                full, cached = sum(strategy.full_passes.values()), sum(strategy.cached_passes.values())
                entry.update(
                    full_passes=full,
                    cached_passes=cached,
                    full_passes_per_adapter=dict(strategy.full_passes),
                    fuses=strategy.fuses,
                    cache_hit_rate=round(cached / (full + cached), 3),
                )
                if flops:
                    cached_cost = flops["cached_pass"] if options["cache"] == "features" else 0
                    full_cost = flops["fused_pass"] if strategy.runs_fused else flops["unfused_pass"]
                    total = full * full_cost + cached * cached_cost + strategy.fuses * flops["fuse"]
                    entry["gflops"] = round(total / 1e9, 2)
            elif method == "composite":
                entry["full_passes"] = k * steps
                if flops:
                    entry["gflops"] = round(k * steps * flops["unfused_pass"] / 1e9, 2)
            else:
                entry["full_passes"] = steps
                if flops:
                    entry["gflops"] = round(steps * flops["fused_pass"] / 1e9, 2)
            row[label] = entry
        merge_s = row["merge"]["s_per_image"]
        for label in compositions:
            if label != "merge":
                row[label]["over_merge"] = round(row[label]["s_per_image"] / merge_s, 2)
        for label in ("cmlora_features", "cmlora_output"):
            if label not in compositions:
                continue
            for versus in ("composite_sequential", "composite_batched"):
                if versus in compositions:
                    row[label][f"time_saved_vs_{versus}"] = round(
                        1 - row[label]["s_per_image"] / row[versus]["s_per_image"], 3
                    )
            if flops and "composite_sequential" in compositions:
                composite = row["composite_sequential"]
                row[label]["flops_saved_vs_composite"] = round(1 - row[label]["gflops"] / composite["gflops"], 3)
        results.append(row)
    pipe.clear_composition()
    return base_s, results


def run(quick: bool, device: str | None, threads: int | None = 1) -> dict[str, Any]:
    """Time every composition for each k and return the JSON document (CPU: ``threads`` torch threads)."""
    if threads:
        torch.set_num_threads(threads)
    preset = "tiny-sd" if quick else "small-sd"
    size, steps = (64, 8) if quick else (128, 20)
    ks = (2, 4) if quick else (2, 3, 4, 5)
    target = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = torch.float16 if target.type == "cuda" else torch.float32
    pipe = load_preset(preset, torch_dtype=dtype, device=target)
    base_s, results = measure(pipe, ks, size=size, steps=steps)
    at4 = next((r for r in results if r["k"] == 4), None)
    return {
        "benchmark": "cmlora_speed",
        "preset": preset,
        "size": size,
        "steps": steps,
        "cfg_batch": 2,
        "rank": RANK,
        "device": str(target),
        "dtype": str(dtype).replace("torch.", ""),
        "gpu": torch.cuda.get_device_name(target) if target.type == "cuda" else None,
        "torch_threads": torch.get_num_threads(),
        "machine": platform.processor() or platform.machine(),
        "base_s_per_image": round(base_s, 3),
        "results": results,
        "peak_memory": PeakMemory(target).label,
        "target": "cmlora at k=4 <= 1.4x merge (reference composite ~4x)",
        "k4_over_merge": None
        if at4 is None
        else {
            label: at4[label]["over_merge"] for label in ("cmlora_features", "cmlora_output", "composite_sequential")
        },
    }


def main(argv: list[str] | None = None) -> int:
    """Parse options and print one JSON document."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny preset, 8 steps at 64², k in (2, 4)")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch CPU threads (default 1: stable timings on a shared machine)"
    )
    args = parser.parse_args(argv)
    json.dump(run(args.quick, args.device, args.threads), sys.stdout, indent=2)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
