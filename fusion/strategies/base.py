"""The strategy interface: what a composition method sees of each denoiser call, and what it may do with it.

A :class:`~fusion.engine.FusionEngine` (what a strategy sees of it: :class:`Engine`) hooks the denoiser (UNet or DiT)
through diffusers' HookRegistry. Every call the pipeline makes goes to the active :class:`Strategy`'s
:meth:`Strategy.step` with a :class:`StepContext`; the strategy returns what the pipeline expects from the denoiser
(whatever :meth:`StepContext.run` returned, or a combination of such).

(a) Per-step gates / weights. Adapters are indexed ``a = 0..A-1`` in ``engine.adapter_names`` order; layers are grouped
    into ``G = len(engine.group_names)`` groups, the A1111 block-weight blocks of ``engine.layout``
    (:class:`fusion.layer_groups.BlockLayout`: ``IN04``, ``M00``, ``OUT03``, ``D00``, ``S05``, ``BASE``/``CLIP``/``T5``
    for text encoders, ``OTHER``).
    Before running the denoiser a strategy calls one of

    - ``engine.set_weights(w)``: unfused, ``w`` is (A,) (same weight in every group) or (A, G). Cheap: it only
      swaps a shared tensor that every composed layer reads lazily; no module walk.
    - ``engine.fuse(w)``: same shapes; writes Σ wᵢ·ΔWᵢ into the base weights (from pristine copies, so calling it
      again with other weights is an exact switch); ``engine.unfuse()`` restores the pristine weights bit-exactly.
    - ``engine.weight_table(weights, num_steps)``: the (A, G, S) table ``weight[adapter, group, step]`` for a user
      weight spec (floats, keyframe strings, block-weight lists, callables), so ``table[:, :, ctx.step]`` is the
      (A, G) argument for this step (built with :func:`fusion.schedules.build_weight_table`).

(b) Several passes or one batched pass. ``ctx.run()`` calls the original denoiser forward with the pipeline's own
    arguments (``ctx.run(**overrides)`` replaces keyword arguments) and may be called any number of times, with
    different weights set in between; the strategy combines the outputs (use :func:`output_tensor` /
    :func:`with_output_tensor` to unwrap and rewrap the denoiser's return value). For one batched pass,
    ``engine.set_sample_weights(m)`` with ``m`` (N, A) or (N, A, G) gives sample ``n`` of the batch its own adapter
    weights (``None`` switches per-sample gating off), and ``ctx.run_tiled(k)`` runs the denoiser ONCE on the inputs
    repeated ``k`` times along the batch (sample ``i·B + b`` is copy ``i`` of sample ``b``) and returns the
    prediction reshaped to (k, B, ...). Per-sample weights apply to unfused layers only: unfuse first.
    ``ctx.wrap(tensor)`` puts a combined prediction back into the denoiser's native return type.

(c) The step index. ``ctx.step`` is the 0-based index of this call's timestep in ``pipe.scheduler.timesteps`` and
    ``ctx.num_steps`` its length (img2img runs a suffix of that table, so its first step is not 0), read from the
    scheduler (:class:`fusion.steps.StepClock`). At the first call of each generation the engine calls
    :meth:`Strategy.start_generation` with ``num_steps``; a strategy that needs per-generation tables (schedules,
    caches) builds them there. Several calls at one timestep (true-CFG pipelines call the denoiser twice per step)
    get the same ``ctx.step``. A strategy whose :attr:`Strategy.needs_steps` is true is refused where no step can
    be known (:class:`fusion.errors.StepUnknownError`).

(d) Per-adapter outputs. A strategy may set ``layer.mixer`` on composed layers (``engine.layers``): the layer then
    hands ``mixer(layer, b, l)`` its base output b and every low-rank adapter's own output lₖ = wₖ·ΔWₖ·x, stacked
    (K, …, out) in one batched op, and returns what the mixer returns (gated fusion, :mod:`fusion.gates`). Clear
    the mixers in :meth:`Strategy.deactivate`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol, Union

import torch
from torch import nn

from fusion.adapters import Adapter
from fusion.errors import CompositionError
from fusion.gate_state import GateState
from fusion.layer_groups import BlockLayout
from fusion.layers import ComposedLayer
from fusion.schedules import is_step_dependent

WeightSpec = Union[float, str, list, Callable[..., Any]]
"""One adapter's weight in a composition: a constant, a keyframe string (``"0@0,1@0.5"``), a block-weight list, or a
callable (see ``fusion.schedules``)."""

NON_BATCH_ARGUMENTS = frozenset(
    {"img_ids", "txt_ids", "return_dict", "joint_attention_kwargs", "cross_attention_kwargs"}
)
"""Denoiser keyword arguments never tiled along the batch, even when their first dimension happens to equal it."""


class Engine(Protocol):
    """What a strategy may use of the engine it runs in (sections (a) and (d) of the module docstring);
    :class:`fusion.engine.FusionEngine` is the one the pipelines use."""

    denoiser: nn.Module
    adapters: dict[str, Adapter]
    group_names: list[str]
    layout: BlockLayout
    state: GateState

    @property
    def adapter_names(self) -> list[str]:
        """Attached adapters in index order (the A axis of every weight tensor)."""

    @property
    def layers(self) -> Mapping[str, ComposedLayer]:
        """The composed layers, by key."""

    @property
    def fused(self) -> bool:
        """True while adapter deltas are written into the base weights."""

    def set_weights(self, weights: torch.Tensor | Sequence[float]) -> None:
        """Unfused adapter weights, (A,) or (A, G)."""

    def zero_weights(self) -> None:
        """Every unfused adapter weight to zero, per-sample weights off."""

    def set_sample_weights(self, weights: torch.Tensor | None) -> None:
        """Per-sample adapter weights (N, A) or (N, A, G), or None to switch them off."""

    def fuse(self, weights: torch.Tensor | Sequence[float]) -> None:
        """Write pristine W + Σ wᵢΔWᵢ into the composed layers' weights."""

    def unfuse(self) -> None:
        """Restore every fused weight from its pristine copy."""

    def weight_table(self, weights: Mapping[str, WeightSpec], num_steps: int) -> torch.Tensor:
        """weight[adapter, group, step] (A, G, S) for a composition's weight specs."""


def _tile(value: Any, k: int, batch: int) -> Any:
    """Repeat every tensor whose first dimension is ``batch`` ``k`` times along it (recursing into dicts/sequences)."""
    if isinstance(value, torch.Tensor):
        if value.dim() > 0 and value.shape[0] == batch:
            return value.repeat(k, *([1] * (value.dim() - 1)))
        return value
    if isinstance(value, Mapping):
        return {key: _tile(item, k, batch) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_tile(item, k, batch) for item in value)
    return value


def output_tensor(output: Any) -> torch.Tensor:
    """The prediction tensor inside a denoiser's return value (a tensor, a tuple, or a diffusers output object)."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, tuple):
        return output[0]
    return output.sample


def with_output_tensor(output: Any, tensor: torch.Tensor) -> Any:
    """``output`` with its prediction replaced by ``tensor``, in the same structure the pipeline expects."""
    if isinstance(output, torch.Tensor):
        return tensor
    if isinstance(output, tuple):
        return (tensor, *output[1:])
    return type(output)(sample=tensor)


def check_composition(method: str, weights: Mapping[str, Any], options: Mapping[str, Any], known: str) -> None:
    """The checks a method's constructor starts with: no option it does not know (``known`` names its own, for the
    hint) and at least one adapter."""
    if options:
        raise CompositionError(f"{method} got unknown options {sorted(options)}", hint=f"use {known}")
    if not weights:
        raise CompositionError(f"{method} needs at least one adapter")


def require_fused(method: str, fuse: bool | None, reason: str) -> None:
    """Refuse ``fuse=False`` for a method that can only write its result into the weights (``reason`` says why)."""
    if fuse is False:
        raise CompositionError(
            f"{method} runs fused only: {reason}",
            hint="leave fuse unset, and compose on both CFG branches (branches='both')",
        )


@dataclass
class StepContext:
    """One denoiser call as the engine hands it to a strategy.

    ``args`` / ``kwargs`` are the pipeline's arguments to the denoiser; ``batch_size`` is the first dimension of its
    latent input; ``timestep`` the raw timestep argument.
    """

    engine: Engine
    step: int
    num_steps: int
    timestep: Any
    batch_size: int
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    forward: Callable[..., Any] = field(repr=False)
    _last_output: Any = field(default=None, repr=False)

    def run(self, **overrides: Any) -> Any:
        """Call the original denoiser forward with the pipeline's arguments (keyword ``overrides`` replace theirs)."""
        output = self.forward(*self.args, **{**self.kwargs, **overrides})
        self._last_output = output
        return output

    def run_tiled(self, k: int) -> torch.Tensor:
        """Run the denoiser once on the batch repeated ``k`` times; return the prediction as (k, B, ...)."""
        args = tuple(_tile(value, k, self.batch_size) for value in self.args)
        kwargs = {
            key: value if key in NON_BATCH_ARGUMENTS else _tile(value, k, self.batch_size)
            for key, value in self.kwargs.items()
        }
        output = self.forward(*args, **kwargs)
        self._last_output = output
        prediction = output_tensor(output)
        return prediction.reshape(k, self.batch_size, *prediction.shape[1:])

    def wrap(self, prediction: torch.Tensor) -> Any:
        """``prediction`` in the denoiser's native return structure (what the pipeline expects from this call):
        the structure of the last :meth:`run` / :meth:`run_tiled` output, else from ``return_dict`` and the model
        (a tuple, ``UNet2DConditionOutput`` for UNets, ``Transformer2DModelOutput`` for DiTs)."""
        if self._last_output is not None:
            return with_output_tensor(self._last_output, prediction)
        if self.kwargs.get("return_dict", True) is False:
            return (prediction,)
        from diffusers.models.modeling_outputs import Transformer2DModelOutput
        from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput

        if hasattr(self.engine.denoiser, "up_blocks"):
            return UNet2DConditionOutput(sample=prediction)
        return Transformer2DModelOutput(sample=prediction)


def check_in_composition(option: str, names: Iterable[str], weights: Mapping[str, WeightSpec]) -> None:
    """Raise :class:`CompositionError` when a strategy ``option`` (``"composite mix"``) names adapters that are not
    among the composition's ``weights``."""
    outside = [name for name in names if name not in weights]
    if outside:
        raise CompositionError(f"{option} given for adapters outside the composition: {outside}")


class Strategy(ABC):
    """A composition method: decides, for every denoiser call, which adapters count and how much.

    Subclasses set ``name`` (the ``method=`` string) and take ``(weights, *, fuse=None, **options)``; they validate
    options in ``__init__`` (raise :class:`fusion.errors.CompositionError`), then the engine calls :meth:`activate`
    once, :meth:`start_generation` at each generation's first denoiser call, :meth:`step` at every call, and
    :meth:`deactivate` when the composition is replaced or cleared.
    """

    name: ClassVar[str]
    fused_only: ClassVar[bool] = False
    """Whether the method can only write its result into the weights (then it serves both CFG branches alike and
    refuses ``fuse=False``, which per-branch compositions need)."""

    def __init__(self, weights: Mapping[str, WeightSpec], *, fuse: bool | None = None, **options: Any) -> None:
        self.weights = dict(weights)
        self.fuse = fuse
        self.options = options

    @property
    def needs_steps(self) -> bool:
        """True when this composition computes differently at different steps (so it needs each call's step index):
        here, when some adapter's weight spec changes over steps; step-rotating methods say so too."""
        return any(is_step_dependent(spec) for spec in self.weights.values())

    def activate(self, engine: Engine) -> None:  # noqa: B027 - optional hook
        """Called once when this strategy becomes the engine's active one (adapters are attached). Install weights
        here (``engine.fuse`` or ``engine.set_weights``): the previous composition's fused weights may still be in
        place, so that fusing again is an in-place switch."""

    def start_generation(self, engine: Engine, num_steps: int) -> None:  # noqa: B027 - optional hook
        """Called at the first denoiser call of a generation, once ``num_steps`` is known."""

    @abstractmethod
    def step(self, ctx: StepContext) -> Any:
        """Compute this denoiser call: set weights, call ``ctx.run()`` (once or more), return the output."""

    def deactivate(self, engine: Engine) -> None:
        """Undo what this strategy did: zero every adapter weight and drop per-sample ones. Fused weights are left
        for the engine (the next strategy switches them in place, or they are restored)."""
        engine.zero_weights()
