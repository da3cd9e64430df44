"""Which branches of classifier-free guidance the adapters act on.

Pipelines with CFG hand the denoiser one batch of two halves, ``[unconditional; conditional]`` (SD 1.x/2.x and
SDXL concatenate the negative-prompt half first), and combine the two predictions as
``ε = ε_u + g·(ε_c − ε_u)``. Composing the usual way (``"both"``) puts the adapters in both halves, so whatever an
adapter shifts alike in both is cancelled by the difference and only scaled by ``g`` where it differs. With
``"conditional"`` the unconditional half comes from the base model (its prompt encoded by the base text encoders)
and only the conditional half carries the composition, so the guidance difference is the adapters' whole effect plus
the prompt's: ``ε = ε_u^base + g·(ε_c^adapted − ε_u^base)``. This is the choice ComfyUI exposes by hooking LoRAs
onto the positive conditioning only; weak adapters reach their concept at lower weights this way.

Functions here slice a CFG batch's denoiser arguments into its two halves; the engine runs the unconditional half
with every adapter muted and hands the conditional half to the strategy.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from fusion.errors import CompositionError

BRANCHES = ("both", "conditional")
"""``"both"``: adapters on the whole CFG batch (what pipelines do); ``"conditional"``: on the conditional half only."""


def check_branches(branches: str) -> str:
    """``branches`` if it is one of :data:`BRANCHES`; a :class:`CompositionError` otherwise."""
    if branches not in BRANCHES:
        raise CompositionError(f"branches must be one of {BRANCHES}, got {branches!r}")
    return branches


def batch_slice(value: Any, start: int, stop: int, batch: int) -> Any:
    """Rows ``start:stop`` of every tensor whose first dimension is ``batch`` (recursing into dicts and sequences);
    everything else as it is."""
    import torch  # here, not at module level: the CLI reads BRANCHES without importing torch

    if isinstance(value, torch.Tensor):
        return value[start:stop] if value.dim() > 0 and value.shape[0] == batch else value
    if isinstance(value, Mapping):
        return {key: batch_slice(item, start, stop, batch) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(batch_slice(item, start, stop, batch) for item in value)
    return value


def cfg_halves(
    args: tuple[Any, ...], kwargs: Mapping[str, Any], batch: int, keep: frozenset[str]
) -> tuple[tuple[tuple[Any, ...], dict[str, Any]], tuple[tuple[Any, ...], dict[str, Any]]]:
    """The denoiser arguments of a CFG batch of ``batch`` samples split into the unconditional (first) and the
    conditional (second) half; keyword arguments named in ``keep`` are passed to both whole."""
    if batch % 2:
        raise CompositionError(
            f"adapters on the conditional branch only need a CFG batch of two halves, got a batch of {batch}",
            hint="run the pipeline with guidance_scale > 1, or compose with branches='both'",
        )
    half = batch // 2

    def part(start: int, stop: int) -> tuple[tuple[Any, ...], dict[str, Any]]:
        sliced_args = tuple(batch_slice(value, start, stop, batch) for value in args)
        sliced_kwargs = {
            key: value if key in keep else batch_slice(value, start, stop, batch) for key, value in kwargs.items()
        }
        return sliced_args, sliced_kwargs

    return part(0, half), part(half, batch)
