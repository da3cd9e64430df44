"""Adapters on CFG's conditional branch only, through the public API, vs the CFG loop written out by hand.

``python -m benchmarks.conditional_branch [--quick] [--device cuda] [--dtype float16]`` runs the ``small-sd``
pipeline (block_out_channels (64, 128, 256), cross-attention 768) at 128², 8 steps, CFG 7.5, latent output, with
k = 2 rank-16 LoRAs on every attention projection at 0.8:

- ``plain``: the pipeline without adapters;
- ``both``: ``set_composition(weights)`` — the adapters on both CFG branches (fused merge: what pipelines do);
- ``conditional``: ``set_composition(weights, branches="conditional")`` — the path a user takes for
  conditional-only composition (the unconditional half of each CFG batch on the base weights, unfused);
- ``reference``: the same sampling written out as a user would without us: a base UNet for the unconditional
  prediction and a diffusers pipeline with the LoRAs loaded by ``load_lora_weights`` (PEFT layers) for the
  conditional one, two denoiser calls per step, CFG combined by hand;
- ``per_adapter``: ``set_composition(weights, branches={"a1": "conditional"})`` — ``a0`` kept on both branches
  (the unconditional half runs the merge with it alone), ``a1`` on the conditional branch only;
- ``reference_per_adapter``: its hand-written loop, the unconditional prediction from a diffusers/PEFT pipeline
  with ``a0`` loaded.

Each is timed round-robin (median of ``repeats``); the latents of each of ours and its reference are compared
(``max_abs_diff``, ``max_abs_diff_per_adapter``). Prints one JSON document with the ratios.
"""

from __future__ import annotations

import copy
import platform
import sys
from collections.abc import Callable
from typing import Any

import torch
from diffusers.utils.torch_utils import randn_tensor

from benchmarks._common import (
    ATTENTION_PROJECTIONS,
    device_benchmark_main,
    interleaved_ms,
    peft_state_dict,
    random_lora,
)
from composer.mixin import make_composable
from composer.presets import load_preset
from fusion.adapters import Adapter

RANK = 16
STEPS = 8
SIZE = 128
GUIDANCE = 7.5
WEIGHT = 0.8
K = 2
PROMPT = "a photo"


def _reference(base: Any, adapted: Any, device: torch.device, dtype: torch.dtype) -> Callable[[], torch.Tensor]:
    """The CFG loop with the unconditional prediction from ``base`` and the conditional one from ``adapted``."""
    scheduler = copy.deepcopy(base.scheduler)
    channels = base.unet.config.in_channels
    shape = (1, channels, SIZE // base.vae_scale_factor, SIZE // base.vae_scale_factor)

    def go() -> torch.Tensor:
        with torch.inference_mode():
            negative = base.encode_prompt(PROMPT, device, 1, True, "")[1]
            positive = adapted.encode_prompt(PROMPT, device, 1, False)[0]
            scheduler.set_timesteps(STEPS, device=device)
            generator = torch.Generator().manual_seed(0)
            latents = randn_tensor(shape, generator=generator, device=device, dtype=dtype)
            latents = latents * scheduler.init_noise_sigma
            for t in scheduler.timesteps:
                z = scheduler.scale_model_input(latents, t)
                unconditional = base.unet(z, t, encoder_hidden_states=negative, return_dict=False)[0]
                conditional = adapted.unet(z, t, encoder_hidden_states=positive, return_dict=False)[0]
                guided = unconditional + GUIDANCE * (conditional - unconditional)
                latents = scheduler.step(guided, t, latents, return_dict=False)[0]
            return latents

    return go


def run(quick: bool, device: torch.device, dtype: torch.dtype, repeats: int | None) -> dict[str, Any]:
    """Build the pipelines, time the four ways, return the JSON document."""
    repeats = repeats or (3 if quick else 7)
    plain = load_preset("small-sd").to(device, dtype)
    plain.set_progress_bar_config(disable=True)
    both, conditional = (
        make_composable(type(plain)(**{**plain.components, "unet": copy.deepcopy(plain.unet)})) for _ in range(2)
    )
    peer, peer_kept = (type(plain)(**{**plain.components, "unet": copy.deepcopy(plain.unet)}) for _ in range(2))
    per_adapter = make_composable(type(plain)(**{**plain.components, "unet": copy.deepcopy(plain.unet)}))
    adapters = [Adapter(f"a{i}", "sd1", random_lora(plain.unet, i, RANK, scale=0.05)) for i in range(K)]
    names = [adapter.name for adapter in adapters]
    for pipe in (both, conditional, per_adapter, peer, peer_kept):
        pipe.set_progress_bar_config(disable=True)
    for adapter in adapters:
        for pipe in (both, conditional, per_adapter):
            pipe.add_adapter(adapter)
        with torch.no_grad():
            peer.load_lora_weights(peft_state_dict(adapter.layers), adapter_name=adapter.name)
    with torch.no_grad():
        peer_kept.load_lora_weights(peft_state_dict(adapters[0].layers), adapter_name=names[0])
    peer.set_adapters(names, [WEIGHT] * K)
    peer_kept.set_adapters([names[0]], [WEIGHT])
    both.set_composition(dict.fromkeys(names, WEIGHT))
    conditional.set_composition(dict.fromkeys(names, WEIGHT), branches="conditional")
    per_adapter.set_composition(dict.fromkeys(names, WEIGHT), branches={names[1]: "conditional"})
    call = {
        "prompt": PROMPT,
        "num_inference_steps": STEPS,
        "height": SIZE,
        "width": SIZE,
        "guidance_scale": GUIDANCE,
        "output_type": "latent",
    }

    def generate(pipe: Any) -> Callable[[], torch.Tensor]:
        def go() -> torch.Tensor:
            with torch.inference_mode():
                return pipe(generator=torch.Generator().manual_seed(0), **call).images

        return go

    runs = {
        "plain": generate(plain),
        "both": generate(both),
        "conditional": generate(conditional),
        "reference": _reference(plain, peer, device, dtype),
        "per_adapter": generate(per_adapter),
        "reference_per_adapter": _reference(peer_kept, peer, device, dtype),
    }
    difference = float((runs["conditional"]().float() - runs["reference"]().float()).abs().max())
    per_adapter_difference = float(
        (runs["per_adapter"]().float() - runs["reference_per_adapter"]().float()).abs().max()
    )
    ms = interleaved_ms(runs, repeats, device)
    return {
        "benchmark": "conditional_branch",
        "path": "public API: set_composition(weights, branches='conditional' or per adapter) vs a hand-written CFG "
        "loop with a base (or one-adapter) UNet and a diffusers/PEFT adapted UNet",
        "model": f"small-sd pipeline, {SIZE}x{SIZE}, {STEPS} steps, CFG {GUIDANCE}, latent output",
        "adapters": f"{K} LoRAs of rank {RANK} on {', '.join(ATTENTION_PROJECTIONS)}, each at {WEIGHT}",
        "device": str(device),
        "dtype": str(dtype).removeprefix("torch."),
        "torch_threads": torch.get_num_threads(),
        "machine": platform.processor() or platform.machine(),
        "repeats": repeats,
        **{f"{name}_ms": round(value, 1) for name, value in ms.items()},
        "conditional_vs_plain": round(ms["conditional"] / ms["plain"], 3),
        "conditional_vs_both": round(ms["conditional"] / ms["both"], 3),
        "reference_vs_conditional": round(ms["reference"] / ms["conditional"], 3),
        "per_adapter_vs_conditional": round(ms["per_adapter"] / ms["conditional"], 3),
        "reference_per_adapter_vs_per_adapter": round(ms["reference_per_adapter"] / ms["per_adapter"], 3),
        "max_abs_diff": difference,
        "max_abs_diff_per_adapter": per_adapter_difference,
    }


def main(argv: list[str] | None = None) -> int:
    """Parse the flags and print one JSON document."""
    return device_benchmark_main(__doc__.splitlines()[0], "fewer repeats", run, argv)


if __name__ == "__main__":
    sys.exit(main())
