"""Every composition method in fp16 and bf16 on the test device against diffusers/PEFT in the same dtype.

The yardstick: ours may stray from the fp32 result (diffusers in fp32 on the same device) no further than twice
diffusers' own half-precision error, and clearing a composition restores every weight bit for bit. Merge (the first
step's prediction, on SD, SDXL and FLUX), per-step weights, Switch and gated table mode (whole generations) are
checked against diffusers' ``set_adapters`` (in a step-end callback where weights change); Composite and CMLoRA are
denoiser predictions against their formulas built from diffusers' single-LoRA passes; SHiRA's fused weights are
exactly one rounding of the fp32 sum.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import pytest
import torch
from device_checks import (
    HALF_DTYPES,
    HALF_IDS,
    adapters_for,
    assert_as_close_as_the_peer,
    assert_restored,
    first_prediction,
    fresh_pipeline,
    generate,
    load_into_peer,
    relative,
    skip_without_kernels,
    snapshot,
)
from torch import nn

from composer.mixin import make_composable
from fusion.adapters import Adapter, Sparse
from fusion.sparse import shira_budget
from fusion.strategies.cmlora import cmlora_weights

pytestmark = pytest.mark.gpu

STEPS = 3
GUIDANCE = 6.0


@pytest.fixture(params=HALF_DTYPES, ids=HALF_IDS)
def dtype(request: pytest.FixtureRequest, gpu_device: torch.device) -> torch.dtype:
    """fp16 and bf16, each skipped (with the reason) where this torch has no kernels for it on the device."""
    skip_without_kernels(gpu_device, request.param)
    return request.param


class Peer:
    """diffusers' own LoRA path on a fresh copy of the preset: built in fp32 (the truth), then cast to ``dtype``."""

    def __init__(
        self,
        request: pytest.FixtureRequest,
        fixture: str,
        device: torch.device,
        adapters: list,
        observe: Callable[[Any], torch.Tensor] | None = None,
    ) -> None:
        self.pipe = fresh_pipeline(request, fixture, device, torch.float32)
        self.adapters = adapters
        self.observe = observe or (lambda pipe: generate(pipe, STEPS))
        self.base = None
        self.loaded = False

    def outputs(self, dtype: torch.dtype, run: Callable[[Any], torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """``run(pipe)`` in fp32 then in ``dtype``: (truth, peer); the base output without adapters is kept too."""
        self.pipe.to(dtype=torch.float32)
        if not self.loaded:
            self.base = self.observe(self.pipe)
            load_into_peer(self.pipe, self.adapters)
            self.loaded = True
        truth = run(self.pipe)
        self.pipe.to(dtype=dtype)
        return truth, run(self.pipe)


def _ours(request: pytest.FixtureRequest, fixture: str, device: torch.device, dtype: torch.dtype, k: int) -> tuple:
    pipe = make_composable(fresh_pipeline(request, fixture, device, dtype))
    adapters = adapters_for(pipe, k)
    for adapter in adapters:
        pipe.add_adapter(adapter)
    return pipe, adapters


def _denoiser(pipe: Any) -> nn.Module:
    return pipe.transformer if getattr(pipe, "transformer", None) is not None else pipe.unet


@pytest.mark.parametrize("fixture", ["tiny_sd", "tiny_sdxl", "tiny_flux"])
def test_merge_fused_and_unfused_match_set_adapters(
    request: pytest.FixtureRequest, gpu_device: torch.device, dtype: torch.dtype, fixture: str
) -> None:
    """The first step's prediction: over several steps tiny SDXL's random weights amplify half-precision noise
    until diffusers' own bf16 error rivals the adapters' effect, and the comparison would then prove nothing."""
    pipe, adapters = _ours(request, fixture, gpu_device, dtype, 3)
    weights = {"a0": 0.8, "a1": -0.5, "a2": 1.2}
    pristine = snapshot(_denoiser(pipe))
    pipe.set_composition(weights, fuse=False)
    unfused = first_prediction(pipe)
    pipe.set_composition(weights)
    assert pipe.composition_engine.fused
    fused = first_prediction(pipe)
    pipe.clear_composition()
    assert_restored(_denoiser(pipe), pristine)

    def reference(peer: Any) -> torch.Tensor:
        peer.set_adapters(list(weights), list(weights.values()))
        return first_prediction(peer)

    peer = Peer(request, fixture, gpu_device, adapters, observe=first_prediction)
    truth, half = peer.outputs(dtype, reference)
    assert_as_close_as_the_peer(unfused, half, truth, peer.base, dtype)
    assert_as_close_as_the_peer(fused, half, truth, peer.base, dtype)


def _ramp(step: int) -> float:
    return step / (STEPS - 1)


def test_per_step_weights_match_set_adapters_in_a_step_callback(
    request: pytest.FixtureRequest, gpu_device: torch.device, dtype: torch.dtype
) -> None:
    """Keyframes ``0@0,1@1`` (weight t/(S−1) at step t) beside a constant: unfused, re-weighted every step."""
    pipe, adapters = _ours(request, "tiny_sd", gpu_device, dtype, 2)
    pristine = snapshot(pipe.unet)
    pipe.set_composition({"a0": "0@0,1@1", "a1": 0.6})
    ours = generate(pipe, STEPS)
    pipe.clear_composition()
    assert_restored(pipe.unet, pristine)

    def reference(peer: Any) -> torch.Tensor:
        def step_end(p: Any, step: int, _t: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
            if step + 1 < STEPS:
                p.set_adapters(["a0", "a1"], [_ramp(step + 1), 0.6])
            return kwargs

        peer.set_adapters(["a0", "a1"], [_ramp(0), 0.6])
        return generate(peer, STEPS, callback_on_step_end=step_end)

    peer = Peer(request, "tiny_sd", gpu_device, adapters)
    truth, half = peer.outputs(dtype, reference)
    assert_as_close_as_the_peer(ours, half, truth, peer.base, dtype)


def test_switch_matches_set_adapters_in_a_step_callback(
    request: pytest.FixtureRequest, gpu_device: torch.device, dtype: torch.dtype
) -> None:
    """LoRA Switch with τ = 1, fused, the uniform schedule: one adapter per step in the given order."""
    pipe, adapters = _ours(request, "tiny_sd", gpu_device, dtype, 3)
    weights = {"a0": 0.8, "a1": 1.2, "a2": 0.6}
    pristine = snapshot(pipe.unet)
    pipe.set_composition(weights, method="switch", tau=1, order="given", switch_offset="uniform")
    ours = generate(pipe, STEPS)
    pipe.clear_composition()
    assert_restored(pipe.unet, pristine)

    def reference(peer: Any) -> torch.Tensor:
        order = list(weights)

        def step_end(p: Any, step: int, _t: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
            name = order[(step + 1) % len(order)]
            p.set_adapters([name], [weights[name]])
            return kwargs

        peer.set_adapters([order[0]], [weights[order[0]]])
        return generate(peer, STEPS, callback_on_step_end=step_end)

    peer = Peer(request, "tiny_sd", gpu_device, adapters)
    truth, half = peer.outputs(dtype, reference)
    assert_as_close_as_the_peer(ours, half, truth, peer.base, dtype)


def _capture_calls(pipe: Any) -> tuple[list[tuple[tuple, dict, torch.Tensor]], Any]:
    """Record every UNet call's inputs and output; returns the list and the hook handle."""
    calls: list[tuple[tuple, dict, torch.Tensor]] = []

    def hook(_m: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        calls.append((args, dict(kwargs), output[0].clone()))

    return calls, pipe.unet.register_forward_hook(hook, with_kwargs=True)


def _as(value: Any, dtype: torch.dtype) -> Any:
    return value.to(dtype) if isinstance(value, torch.Tensor) and value.is_floating_point() else value


def _formula_at(
    peer: Peer, dtype: torch.dtype, call: tuple[tuple, dict, torch.Tensor], combine: Callable[[Callable], torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(truth, peer, base) of a formula over single-LoRA passes of diffusers' UNet on one captured call's inputs."""
    args, kwargs, _ = call
    results = []
    for run_dtype in (torch.float32, dtype):
        peer.pipe.unet.to(dtype=run_dtype)
        call_args = tuple(_as(a, run_dtype) for a in args)
        call_kwargs = {key: _as(v, run_dtype) for key, v in kwargs.items()} | {"return_dict": False}

        def single(name: str, weight: float, a: tuple = call_args, kw: dict = call_kwargs) -> torch.Tensor:
            peer.pipe.set_adapters([name], [weight])
            with torch.inference_mode():
                return peer.pipe.unet(*a, **kw)[0].float()

        results.append(combine(single))
        if run_dtype == torch.float32:
            peer.pipe.disable_lora()
            with torch.inference_mode():
                base = peer.pipe.unet(*call_args, **call_kwargs)[0].float()
            peer.pipe.enable_lora()
    return results[0], results[1], base


def _peer_with_loras(request: pytest.FixtureRequest, device: torch.device, adapters: list[Adapter]) -> Peer:
    peer = Peer(request, "tiny_sd", device, adapters)
    load_into_peer(peer.pipe, adapters)
    peer.loaded = True
    return peer


@pytest.mark.parametrize("mode", ["sequential", "batched"])
def test_composite_matches_the_formula_over_diffusers_single_lora_passes(
    request: pytest.FixtureRequest, gpu_device: torch.device, dtype: torch.dtype, mode: str
) -> None:
    """ẽ = (1/k)·Σ_i [e_i(z) + g·(e_i(z,c) − e_i(z))], each e_i diffusers' UNet with adapter i alone."""
    pipe, adapters = _ours(request, "tiny_sd", gpu_device, dtype, 3)
    weights = {"a0": 0.8, "a1": 1.1, "a2": 0.5}
    pristine = snapshot(pipe.unet)
    pipe.set_composition(weights, method="composite", mode=mode)
    calls, hook = _capture_calls(pipe)
    generate(pipe, STEPS, guidance_scale=GUIDANCE)
    hook.remove()
    pipe.clear_composition()
    assert_restored(pipe.unet, pristine)
    assert len(calls) == STEPS

    def guided(prediction: torch.Tensor) -> torch.Tensor:
        uncond, cond = prediction.float().chunk(2)
        return uncond + GUIDANCE * (cond - uncond)

    def composite(single: Callable) -> torch.Tensor:
        return sum(guided(single(name, weight)) for name, weight in weights.items()) / len(weights)

    peer = _peer_with_loras(request, gpu_device, adapters)
    for step in (0, STEPS - 1):
        truth, half, base = _formula_at(peer, dtype, calls[step], composite)
        assert_as_close_as_the_peer(guided(calls[step][2]), half, truth, guided(base), dtype)


def test_cmlora_without_caching_matches_the_weighted_formula(
    request: pytest.FixtureRequest, gpu_device: torch.device, dtype: torch.dtype
) -> None:
    """Every adapter a full pass every step, the dominant one weighted (N−0.5)/(2N−1.5), the others 1/(2N−1.5)."""
    pipe, adapters = _ours(request, "tiny_sd", gpu_device, dtype, 3)
    weights = {"a0": 0.8, "a1": 1.1, "a2": 0.5}
    pristine = snapshot(pipe.unet)
    pipe.set_composition(weights, method="cmlora", cache="off", delta_h={"a0": 0.3, "a1": 0.1, "a2": -0.2})
    calls, hook = _capture_calls(pipe)
    generate(pipe, STEPS)
    hook.remove()
    dominants = list(pipe.composition_engine.strategy.dominants)
    pipe.clear_composition()
    assert_restored(pipe.unet, pristine)
    dominant, other = cmlora_weights(len(weights))

    peer = _peer_with_loras(request, gpu_device, adapters)
    for step in (0, STEPS - 1):

        def weighted(single: Callable, step: int = step) -> torch.Tensor:
            return sum(
                (dominant if name == dominants[step] else other) * single(name, weight)
                for name, weight in weights.items()
            )

        truth, half, base = _formula_at(peer, dtype, calls[step], weighted)
        assert_as_close_as_the_peer(calls[step][2], half, truth, base, dtype)


def test_gated_table_mode_matches_the_weighted_sum_of_set_adapters(
    request: pytest.FixtureRequest, gpu_device: torch.device, dtype: torch.dtype
) -> None:
    """The training-free gate table with constant weights is the unfused weighted sum diffusers computes."""
    pipe, adapters = _ours(request, "tiny_sd", gpu_device, dtype, 3)
    weights = {"a0": 0.8, "a1": 0.5, "a2": 1.2}
    pristine = snapshot(pipe.unet)
    pipe.set_composition(weights, method="gated", mode="table")
    ours = generate(pipe, STEPS)
    pipe.clear_composition()
    assert_restored(pipe.unet, pristine)

    def reference(peer: Any) -> torch.Tensor:
        peer.set_adapters(list(weights), list(weights.values()))
        return generate(peer, STEPS)

    peer = Peer(request, "tiny_sd", gpu_device, adapters)
    truth, half = peer.outputs(dtype, reference)
    assert_as_close_as_the_peer(ours, half, truth, peer.base, dtype)


def _shira(unet: nn.Module, seed: int) -> Adapter:
    g = torch.Generator().manual_seed(seed)
    layers = {}
    for key, module in unet.named_modules():
        if isinstance(module, nn.Linear) and ".attn" in key:
            shape = tuple(module.weight.shape)
            count = shira_budget(shape, 2)
            index = torch.randperm(math.prod(shape), generator=g)[:count].sort().values
            layers[key] = Sparse(index, torch.randn(count, generator=g) * 0.05, shape)
    return Adapter(f"shira{seed}", "sd1", layers)


def test_shira_fused_weights_are_one_rounding_of_the_fp32_sum_and_switch_in_place_exactly(
    request: pytest.FixtureRequest, gpu_device: torch.device, dtype: torch.dtype
) -> None:
    pipe = make_composable(fresh_pipeline(request, "tiny_sd", gpu_device, dtype))
    pristine = snapshot(pipe.unet)
    adapters = [_shira(pipe.unet, seed) for seed in (0, 1)]
    for adapter in adapters:
        pipe.add_adapter(adapter)
    base = generate(pipe, STEPS)
    for adapter in [*adapters, adapters[0]]:  # A, B, then A again: switches in place
        pipe.set_composition({adapter.name: 0.7})
        for key, update in adapter.layers.items():
            weight = pipe.unet.get_submodule(key).weight.detach()
            expected = pristine[f"{key}.weight"].float().view(-1).clone()
            values = update.values.to(expected.device, dtype).float()  # attached in the weight's dtype
            expected[update.index.long().to(expected.device)] += 0.7 * values
            assert torch.equal(weight.view(-1), expected.to(dtype)), key
        composed = generate(pipe, STEPS)
        assert relative(composed, base) > 1e-3, "the adapter changes the output"
    pipe.clear_composition()
    assert_restored(pipe.unet, pristine)
    assert torch.equal(generate(pipe, STEPS), base)
