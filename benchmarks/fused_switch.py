"""Fused adapter switching: our engine vs diffusers' load → fuse → unfuse → delete cycle on the same UNet shapes.

``python -m benchmarks.fused_switch [--quick] [--model small-sd|sd15-shapes] [--device cuda] [--dtype float16]``
builds the denoiser of a preset (``small-sd`` by default; ``sd15-shapes`` gives real SD 1.5 shapes, 5 GB, minutes),
makes rank-32 LoRAs on every attention projection (to_q/to_k/to_v/to_out.0), already in host memory, and times one
serving cycle per adapter:

- ``peer``: diffusers ``unet.load_lora_adapter(state_dict)`` + ``fuse_lora`` + ``unfuse_lora`` + ``delete_adapters``
  (PEFT injects a wrapper per layer, fuses by adding ΔW, unfuses by subtracting it);
- ``ours_cycle``: ``FusionEngine.add_adapter`` + ``fuse`` + ``unfuse`` (pristine copy back) + ``remove_adapter``;
- ``ours_swap``: with all adapters attached, a fused switch to the next adapter (``fuse`` recomputes W + ΔW from the
  pristine copy — what LoRA Switch does every τ steps).

Also reports the peer's drift: max |W − W₀| after its cycles (subtract-to-undo is not exact; ours is 0 by
construction and checked). Prints one JSON document with per-phase milliseconds and ratios.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from benchmarks._common import ATTENTION_PROJECTIONS, peft_state_dict, random_lora
from composer.presets import build_denoiser
from fusion.adapters import Adapter
from fusion.engine import FusionEngine

RANK = 32


def _timed(phases: dict[str, Callable[[], Any]], device: torch.device) -> dict[str, float]:
    """Run the phases in order; milliseconds each."""
    out = {}
    for name, phase in phases.items():
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        phase()
        if device.type == "cuda":
            torch.cuda.synchronize()
        out[name] = (time.perf_counter() - start) * 1000
    return out


def _medians(samples: list[dict[str, float]]) -> dict[str, float]:
    return {key: round(statistics.median(s[key] for s in samples), 3) for key in samples[0]}


def _weights(unet: nn.Module) -> dict[str, torch.Tensor]:
    """Attention projection weights by canonical path (PEFT's ``base_layer`` renaming undone)."""
    return {
        name.replace(".base_layer", "").removesuffix(".weight"): param
        for name, param in unet.named_parameters()
        if name.endswith("weight")
        and "lora_" not in name
        and name.replace(".base_layer", "")[:-7].endswith(ATTENTION_PROJECTIONS)
    }


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and print one JSON document."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="3 adapters, 3 cycles each")
    parser.add_argument("--model", default="small-sd", choices=["small-sd", "sd15-shapes"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    args = parser.parse_args(argv)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    num_adapters, rounds = (3, 3) if args.quick else (5, 10)

    unet = build_denoiser(args.model).to(device, dtype).eval()
    peer_unet = copy.deepcopy(unet)
    adapters = [Adapter(f"a{i}", "sd1", random_lora(unet, i, RANK)) for i in range(num_adapters)]
    peft_states = [peft_state_dict(a.layers, prefix="") for a in adapters]
    original = {k: v.detach().clone() for k, v in _weights(unet).items()}

    # Our cycle and the peer's alternate (each on its own copy of the UNet) so machine load drifts over both alike.
    ours: list[dict[str, float]] = []
    peer: list[dict[str, float]] = []
    engine = FusionEngine(unet, family="sd1")
    with torch.no_grad():
        for _ in range(rounds):
            for adapter, state in zip(adapters, peft_states):
                ours_phases = {
                    "attach": lambda a=adapter: engine.add_adapter(a),
                    "fuse": lambda: engine.fuse([1.0]),
                    "unfuse": engine.unfuse,
                    "detach": lambda a=adapter: engine.remove_adapter(a.name),
                }
                peer_phases = {
                    "attach": lambda a=adapter, s=state: peer_unet.load_lora_adapter(
                        dict(s), adapter_name=a.name, prefix=None
                    ),
                    "fuse": lambda a=adapter: peer_unet.fuse_lora(adapter_names=[a.name]),
                    "unfuse": peer_unet.unfuse_lora,
                    "detach": lambda a=adapter: peer_unet.delete_adapters(a.name),
                }
                ours.append(_timed(ours_phases, device))
                peer.append(_timed(peer_phases, device))
    engine.add_adapters(adapters)
    swaps = []
    eye = torch.eye(num_adapters)
    for r in range(rounds * num_adapters):
        swaps.append(_timed({"swap": lambda r=r: engine.fuse(eye[r % num_adapters])}, device))
    engine.clear()
    ours_drift = max(float((w.detach() - original[k]).abs().max()) for k, w in _weights(unet).items())
    peer_drift = max(float((w.detach() - original[k]).abs().max()) for k, w in _weights(peer_unet).items())

    ours_ms, peer_ms, swap_ms = _medians(ours), _medians(peer), _medians(swaps)
    ours_total, peer_total = sum(ours_ms.values()), sum(peer_ms.values())
    document = {
        "benchmark": "fused_switch",
        "model": args.model,
        "adapters": (
            f"{num_adapters} × rank {RANK} on {', '.join(ATTENTION_PROJECTIONS)} ({len(adapters[0].layers)} layers)"
        ),
        "device": str(device),
        "dtype": args.dtype,
        "torch_threads": torch.get_num_threads(),
        "machine": platform.processor() or platform.machine(),
        "ours_ms": ours_ms,
        "peer_ms": peer_ms,
        "ours_cycle_ms": round(ours_total, 3),
        "peer_cycle_ms": round(peer_total, 3),
        "ours_swap_ms": swap_ms["swap"],
        "peer_vs_ours_cycle": round(peer_total / ours_total, 3),
        "peer_cycle_vs_ours_swap": round(peer_total / swap_ms["swap"], 3),
        "max_weight_drift": {"ours": ours_drift, "peer": peer_drift},
    }
    json.dump(document, sys.stdout, indent=2)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
