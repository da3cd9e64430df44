"""Unfused forward cost with k adapters: our composed layers vs PEFT (diffusers ``load_lora_weights`` +
``set_adapters``), each as a ratio to the bare UNet.

``python -m benchmarks.unfused_forward [--quick] [--device cuda] [--dtype float16]`` builds the ``small-sd`` UNet
(block_out_channels (64, 128, 256), cross-attention 768), gives it k rank-16 LoRAs on every attention projection
(to_q/to_k/to_v/to_out.0), and times one CFG-batched UNet forward (batch 2, 128² image) for k = 1, 3, 5, 10, 20
(1 and 5 with ``--quick``). Ours runs all k adapters as one pair of matmuls per layer (factors concatenated along
rank, a gate per column); PEFT runs one LoRA branch per adapter per layer. Targets: ours ≤ 1.15× base at k = 5 and
≤ 1.35× at k = 20 (PEFT measured 1.52× / 2.92× on the reference CPU).
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import platform
import sys
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from benchmarks._common import ATTENTION_PROJECTIONS, interleaved_ms, peft_state_dict, random_lora
from composer.presets import load_preset
from fusion.adapters import Adapter
from fusion.engine import FusionEngine
from fusion.strategies import get_strategy

RANK = 16


def _resident_bytes(device: torch.device) -> int:
    """Bytes in use now: CUDA allocations on a GPU, the process's resident set on the CPU (Linux)."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        return torch.cuda.memory_allocated(device)
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _memory_row(
    base_unet: nn.Module,
    adapters: list[Adapter],
    forward: Callable[[nn.Module], Callable[[], Any]],
    device: torch.device,
) -> dict[str, Any]:
    """What attaching ``adapters`` costs beyond their own bytes: unfused (after two forwards, so any cached merged
    weights exist), then fused (pristine copies of the touched weights), then cleared."""
    unet = copy.deepcopy(base_unet)
    touched = {key for adapter in adapters for key in adapter.layers}
    weight_bytes = sum(
        module.weight.numel() * module.weight.element_size() for name, module in unet.named_modules() if name in touched
    )
    start = _resident_bytes(device)
    engine = FusionEngine(unet, family="sd1")
    engine.add_adapters(adapters)
    engine.set_strategy(get_strategy("merge")({a.name: 0.8 for a in adapters}, fuse=False))
    for _ in range(2):
        forward(unet)()
    unfused = _resident_bytes(device)
    engine.fuse([0.8] * len(adapters))
    fused = _resident_bytes(device)
    engine.clear()
    cleared = _resident_bytes(device)
    mb = 1e6
    return {
        "k": len(adapters),
        "adapter_mb": round(sum(a.nbytes for a in adapters) / mb, 2),
        "touched_weights_mb": round(weight_bytes / mb, 2),
        "attached_unfused_mb": round((unfused - start) / mb, 2),
        "fused_extra_mb": round((fused - unfused) / mb, 2),
        "after_clear_mb": round((cleared - start) / mb, 2),
    }


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and print one JSON document."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="k = 1 and 5 only, fewer repeats")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--repeats", type=int, default=None)
    args = parser.parse_args(argv)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    ks = (1, 5) if args.quick else (1, 3, 5, 10, 20)
    repeats = args.repeats or (5 if args.quick else 15)

    pipe = load_preset("small-sd")
    pipe.to(device, dtype)
    base_unet = pipe.unet
    ours_unet = copy.deepcopy(base_unet)
    peft_pipe = type(pipe)(**{**pipe.components, "unet": copy.deepcopy(base_unet)})
    g = torch.Generator().manual_seed(0)
    sample = torch.randn(2, 4, 16, 16, generator=g).to(device, dtype)
    text = torch.randn(2, 77, base_unet.config.cross_attention_dim, generator=g).to(device, dtype)

    def forward(unet: nn.Module) -> Callable[[], Any]:
        def run() -> None:
            with torch.inference_mode():
                unet(sample, 500, text)

        return run

    adapters = [Adapter(f"a{i}", "sd1", random_lora(base_unet, i, RANK)) for i in range(max(ks))]
    rows = []
    loaded = 0
    for k in ks:
        engine = FusionEngine(ours_unet, family="sd1")
        engine.add_adapters(adapters[:k])
        engine.set_strategy(get_strategy("merge")({a.name: 0.8 for a in adapters[:k]}, fuse=False))
        with torch.no_grad():
            for adapter in adapters[loaded:k]:
                peft_pipe.load_lora_weights(peft_state_dict(adapter.layers), adapter_name=adapter.name)
        loaded = k
        peft_pipe.set_adapters([a.name for a in adapters[:k]], [0.8] * k)
        ms = interleaved_ms(
            {"base": forward(base_unet), "ours": forward(ours_unet), "peft": forward(peft_pipe.unet)}, repeats, device
        )
        engine.clear()
        rows.append(
            {
                "k": k,
                **{f"{name}_ms": round(value, 3) for name, value in ms.items()},
                "ours_vs_base": round(ms["ours"] / ms["base"], 3),
                "peft_vs_base": round(ms["peft"] / ms["base"], 3),
                "peft_vs_ours": round(ms["peft"] / ms["ours"], 3),
            }
        )
    memory = [_memory_row(base_unet, adapters[:k], forward, device) for k in ks]
    document = {
        "benchmark": "unfused_forward",
        "model": "small-sd UNet, batch 2, 16x16 latents",
        "adapters": f"rank {RANK} on {', '.join(ATTENTION_PROJECTIONS)}",
        "device": str(device),
        "dtype": args.dtype,
        "torch_threads": torch.get_num_threads(),
        "machine": platform.processor() or platform.machine(),
        "targets": {"ours_vs_base_k5": 1.15, "ours_vs_base_k20": 1.35},
        "rows": rows,
        "memory": memory,
    }
    json.dump(document, sys.stdout, indent=2)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
