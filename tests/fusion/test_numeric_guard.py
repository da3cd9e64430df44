"""Extreme numbers never reach an image silently: refused when a file is read, when a composition would overflow
the model's dtype, and when a denoiser step comes out non-finite (each names the adapter)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from composer import make_composable
from fusion.adapters import Adapter, LowRank
from fusion.errors import AdapterFormatError, ComposerError, CompositionError
from fusion.magnitude import delta_bound
from weights_index.reader import read_adapter

KEY = "unet.down_blocks.0.attentions.0.proj_out"
WIDTH = 32  # tiny-sd's first block width


def write_peft(path: Path, down: torch.Tensor, up: torch.Tensor, alpha: torch.Tensor | None = None) -> Path:
    tensors = {f"{KEY}.lora_A.weight": down, f"{KEY}.lora_B.weight": up}
    if alpha is not None:
        tensors[f"{KEY}.alpha"] = alpha
    save_file(tensors, str(path))
    return path


def factors(rank: int = 2, value: float = 0.1, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, ...]:
    return torch.full((rank, WIDTH), value, dtype=dtype), torch.full((WIDTH, rank), value, dtype=dtype)


@pytest.mark.parametrize(
    ("case", "down", "up", "alpha"),
    [
        ("f64 factor of 1e300", torch.full((2, WIDTH), 1e300, dtype=torch.float64), factors()[1], None),
        ("alpha of 1e300", *factors(), torch.tensor(1e300, dtype=torch.float64)),
        ("both factors 1e30", *factors(value=1e30), None),
        ("integer factors", *factors(dtype=torch.int32), None),
        ("bool factors", torch.ones(2, WIDTH, dtype=torch.bool), torch.ones(WIDTH, 2, dtype=torch.bool), None),
    ],
)
def test_extreme_or_non_floating_factors_are_refused_when_read(
    tmp_path: Path, case: str, down: torch.Tensor, up: torch.Tensor, alpha: torch.Tensor | None
) -> None:
    path = write_peft(tmp_path / "bad.safetensors", down, up, alpha)
    with pytest.raises(AdapterFormatError) as caught:
        read_adapter(path)
    assert "bad.safetensors" in str(caught.value), case


def test_ordinary_factors_are_read_and_bounded(tmp_path: Path) -> None:
    path = write_peft(tmp_path / "fine.safetensors", *factors(value=0.5), torch.tensor(4.0))
    adapter = read_adapter(path)
    (kind,) = adapter.layers.values()
    exact = float(kind.delta().abs().max())
    assert exact == pytest.approx(delta_bound(kind))  # constant factors: the bound is reached
    assert delta_bound(LowRank(torch.randn(3, 5), torch.randn(7, 3), 6.0)) >= float(
        LowRank(torch.randn(3, 5), torch.randn(7, 3), 6.0).delta().abs().max()
    )


def _adapter(name: str, value: float) -> Adapter:
    down, up = factors(value=value)
    return Adapter(name=name, family="sd1", layers={KEY.removeprefix("unet."): LowRank(down, up)})


def test_a_composition_that_would_overflow_a_half_precision_model_is_refused(tiny_sd: object) -> None:
    pipe = make_composable(tiny_sd.to(torch.float16))
    pipe.add_adapter(_adapter("calm", 0.1))
    pipe.add_adapter(_adapter("loud", 60.0))  # ΔW entries 2·60·60 = 7200; at weight 10 past fp16's 65504
    pipe.set_composition({"calm": 1.0, "loud": 1.0})
    with pytest.raises(CompositionError, match="loud") as caught:
        pipe.set_composition({"calm": 1.0, "loud": 10.0})
    assert "float16" in str(caught.value)
    assert pipe.composition is not None
    assert pipe.composition["weights"] == {"calm": 1.0, "loud": 1.0}


def test_a_non_finite_denoiser_step_raises_naming_the_adapter(tiny_sd: object) -> None:
    pipe = make_composable(tiny_sd)
    pipe.add_adapter(_adapter("calm", 0.01))
    pipe.add_adapter(_adapter("blowup", 1e17))  # finite and within float32, but q·k overflows
    pipe.set_composition({"calm": 1.0, "blowup": 1.0}, fuse=False)
    with pytest.raises(ComposerError, match="blowup") as caught:
        pipe("a cat", num_inference_steps=2, height=64, width=64, output_type="latent")
    assert "step 0" in str(caught.value)
    pipe.set_composition({"calm": 1.0})
    latents = pipe("a cat", num_inference_steps=2, height=64, width=64, output_type="latent").images
    assert bool(torch.isfinite(latents).all())


def test_a_rank_0_update_is_refused_when_built() -> None:
    with pytest.raises(ComposerError, match="rank 0"):
        LowRank(torch.zeros(0, WIDTH), torch.zeros(WIDTH, 0))
