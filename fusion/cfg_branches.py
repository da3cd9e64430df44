"""Which branches of classifier-free guidance the adapters act on.

Pipelines with CFG hand the denoiser one batch of two halves, ``[unconditional; conditional]`` (SD 1.x/2.x and
SDXL concatenate the negative-prompt half first), and combine the two predictions as
``ε = ε_u + g·(ε_c − ε_u)``. Composing the usual way (``"both"``) puts the adapters in both halves, so whatever an
adapter shifts alike in both is cancelled by the difference and only scaled by ``g`` where it differs. With
``"conditional"`` the unconditional half comes from the base model (its prompt encoded by the base text encoders)
and only the conditional half carries the composition, so the guidance difference is the adapters' whole effect plus
the prompt's: ``ε = ε_u^base + g·(ε_c^adapted − ε_u^base)``. This is the choice ComfyUI exposes by hooking LoRAs
onto the positive conditioning only; weak adapters reach their concept at lower weights this way.

Per adapter (a mapping ``{name: "both" | "conditional"}``; adapters it does not name act on both branches, as in
pipelines): the unconditional half carries the ``"both"`` adapters merged at their weights and the conditional half
the whole composition. Adapters whose content the base model cannot draw (a new background's texture) are then not
fought by a base unconditional prediction in the late steps, while weak ones (styles) are still amplified by ``g``.

Functions here check a branch choice and slice a CFG batch's denoiser arguments into its two halves; the engine runs
the unconditional half with every adapter muted but the kept ones and hands the conditional half to the strategy.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, Union

from fusion.errors import CompositionError

BRANCHES = ("both", "conditional")
"""``"both"``: adapters on the whole CFG batch (what pipelines do); ``"conditional"``: on the conditional half only."""


Branches = Union[str, Mapping[str, str]]
"""One of :data:`BRANCHES` for every adapter, or a mapping from adapter names to one of them."""


def check_branches(branches: str) -> str:
    """``branches`` if it is one of :data:`BRANCHES`; a :class:`CompositionError` otherwise."""
    if branches not in BRANCHES:
        raise CompositionError(f"branches must be one of {BRANCHES}, got {branches!r}")
    return branches


def resolve_branches(branches: Branches, adapters: Iterable[str]) -> tuple[str, list[str]]:
    """The routing a branch choice asks of a composition of ``adapters``: ``("both", [])`` (the whole batch
    composed), or ``("conditional", kept)`` with ``kept`` the adapters the unconditional half still carries (none:
    the base model). A :class:`CompositionError` for unknown values or names outside the composition."""
    names = list(adapters)
    if isinstance(branches, str):
        return check_branches(branches), []
    if not isinstance(branches, Mapping):
        raise CompositionError(
            f"branches must be one of {BRANCHES} or a mapping from adapter names to them, got {branches!r}"
        )
    outside = [name for name in branches if name not in names]
    if outside:
        raise CompositionError(
            f"branches names adapters outside the composition: {outside}", hint=f"the composition has {names}"
        )
    for name, value in branches.items():
        if value not in BRANCHES:
            raise CompositionError(f"adapter {name!r}: branches must be one of {BRANCHES}, got {value!r}")
    kept = [name for name in names if branches.get(name, "both") == "both"]
    if len(kept) == len(names):
        return "both", []
    return "conditional", kept


def describe_branches(branches: Branches) -> str:
    """A branch choice as one line for image metadata: ``conditional`` or ``forest: both, zorbex: conditional``."""
    if isinstance(branches, str):
        return branches
    return ", ".join(f"{name}: {value}" for name, value in branches.items())


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
