"""Which branches of classifier-free guidance the adapters act on.

Pipelines with CFG hand the denoiser one batch of two halves, ``[unconditional; conditional]`` (SD 1.x/2.x and
SDXL concatenate the negative-prompt half first), and combine the two predictions as
``ε = ε_u + g·(ε_c − ε_u)``. Composing the usual way (``"both"``) puts the adapters in both halves, so whatever an
adapter shifts alike in both is cancelled by the difference and only scaled by ``g`` where it differs. With
``"conditional"`` the unconditional half comes from the base model (its prompt encoded by the base text encoders)
and only the conditional half carries the composition, so the guidance difference is the adapters' whole effect plus
the prompt's: ``ε = ε_u^base + g·(ε_c^adapted − ε_u^base)``. This is the choice ComfyUI exposes by hooking LoRAs
onto the positive conditioning only; weak adapters reach their concept at lower weights this way.

Per adapter (a mapping ``{name: "both" | "conditional" | share}``; adapters it does not name act on both branches,
as in pipelines): the method runs on each half, the conditional one with every adapter at its weight and the
unconditional one with the ``"both"`` adapters at theirs and the ``"conditional"`` ones at 0 (Switch's turns,
Composite's passes, CMLoRA's caches and the learned gates on both halves, each half keeping its own caches).
Adapters whose content the base model cannot draw (a new background's texture) are then
not fought by a base unconditional prediction in the late steps, while weak ones (styles) are still amplified by
``g``. A number ``s`` in [0, 1] is the share of the adapter's weight the unconditional half carries (``"both"`` is 1,
``"conditional"`` 0), as ComfyUI's hooked LoRAs take a strength per conditioning: where an adapter shifts both
predictions alike by ``Δ``, the guided prediction moves by ``(g − (g − 1)·s)·Δ``, so ``s`` sets the adapter's
strength between the unamplified ``Δ`` of both branches and the ``g·Δ`` of the conditional one; a share of 1 for
every adapter is the method on the whole batch. A number instead of a mapping is that share for every adapter.

Here: what a branch choice means (:func:`resolve_branches`), the choice in force for a composition and how a CFG call
runs by halves (:class:`BranchRouting`): the unconditional half on the base model (no adapter kept there) or through
the strategy with every adapter's weights times its share (the engine's
:meth:`fusion.engine.FusionEngine.unconditional`), the conditional half through the strategy, the denoiser arguments
sliced into the two halves (:func:`cfg_halves`). Nothing here imports torch at module level: the CLI reads
:data:`BRANCHES`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterable, Mapping
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Any, Union

from fusion.errors import CompositionError

if TYPE_CHECKING:
    from fusion.strategies.base import StepContext, Strategy

BRANCHES = ("both", "conditional")
"""``"both"``: adapters on the whole CFG batch (what pipelines do); ``"conditional"``: on the conditional half only."""


Branches = Union[str, float, Mapping[str, Union[str, float]]]
"""One of :data:`BRANCHES` or a share (0–1) of the adapters' weights that the unconditional half carries, for every
adapter, or a mapping from adapter names to either."""

_SHARES = {"both": 1.0, "conditional": 0.0}


def check_branches(branches: str) -> str:
    """``branches`` if it is one of :data:`BRANCHES`; a :class:`CompositionError` otherwise."""
    if branches not in BRANCHES:
        raise CompositionError(f"branches must be one of {BRANCHES}, got {branches!r}")
    return branches


def resolve_branches(branches: Branches, adapters: Iterable[str]) -> tuple[str, dict[str, float]]:
    """The routing a branch choice asks of a composition of ``adapters``: ``("both", {})`` (the whole batch
    composed), or ``("conditional", kept)`` with ``kept`` the adapters the unconditional half still carries and the
    share of their weight it carries (none: the base model). A :class:`CompositionError` for unknown values, shares
    outside [0, 1] or names outside the composition."""
    names = list(adapters)
    if isinstance(branches, str):
        return check_branches(branches), {}
    if _is_number(branches):
        shares = dict.fromkeys(names, _share("every adapter", branches))
    elif isinstance(branches, Mapping):
        outside = [name for name in branches if name not in names]
        if outside:
            raise CompositionError(
                f"branches names adapters outside the composition: {outside}", hint=f"the composition has {names}"
            )
        shares = {name: _share(f"adapter {name!r}", branches.get(name, "both")) for name in names}
    else:
        raise CompositionError(
            f"branches must be one of {BRANCHES}, a share, or a mapping from adapter names to them, got {branches!r}"
        )
    if all(share == 1.0 for share in shares.values()):
        return "both", {}
    return "conditional", {name: share for name, share in shares.items() if share > 0.0}


class BranchRouting:
    """The branch choice in force for the active composition (``mode`` and the unconditional half's ``shares``, from
    :func:`resolve_branches`), and whether the current generation's denoiser batches are ``[unconditional;
    conditional]`` CFG halves."""

    def __init__(self) -> None:
        self.mode = "both"
        self.shares: dict[str, float] = {}
        self.cfg_batches = False

    def choose(self, branches: Branches, adapters: Iterable[str]) -> None:
        """Resolve ``branches`` for a composition of ``adapters`` (a :class:`CompositionError` leaves it unchanged)."""
        self.mode, self.shares = resolve_branches(branches, adapters)

    def start_generation(self, cfg_halves: bool) -> None:
        """A generation starts; ``cfg_halves`` says whether its batches are CFG halves."""
        self.cfg_batches = cfg_halves

    @property
    def splits_batch(self) -> bool:
        """Whether each denoiser call is run half by half (adapters on the conditional branch, CFG halves)."""
        return self.mode == "conditional" and self.cfg_batches

    def run_halves(
        self,
        ctx: StepContext,
        strategy: Strategy,
        unconditional: Callable[[], AbstractContextManager[None]],
        keep: frozenset[str],
    ) -> tuple[Any, Any, StepContext]:
        """One CFG call half by half: the unconditional half under ``unconditional()`` (through the strategy where
        some adapter keeps a share there, the denoiser alone otherwise), the conditional half through the strategy;
        keyword arguments named in ``keep`` go to both whole. Returns both outputs and the conditional half's context
        (to wrap their predictions stacked in the batch's order). The strategy sees two calls at one step, as under
        true-CFG pipelines, so per-call state (CMLoRA's caches) stays apart."""
        batch, half = ctx.batch_size, ctx.batch_size // 2
        contexts = [
            dataclasses.replace(
                ctx,
                timestep=batch_slice(ctx.timestep, start, start + half, batch),
                batch_size=half,
                args=half_args,
                kwargs=half_kwargs,
            )
            for start, (half_args, half_kwargs) in zip((0, half), cfg_halves(ctx.args, ctx.kwargs, batch, keep))
        ]
        with unconditional():
            unconditional_output = strategy.step(contexts[0]) if self.shares else contexts[0].run()
        return unconditional_output, strategy.step(contexts[1]), contexts[1]

    def unconditional_scale(self, adapter_names: Iterable[str]) -> list[float] | None:
        """The share of each adapter's weight (in ``adapter_names`` order) the unconditional half carries, or None
        where no adapter is kept there (the base model computes that half)."""
        if not self.shares:
            return None
        return [self.shares.get(name, 0.0) for name in adapter_names]


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _share(subject: str, value: Any) -> float:
    """The unconditional half's share of the weight of ``subject`` (``adapter 'name'`` or ``every adapter``) for one
    branch value."""
    if isinstance(value, str) and value in _SHARES:
        return _SHARES[value]
    if _is_number(value) and math.isfinite(value) and 0 <= value <= 1:
        return float(value)
    raise CompositionError(
        f"{subject}: branches must be one of {BRANCHES} or a share of their weight between 0 and 1, got {value!r}"
    )


def describe_branches(branches: Branches) -> str:
    """A branch choice as one line for image metadata: ``conditional`` or ``forest: both, zorbex: 0.5``."""
    if not isinstance(branches, Mapping):
        return str(branches)
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
