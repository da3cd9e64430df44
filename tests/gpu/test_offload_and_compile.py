"""Per-step weights under diffusers' model offload, and torch.compile re-weighting without recompiles, on the test
device in fp16 and bf16.

Offload: ``enable_model_cpu_offload(device=...)`` moves each model to the device for its call and back; a
composition whose weights change every step gives what it gives without offload (to one rounding of the dtype), and
clearing it restores every weight bit for bit. Compile: the denoiser's blocks compiled regionally (inductor on CUDA,
the eager backend elsewhere: dynamo's guards, which decide recompiles, are the same), ten re-weightings compile no new
graph, fused (static weights) or unfused (per-step keyframes).
"""

from __future__ import annotations

import os
from typing import Any

import pytest
import torch
from device_checks import (
    HALF_DTYPES,
    HALF_IDS,
    adapters_for,
    assert_restored,
    fresh_pipeline,
    generate,
    relative,
    skip_without_kernels,
    snapshot,
)
from torch._dynamo.utils import counters

from composer.mixin import make_composable

pytestmark = pytest.mark.gpu

STEPS = 3
COMPILE_BACKEND_ENV = "LORA_COMPOSER_TEST_COMPILE_BACKEND"
"""Overrides the compile backend (default: inductor on CUDA, eager elsewhere)."""


@pytest.fixture(params=HALF_DTYPES, ids=HALF_IDS)
def dtype(request: pytest.FixtureRequest, gpu_device: torch.device) -> torch.dtype:
    """fp16 and bf16, each skipped (with the reason) where this torch has no kernels for it on the device."""
    skip_without_kernels(gpu_device, request.param)
    return request.param


def _composable(request: pytest.FixtureRequest, device: torch.device, dtype: torch.dtype) -> Any:
    pipe = make_composable(fresh_pipeline(request, "tiny_sd", device, dtype))
    for adapter in adapters_for(pipe, 2):
        pipe.add_adapter(adapter)
    return pipe


def test_model_offload_with_per_step_weights(
    request: pytest.FixtureRequest, gpu_device: torch.device, dtype: torch.dtype
) -> None:
    pipe = _composable(request, gpu_device, dtype)
    pristine = {key: value.cpu() for key, value in snapshot(pipe.unet).items()}
    weights = {"a0": "0@0,1@1", "a1": 0.6}
    plain = generate(pipe, STEPS)
    pipe.set_composition(weights)
    expected = generate(pipe, STEPS)
    pipe.clear_composition()
    assert relative(expected, plain) > 1e-2, "the composition changes the output"

    pipe.enable_model_cpu_offload(device=gpu_device)
    pipe.set_composition(weights)
    tolerance = torch.finfo(dtype).eps
    for _ in range(2):  # diffusers re-installs its offload hooks after every call
        assert relative(generate(pipe, STEPS), expected) <= tolerance
    assert pipe.unet.device.type == "cpu", "offloaded between calls"
    pipe.clear_composition()
    assert relative(generate(pipe, STEPS), plain) <= tolerance
    pipe.unet.to("cpu")
    assert_restored(pipe.unet, pristine)
    pipe.remove_all_hooks()


def _backend(device: torch.device) -> str:
    return os.environ.get(COMPILE_BACKEND_ENV, "inductor" if device.type == "cuda" else "eager")


@pytest.mark.parametrize("fuse", [None, False], ids=["static-fused", "per-step-unfused"])
def test_regional_compile_does_not_recompile_across_reweightings(
    request: pytest.FixtureRequest, gpu_device: torch.device, dtype: torch.dtype, fuse: bool | None
) -> None:
    pipe = _composable(request, gpu_device, dtype)
    unet = pipe.unet
    pristine = snapshot(unet)
    blocks = [*unet.down_blocks, unet.mid_block, *unet.up_blocks]
    torch._dynamo.reset()
    try:
        for block in blocks:
            block.compile(backend=_backend(gpu_device))
        second = 0.3 if fuse is None else "0@0,1@1"
        pipe.set_composition({"a0": 0.5, "a1": second}, fuse=fuse)
        generate(pipe, STEPS)
        graphs = counters["stats"]["unique_graphs"]
        assert graphs > 0, "the blocks were compiled"
        outputs = [generate(pipe, STEPS)]
        for i in range(10):
            pipe.set_composition({"a0": 0.1 * (i + 1), "a1": second}, fuse=fuse)
            outputs.append(generate(pipe, STEPS))
        assert counters["stats"]["unique_graphs"] == graphs, "re-weighting recompiled"
        assert relative(outputs[1], outputs[-1]) > 1e-2, "the weights took effect"
        compiled = outputs[-1]  # a0 at 1.0
        pipe.clear_composition()
        assert_restored(unet, pristine)
    finally:
        torch._dynamo.reset()
        for block in blocks:
            block._compiled_call_impl = None
    pipe.set_composition({"a0": 1.0, "a1": second}, fuse=fuse)
    eager = generate(pipe, STEPS)
    pipe.clear_composition()
    assert relative(compiled, eager) <= 8 * torch.finfo(dtype).eps, "compiled and eager compositions agree"
