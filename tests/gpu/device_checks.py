"""Helpers of the ``gpu`` tests: tiny pipelines on the test device in a half dtype, seeded random LoRAs in our form
and diffusers/PEFT's, and the half-precision yardstick (ours may stray from the fp32 truth no further than diffusers
does in the same dtype)."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

from composer.presets import load_preset
from fusion.adapters import Adapter, LowRank

HALF_DTYPES = [torch.float16, torch.bfloat16]
HALF_IDS = ["fp16", "bf16"]
PROMPT = "a corgi astronaut"
SIZE = 32


def skip_without_kernels(device: torch.device, dtype: torch.dtype) -> None:
    """Skip when this torch has no ``dtype`` kernels on ``device`` for what a tiny pipeline runs (conv, group norm,
    attention, matmul), naming the op that failed."""
    x = torch.ones(1, 32, 4, 4, device=device, dtype=dtype)
    probes = {
        "conv2d": lambda: nn.functional.conv2d(x, torch.ones(32, 32, 3, 3, device=device, dtype=dtype)),
        "group_norm": lambda: nn.functional.group_norm(x, 8),
        "scaled_dot_product_attention": lambda: nn.functional.scaled_dot_product_attention(x, x, x),
        "matmul": lambda: x @ x,
    }
    for name, probe in probes.items():
        try:
            probe()
        except (RuntimeError, NotImplementedError) as exc:
            pytest.skip(f"torch {torch.__version__} has no {dtype} {name} on {device.type}: {exc}")


def fresh_pipeline(request: pytest.FixtureRequest, fixture: str, device: torch.device, dtype: torch.dtype) -> Any:
    """A new pipeline of the session's cached tiny preset (``tiny_sd`` → ``tiny-sd``) on ``device`` in ``dtype``."""
    folder = request.getfixturevalue(f"{fixture}_path")
    pipe = load_preset(fixture.replace("_", "-"), cache_dir=folder.parent, torch_dtype=dtype, device=device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def denoiser_name(pipe: Any) -> str:
    """``transformer`` for Flux, ``unet`` for the UNet families."""
    return "transformer" if getattr(pipe, "transformer", None) is not None else "unet"


def random_lora(denoiser: nn.Module, rank: int, seed: int, every: int = 1) -> dict[str, LowRank]:
    """Seeded random factors (fp32, on the CPU) on every ``every``-th attention / feed-forward linear and resnet
    ``conv1`` of the denoiser: linear and conv LoRAs, overlapping between adapters on some layers."""
    g = torch.Generator().manual_seed(seed)
    targets = [
        (name, module)
        for name, module in denoiser.named_modules()
        if (isinstance(module, nn.Linear) and (".attn" in name or ".ff." in name or name.endswith("proj_mlp")))
        or (isinstance(module, nn.Conv2d) and name.endswith("conv1"))
    ]
    layers = {}
    for i, (name, module) in enumerate(targets):
        if i % every:
            continue
        shape = module.weight.shape
        down = torch.randn(rank, *shape[1:], generator=g) * 0.2
        up = torch.randn(shape[0], rank, *([1, 1] if len(shape) == 4 else []), generator=g) * 0.2
        layers[name] = LowRank(down=down, up=up)
    return layers


def adapters_for(pipe: Any, count: int) -> list[Adapter]:
    """``count`` random LoRAs ``a0``… of ranks 4, 2, 6, … on the pipeline's denoiser."""
    denoiser = getattr(pipe, denoiser_name(pipe))
    family = "flux" if denoiser_name(pipe) == "transformer" else ("sdxl" if hasattr(pipe, "text_encoder_2") else "sd1")
    return [
        Adapter(f"a{i}", family, random_lora(denoiser, (4, 2, 6, 3, 5)[i], seed=i, every=1 + i % 2))
        for i in range(count)
    ]


def load_into_peer(peer: Any, adapters: list[Adapter]) -> None:
    """Load the same factors into ``peer`` through diffusers' ``load_lora_weights`` (PEFT layers)."""
    prefix = denoiser_name(peer)
    for adapter in adapters:
        state = {}
        for key, update in adapter.layers.items():
            state[f"{prefix}.{key}.lora_A.weight"] = update.down.clone()
            state[f"{prefix}.{key}.lora_B.weight"] = (update.up * update.scale).clone()
        with torch.no_grad():
            peer.load_lora_weights(state, adapter_name=adapter.name)


def generate(pipe: Any, steps: int = 2, **extra: Any) -> torch.Tensor:
    """Final latents of a seeded generation at 32², CFG on (a CPU generator: the same noise on every device)."""
    kwargs: dict[str, Any] = {"num_inference_steps": steps, "height": SIZE, "width": SIZE, "output_type": "latent"}
    if denoiser_name(pipe) == "transformer":
        kwargs["max_sequence_length"] = 16
    with torch.inference_mode():
        return pipe(PROMPT, generator=torch.Generator().manual_seed(0), **kwargs, **extra).images


def first_prediction(pipe: Any, **extra: Any) -> torch.Tensor:
    """The denoiser's output at the first step of a seeded generation (same inputs in every run): the adapters'
    effect before any half-precision noise compounds over steps."""
    predictions: list[torch.Tensor] = []
    denoiser = getattr(pipe, denoiser_name(pipe))
    hook = denoiser.register_forward_hook(lambda _m, _a, out: predictions.append(out[0].detach().clone()))
    try:
        generate(pipe, 1, **extra)
    finally:
        hook.remove()
    return predictions[0]


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    """Max absolute difference over the max magnitude of ``b``, computed in fp32."""
    a, b = a.float(), b.float().to(a.device)
    return float((a - b).abs().max() / b.abs().max())


def assert_as_close_as_the_peer(
    ours: torch.Tensor, peer: torch.Tensor, truth: torch.Tensor, base: torch.Tensor, dtype: torch.dtype
) -> None:
    """Ours in ``dtype`` is within twice diffusers' own ``dtype`` error (plus two ulps) of the fp32 truth, and the
    adapters move the truth from the base output by more than that: the comparison could fail."""
    peer_error = relative(peer, truth)
    allowed = 2 * peer_error + 2 * torch.finfo(dtype).eps
    ours_error = relative(ours, truth)
    assert ours_error <= allowed, f"ours {ours_error:.2e} from fp32, diffusers {peer_error:.2e} ({dtype})"
    assert relative(truth, base) > allowed, f"the adapters barely move the output ({relative(truth, base):.2e})"


def snapshot(module: nn.Module) -> dict[str, torch.Tensor]:
    """A copy of every parameter and buffer (to check a restore bit by bit)."""
    return {key: value.detach().clone() for key, value in module.state_dict().items()}


def assert_restored(module: nn.Module, before: dict[str, torch.Tensor]) -> None:
    """Every parameter and buffer equals its snapshot bit for bit, and no key was added or lost."""
    after = module.state_dict()
    assert sorted(after) == sorted(before), "the module's keys changed"
    changed = [key for key, value in after.items() if not torch.equal(value, before[key])]
    assert not changed, f"{len(changed)} tensors not restored bit-exactly, e.g. {changed[:3]}"
