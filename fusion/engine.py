"""FusionEngine: adapters on a denoiser (and its text encoders), with a strategy driving every denoiser call.

Attaching, validating and weighting adapters is :class:`fusion.attachment.AttachedAdapters`' work (over a
:class:`fusion.layer_index.LayerIndex` of the model); the engine adds the strategy and routes each denoiser call.

The engine enters the denoiser through a diffusers hook (:mod:`fusion.denoiser_hook`), so it composes with the
model's other diffusers and accelerate hooks. Each call's step index comes from the pipeline's scheduler
(:class:`fusion.steps.StepClock`: O(1) per call); the call is handed to the active
:class:`fusion.strategies.base.Strategy` as a :class:`fusion.strategies.base.StepContext`. Where no step can be
known, a strategy whose weights change over steps is refused (:class:`fusion.errors.StepUnknownError`); others run
as step 0 of 1.

With :meth:`FusionEngine.set_branches` ``("conditional")`` and a generation started with ``cfg_halves=True``, each
call's unconditional half runs on the base weights (every adapter muted) and only the conditional half goes to the
strategy (:mod:`fusion.cfg_branches`); with per-adapter shares the strategy runs on each half, the unconditional one
with every adapter's weights times its share (:meth:`FusionEngine.unconditional`), so a share of 1 for every adapter
is the method on the whole batch.

:meth:`FusionEngine.clear` restores every touched weight from its pristine copy, puts every base module back in its
parent and detaches the hook, leaving the model bit-identical to before the engine existed (and every hook it had).
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from fusion.attachment import AttachedAdapters
from fusion.cfg_branches import Branches, BranchRouting
from fusion.denoiser_hook import attach, detach, reroute
from fusion.errors import CompositionError, StepUnknownError
from fusion.layer_index import LayerIndex
from fusion.steps import StepClock
from fusion.strategies.base import NON_BATCH_ARGUMENTS, StepContext, Strategy, output_tensor

logger = logging.getLogger(__name__)

_LATENT_ARGUMENTS = ("sample", "hidden_states")


class FusionEngine(AttachedAdapters):
    """Adapters on a denoiser (UNet2DConditionModel or FluxTransformer2DModel) and its text encoders.

    ``text_encoders`` maps ``"text_encoder"`` / ``"text_encoder_2"`` to modules (None entries are skipped);
    ``scheduler`` is the pipeline's scheduler (or a callable returning it) whose step index every call reads
    (without it every call is step 0 of 1, and step-dependent compositions are refused).
    """

    def __init__(
        self,
        denoiser: nn.Module,
        *,
        text_encoders: Mapping[str, nn.Module | None] | None = None,
        scheduler: Any = None,
        family: str = "unknown",
    ) -> None:
        super().__init__(denoiser, LayerIndex(denoiser, text_encoders=text_encoders, family=family))
        self.family = family
        self.clock = None if scheduler is None else StepClock(scheduler)
        self.routing = BranchRouting()
        self._fresh = True
        self._last_step = -1
        self._num_steps = 0
        self._generation: Any = None
        self._timestep_position = _timestep_position(denoiser)
        self._hook = attach(denoiser, self._route)

    # ----- strategies ------------------------------------------------------------------------------------------

    def set_strategy(self, strategy: Strategy | None) -> None:
        """Make ``strategy`` the active one (the previous one is deactivated; None restores the base weights).
        Replacing one fused composition by another switches the fused weights in place."""
        if strategy is not None:
            self.check_attached(strategy.weights)
            if self.clock is None and strategy.needs_steps:
                raise StepUnknownError(
                    f"{strategy.name} with these weights changes over steps, but this engine has no scheduler to "
                    "read the step index from",
                    hint="create the engine with scheduler=pipe.scheduler (make_composable does), or use weights "
                    "that do not change over steps",
                )
            self.check_magnitude(strategy.weights)
        self._suspend()
        if strategy is None:
            self.unfuse()
        self.zero_weights()
        self.strategy = strategy
        self.reset_generation()
        self._resume()
        if strategy is None:
            logger.debug("composition cleared: base weights restored")
        else:
            logger.debug("composition set: %s over %s", type(strategy).__name__, list(strategy.weights))

    def _check_finite(self, output: Any, step: int) -> Any:
        """Raise :class:`CompositionError` naming the active adapters (likeliest culprit first) when a composed
        denoiser call returned NaN or Inf: the image would come out black or NaN."""
        tensor = output_tensor(output)
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            weights = self.strategy.weights if self.strategy else {}
            active = self.largest_updates_first(name for name in self.adapter_names if name in weights)
            raise CompositionError(
                f"the denoiser's output at step {step} holds NaN or Inf with adapter(s) {active} composed; no image "
                "is made",
                hint=f"lower the weight of {active[0]!r} or leave it out" if active else None,
            )
        return output

    # ----- generations and CFG branches ------------------------------------------------------------------------

    def reset_generation(self, *, cfg_halves: bool = False) -> None:
        """The next denoiser call starts a generation (the mixin calls this per pipeline call); puts the engine's
        hook back in the denoiser's call path if a re-installed wrapper dropped it (model cpu offload does).
        ``cfg_halves`` says this generation's denoiser batches are ``[unconditional; conditional]`` CFG halves."""
        self._fresh = True
        self.routing.start_generation(cfg_halves)
        reroute(self.denoiser, self._hook)

    @property
    def branches(self) -> str:
        """The CFG branches the adapters act on: ``"both"`` or ``"conditional"`` (see :meth:`set_branches`)."""
        return self.routing.mode

    def set_branches(self, branches: Branches) -> None:
        """Which CFG branches the adapters act on: ``"both"``, ``"conditional"`` or a per-adapter mapping of the two
        or of unconditional shares (see :mod:`fusion.cfg_branches`). In generations started with
        ``cfg_halves=True`` the unconditional half then runs under :meth:`unconditional`. Set the strategy first: a
        mapping is resolved against its adapters."""
        self.routing.choose(branches, self.strategy.weights if self.strategy is not None else {})

    @contextmanager
    def unconditional(self) -> Iterator[None]:
        """What the unconditional half of a conditional-branch composition runs under: every adapter muted, or with
        per-adapter shares every adapter's weights, as the strategy installs them, times its share (0 for the
        adapters on the conditional branch only); the strategy's own weights are in place again after the block."""
        scale = self.routing.unconditional_scale(self.adapter_names)
        with self.muted() if scale is None else self.scaled(scale):
            yield

    # ----- the hooked forward ----------------------------------------------------------------------------------

    def _timestep_argument(self, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> Any:
        if "timestep" in kwargs:
            return kwargs["timestep"]
        position = self._timestep_position
        return args[position] if position is not None and len(args) > position else None

    def step_of(self, timestep: Any, strategy: Strategy) -> tuple[int, int, bool]:
        """(step index, number of steps, whether a generation starts here) for a denoiser call; raises
        :class:`StepUnknownError` when the step cannot be known and ``strategy`` needs it."""
        found = None if self.clock is None else self.clock.locate(timestep)
        if found is None:
            if strategy.needs_steps:
                raise StepUnknownError(
                    f"{strategy.name} with these weights changes over steps, but the scheduler does not say which "
                    "step this denoiser call is (no timesteps set, or a call outside a generation)",
                    hint="run the denoiser through the pipeline (pipe(...)), or use weights that do not change over "
                    "steps",
                )
            step, num_steps = 0, 1
        else:
            step, num_steps = found
        generation = None if self.clock is None else self.clock.generation
        start = (
            self._fresh or generation is not self._generation or num_steps != self._num_steps or step < self._last_step
        )
        self._fresh = False
        self._generation = generation
        self._num_steps = num_steps
        self._last_step = step
        return step, num_steps, start

    def _route(self, forward: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """One denoiser call (from the hook): find the step, hand the call to the strategy (half by half where the
        adapters act on the conditional branch: :meth:`fusion.cfg_branches.BranchRouting.run_halves`)."""
        strategy = self.strategy
        if strategy is None:
            return forward(*args, **kwargs)
        timestep = self._timestep_argument(args, kwargs)
        step, num_steps, start = self.step_of(timestep, strategy)
        if start:
            strategy.start_generation(self, num_steps)
        latent = args[0] if args else next((kwargs[k] for k in _LATENT_ARGUMENTS if k in kwargs), None)
        ctx = StepContext(
            engine=self,
            step=step,
            num_steps=num_steps,
            timestep=timestep,
            batch_size=int(latent.shape[0]) if isinstance(latent, torch.Tensor) else 1,
            args=args,
            kwargs=kwargs,
            forward=forward,
        )
        if not self.routing.splits_batch:
            return self._check_finite(strategy.step(ctx), step)
        unconditional, conditional, half = self.routing.run_halves(
            ctx, strategy, self.unconditional, NON_BATCH_ARGUMENTS
        )
        stacked = torch.cat([output_tensor(unconditional), output_tensor(conditional)])
        return self._check_finite(half.wrap(stacked), step)

    # ----- teardown --------------------------------------------------------------------------------------------

    def clear(self) -> None:
        """Deactivate the strategy, restore every weight from its pristine copy, put every base module back and
        detach the hook: the model is bit-identical to before the engine attached, with every other hook in place."""
        if self.strategy is not None:
            self.strategy.deactivate(self)
            self.strategy = None
        self._detach_all()
        self.set_branches("both")
        detach(self.denoiser, self._hook)


def _timestep_position(denoiser: nn.Module) -> int | None:
    """Position of ``timestep`` among the denoiser forward's positional arguments (None if it has none)."""
    params = list(inspect.signature(type(denoiser).forward).parameters)[1:]
    return params.index("timestep") if "timestep" in params else None
