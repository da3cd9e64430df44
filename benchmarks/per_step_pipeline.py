"""Weights that change every step, through the public API, whole pipeline: ours vs diffusers vs the plain pipeline.

``python -m benchmarks.per_step_pipeline [--quick] [--device cuda] [--dtype float16]`` runs the ``small-sd``
pipeline (block_out_channels (64, 128, 256), cross-attention 768) at 128², 8 steps, CFG, ``output_type="latent"``,
with k rank-16 LoRAs on every attention projection, each ramped ``0@0,1@1`` (weight t/(S−1) at step t), for
k = 1, 5, 10, 20 (1 and 5 with ``--quick``):

- ``plain``: the pipeline without adapters;
- ``ours``: ``make_composable(pipe)``, ``add_adapter`` each, ``set_composition({name: "0@0,1@1"})`` — the path a user
  takes; the weights change every step, so no layer ever builds a cached effective weight (the unfused factor path);
- ``diffusers``: ``load_lora_weights`` each, then ``set_adapters(names, [w]*k)`` before the call (w = 0) and in a
  ``callback_on_step_end`` after every step (w for the next step) — the same schedule, PEFT's unfused branches.

Each pipeline call is timed round-robin (median of ``repeats``); the latents of ours and diffusers are compared
(``max_abs_diff``). Prints one JSON document; ratios are to ``plain``. Target: ours ≤ 1.15× plain at k = 5.
"""

from __future__ import annotations

import copy
import platform
import sys
from collections.abc import Callable
from typing import Any

import torch

from benchmarks._common import (
    ATTENTION_PROJECTIONS,
    PeakMemory,
    denoiser_prefix,
    device_benchmark_main,
    interleaved_ms,
    peft_state_dict,
    random_lora,
)
from composer.mixin import make_composable
from composer.presets import load_preset, preset_family
from fusion.adapters import Adapter

RANK = 16
STEPS = 8
SIZE = 128
RAMP = "0@0,1@1"


STATIC = 0.8
"""Each adapter's weight in the static comparison."""


def measure(
    plain: Any,
    ks: tuple[int, ...],
    *,
    size: int,
    steps: int,
    repeats: int,
    static: bool = False,
    extra_call: dict[str, Any] | None = None,
) -> list[dict[str, Any]]:
    """Rows of ms per generation (plain, ours, diffusers) for each k, on copies of ``plain``'s denoiser.

    Per-step (``static=False``): every adapter ramped ``0@0,1@1``; ours through ``set_composition``, diffusers by
    ``set_adapters`` in ``callback_on_step_end``. Static: every adapter at 0.8; ours fused by ``set_composition``,
    diffusers by ``set_adapters`` + ``fuse_lora``. Each row has each run's peak memory (:class:`PeakMemory`) too.
    """
    prefix = denoiser_prefix(plain)
    device = getattr(plain, prefix).device
    family = preset_family(plain)
    plain.set_progress_bar_config(disable=True)

    def copy_of(pipe: Any) -> Any:
        return type(pipe)(**{**pipe.components, prefix: copy.deepcopy(getattr(pipe, prefix))})

    ours = make_composable(copy_of(plain))
    peer = copy_of(plain)
    for pipe in (ours, peer):
        pipe.set_progress_bar_config(disable=True)
    denoiser = getattr(plain, prefix)
    adapters = [Adapter(f"a{i}", family, random_lora(denoiser, i, RANK, scale=0.05)) for i in range(max(ks))]
    call = {"prompt": "a photo", "num_inference_steps": steps, "height": size, "width": size, "output_type": "latent"}
    call |= extra_call or {}

    def ramp(step: int) -> float:
        return step / (steps - 1)

    def generate(pipe: Any, **extra: Any) -> Callable[[], torch.Tensor]:
        def go() -> torch.Tensor:
            with torch.inference_mode():
                return pipe(generator=torch.Generator().manual_seed(0), **call, **extra).images

        return go

    rows = []
    loaded = 0
    for k in ks:
        names = [a.name for a in adapters[:k]]
        for adapter in adapters[loaded:k]:
            ours.add_adapter(adapter)
            with torch.no_grad():
                peer.load_lora_weights(peft_state_dict(adapter.layers, f"{prefix}."), adapter_name=adapter.name)
        loaded = k
        if static:
            ours.set_composition(dict.fromkeys(names, STATIC))
            peer.set_adapters(names, [STATIC] * k)
            peer.fuse_lora(adapter_names=names, lora_scale=1.0)
            diffusers = generate(peer)
        else:
            ours.set_composition(dict.fromkeys(names, RAMP))

            def step_end(pipe: Any, step: int, _t: Any, kwargs: dict[str, Any], names: list[str] = names) -> dict:
                if step + 1 < steps:
                    pipe.set_adapters(names, [ramp(step + 1)] * len(names))
                return kwargs

            peer_call = generate(peer, callback_on_step_end=step_end)

            def diffusers(names: list[str] = names, peer_call: Callable[[], torch.Tensor] = peer_call) -> torch.Tensor:
                peer.set_adapters(names, [ramp(0)] * len(names))
                return peer_call()

        runs = {"plain": generate(plain), "ours": generate(ours), "diffusers": diffusers}
        difference = float((runs["ours"]().float() - diffusers().float()).abs().max())
        peaks: dict[str, int] = {}
        ms = interleaved_ms(runs, repeats, device, peaks)
        ours.clear_composition()
        if static:
            peer.unfuse_lora()
        rows.append(
            {
                "k": k,
                **{f"{name}_ms": round(value, 1) for name, value in ms.items()},
                "ours_vs_plain": round(ms["ours"] / ms["plain"], 3),
                "diffusers_vs_plain": round(ms["diffusers"] / ms["plain"], 3),
                "diffusers_vs_ours": round(ms["diffusers"] / ms["ours"], 3),
                "max_abs_diff": difference,
                "peak_bytes": peaks,
            }
        )
    return rows


def run(quick: bool, device: torch.device, dtype: torch.dtype, repeats: int | None) -> dict[str, Any]:
    """Build the small-sd pipeline, time the three pipelines for every k, return the JSON document."""
    ks = (1, 5) if quick else (1, 5, 10, 20)
    repeats = repeats or (3 if quick else 5)
    plain = load_preset("small-sd").to(device, dtype)
    rows = measure(plain, ks, size=SIZE, steps=STEPS, repeats=repeats)
    return {
        "benchmark": "per_step_pipeline",
        "path": "public API: set_composition with per-step keyframes vs diffusers set_adapters in callback_on_step_end",
        "model": f"small-sd pipeline, {SIZE}x{SIZE}, {STEPS} steps, CFG, latent output",
        "adapters": f"rank {RANK} on {', '.join(ATTENTION_PROJECTIONS)}, each weighted {RAMP}",
        "device": str(device),
        "dtype": str(dtype).removeprefix("torch."),
        "torch_threads": torch.get_num_threads(),
        "machine": platform.processor() or platform.machine(),
        "repeats": repeats,
        "peak_memory": PeakMemory(device).label,
        "target": "ours <= 1.15x plain at k=5",
        "rows": rows,
    }


def main(argv: list[str] | None = None) -> int:
    """Parse the flags and print one JSON document."""
    return device_benchmark_main(__doc__.splitlines()[0], "k = 1 and 5 only, fewer repeats", run, argv)


if __name__ == "__main__":
    sys.exit(main())
