"""The engine under torch.compile (regional: the denoiser's blocks) and under accelerate's model cpu offload.

Compile: re-weighting (static weights, fused; per-step keyframes, unfused) fills the same gate buffers, so new
compositions compile nothing new (counted with torch._dynamo's counters, eager backend on CPU). Offload: a
composition under enable_model_cpu_offload or group offloading gives what it gives without, and clear leaves the
offload hooks working.
Sequential offload keeps weights on the meta device: refused with a typed error.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from accelerate.hooks import CpuOffload
from torch._dynamo.utils import counters

from composer.mixin import make_composable
from fusion.adapters import Adapter, LowRank
from fusion.errors import UnsupportedModelError

ARGS = {"num_inference_steps": 2, "height": 32, "width": 32, "output_type": "latent"}


def _register(pipe: Any) -> None:
    unet = pipe.unet
    keys = [f"{name}.to_q" for name, _ in unet.named_modules() if name.endswith("attn1")]
    g = torch.Generator().manual_seed(0)
    for name in ("a", "b"):
        layers = {}
        for key in keys:
            out, inp = unet.get_submodule(key).weight.shape
            layers[key] = LowRank(torch.randn(4, inp, generator=g) * 0.3, torch.randn(out, 4, generator=g) * 0.3)
        pipe.add_adapter(Adapter(name, "sd1", layers))


def _composed_blocks(unet: Any) -> list[Any]:
    """A compiled region holding composed layers: the first attention block, whose graph a re-weighting could
    invalidate. Every attention block composes through the same layer code, and blocks without an adapter layer
    compile the same with or without a composition, so one region shows what compiling them all would."""
    blocks = [*unet.down_blocks, unet.mid_block, *unet.up_blocks]
    return [block for block in blocks if any(name.endswith("attn1") for name, _ in block.named_modules())][:1]


def _run(pipe: Any) -> torch.Tensor:
    with torch.no_grad():
        return pipe("x", generator=torch.Generator().manual_seed(0), **ARGS).images


@pytest.mark.slow
@pytest.mark.parametrize("fuse", [None, False], ids=["static-fused", "per-step-unfused"])
def test_regional_compile_does_not_recompile_across_reweightings(tiny_sd: Any, fuse: bool | None) -> None:
    torch._dynamo.reset()
    pipe = make_composable(tiny_sd)
    _register(pipe)
    unet = pipe.unet
    for block in _composed_blocks(unet):
        block.compile(backend="eager")
    second = 0.3 if fuse is None else "0@0,1@1"
    pipe.set_composition({"a": 0.5, "b": second}, fuse=fuse)
    _run(pipe)
    graphs = counters["stats"]["unique_graphs"]
    assert graphs > 0, "the blocks were compiled"
    outputs = []
    for i in range(2):
        pipe.set_composition({"a": 0.3 * i, "b": second}, fuse=fuse)
        outputs.append(_run(pipe))
    assert counters["stats"]["unique_graphs"] == graphs, "re-weighting recompiled"
    assert not torch.equal(outputs[0], outputs[-1]), "the weights took effect"
    pipe.set_composition({"a": 0.9, "b": second}, fuse=fuse)
    compiled = _run(pipe)
    pipe.clear_composition()
    torch._dynamo.reset()
    for block in _composed_blocks(unet):
        block._compiled_call_impl = None
    pipe.set_composition({"a": 0.9, "b": second}, fuse=fuse)
    # The tensor-only factor path the compiled blocks take sums in another order than eager: float32 noise only.
    assert (compiled - _run(pipe)).abs().max() <= 3e-5, "compiled and eager compositions agree"
    pipe.clear_composition()


def test_model_cpu_offload_composes_and_survives_clear(tiny_sd: Any) -> None:
    pipe = make_composable(tiny_sd)
    _register(pipe)
    weights = {"a": 0.7, "b": "0@0,1@1"}
    plain = _run(pipe)
    pipe.set_composition(weights)
    expected = _run(pipe)
    pipe.clear_composition()

    pipe.enable_model_cpu_offload(device="cpu")  # diffusers re-installs its hooks after every call
    pipe.set_composition(weights)
    assert torch.equal(_run(pipe), expected)
    assert torch.equal(_run(pipe), expected), "still composed after the offload hooks were re-installed"
    pipe.clear_composition()
    assert isinstance(pipe.unet._hf_hook, CpuOffload)
    assert torch.equal(_run(pipe), plain)
    assert isinstance(pipe.unet._hf_hook, CpuOffload)

    pipe.set_composition(weights)  # and offload enabled after composing
    pipe.remove_all_hooks()
    pipe.enable_model_cpu_offload(device="cpu")
    assert torch.equal(_run(pipe), expected)
    assert torch.equal(_run(pipe), expected)
    pipe.clear_composition()
    assert torch.equal(_run(pipe), plain)
    pipe.remove_all_hooks()


@pytest.mark.parametrize("level", ["block_level", "leaf_level"])
def test_group_offloading_composes_and_clears(tiny_sd: Any, level: str) -> None:
    """diffusers' group offloading (its own hooks on blocks or leaf modules; CPU to CPU here) composes like the
    plain model, fused and unfused, and clearing gives the plain model back."""
    pipe = make_composable(tiny_sd)
    _register(pipe)
    compositions = [{"a": 0.7, "b": "0@0,1@1"}, {"a": 0.7, "b": 0.2}]
    expected = []
    for weights in compositions:
        pipe.set_composition(weights)
        expected.append(_run(pipe))
    pipe.clear_composition()
    plain = _run(pipe)
    cpu = torch.device("cpu")
    options = {"num_blocks_per_group": 1} if level == "block_level" else {}
    pipe.unet.enable_group_offload(onload_device=cpu, offload_device=cpu, offload_type=level, **options)
    for weights, want in zip(compositions, expected):
        pipe.set_composition(weights)
        assert torch.equal(_run(pipe), want)
    pipe.clear_composition()
    assert torch.equal(_run(pipe), plain)


def test_sequential_offload_is_refused(tiny_sd: Any) -> None:
    pipe = make_composable(tiny_sd)
    pipe.enable_sequential_cpu_offload(device="cpu")
    g = torch.Generator().manual_seed(0)
    key = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    with pytest.raises(UnsupportedModelError, match="meta"):
        pipe.add_adapter(Adapter("a", "sd1", {key: LowRank(torch.randn(2, 32, generator=g), torch.zeros(32, 2))}))
    pipe.remove_all_hooks()
