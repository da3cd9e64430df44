"""FusionEngine: attaches adapters to a denoiser (and its text encoders) and lets a strategy drive every step.

Attaching walks the model once: every ``nn.Linear`` / ``nn.Conv2d`` of the denoiser (keyed by its module path) and of
the text encoders (keyed ``text_encoder.<path>`` / ``text_encoder_2.<path>``) is indexed with its weight shape and its
layer group (:class:`fusion.layer_groups.BlockLayout`). Quantised weights (bitsandbytes, GGUF, torchao: anything not
a plain floating tensor) and weights offloaded to the meta device are refused with
:class:`fusion.errors.UnsupportedModelError` before anything changes. Adding adapters is atomic: every key and shape
of every adapter is validated (and a SHiRA adapter's base fingerprint checked against the pristine weights),
weight-relative updates (IA3, OFT, DoRA, GLoRA) resolved to ΔW = f(W₀) − W₀ against the pristine weights, and every
tensor converted to its target's device and dtype before the first module is touched; a module is replaced by a
:class:`fusion.layers.ComposedLayer` only when some adapter targets it.

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

import dataclasses
import inspect
import logging
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from fusion.adapters import Adapter, AdapterKind, Dense, LowRank, Sparse, validate_shapes
from fusion.cfg_branches import Branches, batch_slice, cfg_halves, resolve_branches
from fusion.denoiser_hook import attach, detach, reroute
from fusion.errors import CompositionError, ShapeMismatchError, StepUnknownError, UnsupportedModelError
from fusion.layer_groups import BlockLayout
from fusion.layers import ComposedLayer, GateState, compose, is_composable
from fusion.magnitude import check_composed_magnitude, delta_bound
from fusion.relative import Relative
from fusion.schedules import build_weight_table
from fusion.sparse import check_base_fingerprint
from fusion.steps import StepClock
from fusion.strategies.base import NON_BATCH_ARGUMENTS, StepContext, Strategy, WeightSpec, output_tensor

logger = logging.getLogger(__name__)

_LATENT_ARGUMENTS = ("sample", "hidden_states")
_PLAIN_FLOATS = (torch.float64, torch.float32, torch.float16, torch.bfloat16)


class _Target:
    """One composable module: where it lives (parent, attribute) and the base module itself."""

    __slots__ = ("attr", "base", "group", "parent")

    def __init__(self, parent: nn.Module, attr: str, base: nn.Module, group: int) -> None:
        self.parent = parent
        self.attr = attr
        self.base = base
        self.group = group


def _index_modules(root: nn.Module, prefix: str) -> dict[str, tuple[nn.Module, str, nn.Module]]:
    """Every composable module under ``root`` as key → (parent, attribute name, module)."""
    found: dict[str, tuple[nn.Module, str, nn.Module]] = {}
    for parent_name, parent in root.named_modules():
        for attr, child in parent.named_children():
            module = child.base if isinstance(child, ComposedLayer) else child
            if is_composable(module):
                path = f"{parent_name}.{attr}" if parent_name else attr
                found[prefix + path] = (parent, attr, module)
    return found


def _check_plain(key: str, module: nn.Module) -> None:
    """Refuse weights the engine cannot restore bit-exactly or add to: quantised or offloaded to meta."""
    weight = module.weight
    if type(weight) not in (torch.Tensor, nn.Parameter) or weight.dtype not in _PLAIN_FLOATS:
        raise UnsupportedModelError(
            f"{key!r} holds a {type(weight).__name__} of {weight.dtype} (a quantised weight); LoRA Composer composes "
            "plain floating-point weights only",
            hint="load the base model unquantised (fp16/bf16/fp32), or use diffusers' load_lora_weights for "
            "quantised bases",
        )
    if weight.is_meta:
        raise UnsupportedModelError(
            f"{key!r} is on the meta device (sequential cpu offload or an unloaded model)",
            hint="compose before enable_sequential_cpu_offload is not possible; use enable_model_cpu_offload",
        )


def _normalise(kind: AdapterKind, module: nn.Module) -> AdapterKind:
    """Reshape 2-D LoRA factors aimed at a 1×1 conv into conv factors (files store both ways)."""
    is_pointwise = isinstance(module, nn.Conv2d) and tuple(module.weight.shape[2:]) == (1, 1)
    if isinstance(kind, LowRank) and not kind.is_conv and is_pointwise:
        return LowRank(kind.down[:, :, None, None], kind.up[:, :, None, None], kind.alpha)
    return kind


MAGNITUDE_CHECK_STEPS = 16
"""Steps a composition's schedules are sampled at when its largest weights are bounded."""


class FusionEngine:
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
        self.denoiser = denoiser
        self.family = family
        self.clock = None if scheduler is None else StepClock(scheduler)
        self.layout = BlockLayout.from_denoiser(family, denoiser)
        self.group_names: list[str] = list(self.layout.groups)
        param = next(denoiser.parameters())
        self.state = GateState(len(self.group_names), param.device)
        self._targets: dict[str, _Target] = {}
        roots = [("", denoiser)] + [(f"{k}.", m) for k, m in (text_encoders or {}).items() if m is not None]
        for prefix, root in roots:
            for key, (parent, attr, module) in _index_modules(root, prefix).items():
                _check_plain(key, module)
                self._targets[key] = _Target(parent, attr, module, self.layout.group_index(key))
        self.expected_shapes = {key: tuple(t.base.weight.shape) for key, t in self._targets.items()}
        self.adapters: dict[str, Adapter] = {}
        self._bounds: dict[str, dict[str, float]] = {}
        self._layers: dict[str, ComposedLayer] = {}
        self._fused = False
        self.strategy: Strategy | None = None
        self._fresh = True
        self._last_step = -1
        self._num_steps = 0
        self._generation: Any = None
        self.branches = "both"
        self._unconditional_shares: dict[str, float] = {}
        self._cfg_halves = False
        self._timestep_position = self._find_timestep_position(denoiser)
        self._hook = attach(denoiser, self._route)

    # ----- adapters --------------------------------------------------------------------------------------------

    @property
    def adapter_names(self) -> list[str]:
        """Attached adapters in index order (the A axis of every weight tensor)."""
        return list(self.adapters)

    @property
    def layers(self) -> Mapping[str, ComposedLayer]:
        """The composed layers, by key."""
        return self._layers

    def validate(self, adapters: Iterable[Adapter]) -> list[Adapter]:
        """Check names and every key/shape against the model; return the adapters with keys and factor layouts
        normalised to the model's (1×1-conv factors, ``text_model.`` prefixes) and weight-relative updates resolved
        to ΔW = f(W₀) − W₀ against the pristine weights (:mod:`fusion.relative`). Touches no model tensor."""
        prepared: list[Adapter] = []
        seen = set(self.adapters)
        for adapter in adapters:
            if adapter.name in seen:
                raise CompositionError(
                    f"an adapter named {adapter.name!r} is already attached",
                    path=adapter.source,
                    hint="give it another name or remove the attached one first",
                )
            seen.add(adapter.name)
            layers = {
                k: _normalise(v, self._targets[k].base) if k in self._targets else v for k, v in adapter.layers.items()
            }
            text = {}
            for key, kind in adapter.text_encoder_layers.items():
                key = self._text_key(key)
                text[key] = _normalise(kind, self._targets[key].base) if key in self._targets else kind
            normalised = Adapter(
                name=adapter.name,
                family=adapter.family,
                layers=layers,
                text_encoder_layers=text,
                task_prompt=adapter.task_prompt,
                needs_input_image=adapter.needs_input_image,
                meta=adapter.meta,
                source=adapter.source,
            )
            validate_shapes(normalised, self.expected_shapes)
            check_base_fingerprint(normalised, self._pristine_weights(normalised))
            normalised = self._resolve_relative(normalised)
            for key, kind in normalised.all_layers():
                base = self._targets[key].base
                if isinstance(kind, Dense) and kind.bias is not None and base.bias is None:
                    raise ShapeMismatchError(
                        f"adapter {adapter.name!r} updates the bias of {key!r}, which has no bias in this model",
                        path=adapter.source,
                        hint="the adapter was made for a different base model",
                    )
                if isinstance(kind, LowRank) and kind.is_conv and getattr(base, "groups", 1) != 1:
                    raise ShapeMismatchError(
                        f"adapter {adapter.name!r} puts a LoCon update on grouped conv {key!r}",
                        path=adapter.source,
                    )
            prepared.append(normalised)
        return prepared

    def _pristine(self, key: str) -> torch.Tensor:
        """The base weight of ``key`` as it was before any fusing."""
        layer = self._layers.get(key)
        return layer.pristine_weight() if layer is not None else self._targets[key].base.weight

    def _resolve_relative(self, adapter: Adapter) -> Adapter:
        """Turn weight-relative updates (IA3, OFT, DoRA, GLoRA) into ΔW = f(W₀) − W₀ against the pristine weights
        (:mod:`fusion.relative`); other updates pass through untouched."""
        if not any(isinstance(kind, Relative) for _, kind in adapter.all_layers()):
            return adapter

        def resolved(key: str, kind: AdapterKind) -> AdapterKind:
            return kind.resolve(self._pristine(key)) if isinstance(kind, Relative) else kind

        return dataclasses.replace(
            adapter,
            layers={k: resolved(k, v) for k, v in adapter.layers.items()},
            text_encoder_layers={k: resolved(k, v) for k, v in adapter.text_encoder_layers.items()},
        )

    def _pristine_weights(self, adapter: Adapter) -> dict[str, torch.Tensor]:
        """The unfused base weights of the layers ``adapter`` adapts (for its base fingerprint, if it has one)."""
        meta = adapter.meta.get("safetensors_metadata", adapter.meta)
        if not isinstance(meta, Mapping) or not meta.get("base_fingerprint"):
            return {}
        weights: dict[str, torch.Tensor] = {}
        for key, _ in adapter.all_layers():
            weights[key] = self._pristine(key)
        return weights

    def _text_key(self, key: str) -> str:
        """Files name CLIP layers ``text_encoder.text_model.encoder…``; newer transformers drop ``text_model``."""
        component, _, path = key.partition(".")
        if key not in self._targets and path.startswith("text_model."):
            bare = f"{component}.{path.removeprefix('text_model.')}"
            if bare in self._targets:
                return bare
        return key

    def _to_targets(self, adapter: Adapter) -> Adapter:
        """A copy of ``adapter`` whose every update sits on its target weight's device and dtype (sparse positions
        as int64: one widening pass per attach, cheaper scatters and gathers on every switch)."""

        def move(key: str, kind: AdapterKind) -> AdapterKind:
            weight = self._targets[key].base.weight
            if isinstance(kind, Sparse):  # int64 positions: the faster index_copy_/take (fusion.sparse_switching)
                return kind.to(weight.device, weight.dtype, index_dtype=torch.int64)
            return kind.to(weight.device, weight.dtype)

        return Adapter(
            name=adapter.name,
            family=adapter.family,
            layers={k: move(k, v) for k, v in adapter.layers.items()},
            text_encoder_layers={k: move(k, v) for k, v in adapter.text_encoder_layers.items()},
            task_prompt=adapter.task_prompt,
            needs_input_image=adapter.needs_input_image,
            meta=adapter.meta,
            source=adapter.source,
        )

    def add_adapter(self, adapter: Adapter) -> None:
        """Attach one adapter (atomic: nothing changes if it does not fit the model)."""
        self.add_adapters([adapter])

    def add_adapters(self, adapters: Sequence[Adapter]) -> None:
        """Attach several adapters atomically: all are validated and converted before any module is touched."""
        prepared = [self._to_targets(adapter) for adapter in self.validate(adapters)]
        if not prepared:
            return
        bounds = {adapter.name: {key: delta_bound(kind) for key, kind in adapter.all_layers()} for adapter in prepared}
        self._suspend()
        for adapter in prepared:
            for key, kind in adapter.all_layers():
                self._layer(key).add(adapter.name, kind)
            self.adapters[adapter.name] = adapter
            logger.debug(
                "attached adapter %r on %d layers", adapter.name, len(adapter.layers) + len(adapter.text_encoder_layers)
            )
        self._bounds.update(bounds)
        self._reindex()
        self._resume()

    def remove_adapter(self, name: str) -> None:
        """Detach one adapter; layers left without adapters get their base module back."""
        if name not in self.adapters:
            raise CompositionError(f"no adapter named {name!r} is attached", hint=f"attached: {self.adapter_names}")
        if self.strategy is not None and name in self.strategy.weights:
            raise CompositionError(
                f"adapter {name!r} is part of the active composition",
                hint="set a composition without it (or clear the composition) before removing it",
            )
        self._suspend()
        adapter = self.adapters.pop(name)
        self._bounds.pop(name, None)
        for key, _ in adapter.all_layers():
            layer = self._layers[key]
            layer.remove(name)
            if not layer.slots:
                self._unwrap(key)
        self._reindex()
        self._resume()

    def _layer(self, key: str) -> ComposedLayer:
        """The composed layer for ``key``, replacing the base module in its parent on first use."""
        layer = self._layers.get(key)
        if layer is None:
            target = self._targets[key]
            layer = compose(target.base, key, target.group, self.state)
            setattr(target.parent, target.attr, layer)
            self._layers[key] = layer
        return layer

    def _unwrap(self, key: str) -> None:
        layer = self._layers.pop(key)
        layer.unfuse()
        layer.release()
        target = self._targets[key]
        setattr(target.parent, target.attr, target.base)

    def _reindex(self) -> None:
        """Adapter indices changed: remap every layer's columns and reset the weights to zero."""
        index = {name: i for i, name in enumerate(self.adapters)}
        for layer in self._layers.values():
            layer.reindex(index)
        self.zero_weights()

    def _suspend(self) -> None:
        """Before changing adapters or strategies: let the strategy undo its work. Fused weights stay fused while a
        strategy is active (the next one either re-fuses from the saved base values — an exact in-place switch — or
        installs unfused weights, which unfuses); with none active they are restored now."""
        if self.strategy is not None:
            self.strategy.deactivate(self)
        else:
            self.unfuse()

    def _resume(self) -> None:
        if self.strategy is not None:
            self.strategy.activate(self)

    # ----- weights ---------------------------------------------------------------------------------------------

    def _per_group(self, weights: torch.Tensor | Sequence[float]) -> torch.Tensor:
        """(A,) or (A, G) weights → (G, A) float32 on the model's device."""
        w = torch.as_tensor(weights, dtype=torch.float32, device=self.state.device)
        num = len(self.adapters)
        if w.dim() == 1 and w.shape[0] == num:
            return w[None].expand(len(self.group_names), num)
        if w.dim() == 2 and tuple(w.shape) == (num, len(self.group_names)):
            return w.T
        raise CompositionError(
            f"adapter weights must be shaped ({num},) or ({num}, {len(self.group_names)}), got {tuple(w.shape)}"
        )

    def set_weights(self, weights: torch.Tensor | Sequence[float]) -> None:
        """Unfused adapter weights, (A,) or (A, G); per-sample weights are switched off (fused weights are restored
        first)."""
        if self._fused:
            self.unfuse()
        self.state.set(self._per_group(weights), None)

    def zero_weights(self) -> None:
        """Every unfused adapter weight to zero, per-sample weights off; fused weights are left as they are."""
        self.state.set(self._per_group(torch.zeros(len(self.adapters))), None)

    def set_sample_weights(self, weights: torch.Tensor | None) -> None:
        """Per-sample adapter weights (N, A) or (N, A, G) for the next batched call, or None to switch them off."""
        if weights is None:
            self.state.set(self.state.installed[0], None)
            return
        if self._fused:
            self.unfuse()
        w = torch.as_tensor(weights, dtype=torch.float32, device=self.state.device)
        if w.dim() == 2:
            w = w[:, :, None].expand(-1, -1, len(self.group_names))
        if w.dim() != 3 or tuple(w.shape[1:]) != (len(self.adapters), len(self.group_names)):
            raise CompositionError(
                f"per-sample weights must be shaped (N, {len(self.adapters)}) or "
                f"(N, {len(self.adapters)}, {len(self.group_names)}), got {tuple(w.shape)}"
            )
        self.state.set(self.state.installed[0], w.transpose(1, 2))

    @property
    def fused(self) -> bool:
        """True while adapter deltas are written into the base weights."""
        return self._fused

    def fuse(self, weights: torch.Tensor | Sequence[float]) -> None:
        """Write pristine W + Σ wᵢΔWᵢ into every composed layer's weight; (A,) or (A, G) weights. Re-fusing with
        other weights is an exact switch (always computed from the pristine copy)."""
        rows = self._per_group(weights).unbind(0)  # one call for every group's row, not one per layer
        with torch.no_grad():  # once here, not once per layer
            for layer in self._layers.values():
                layer.fuse(rows[layer.group])
        self._fused = True

    def unfuse(self) -> None:
        """Restore every fused weight from its pristine copy (bit-exact)."""
        if self._fused:
            for layer in self._layers.values():
                layer.unfuse()
            self._fused = False

    def weight_table(self, weights: Mapping[str, WeightSpec], num_steps: int) -> torch.Tensor:
        """weight[adapter, group, step] (A, G, S) on the model's device for a composition's weight specs (see
        :mod:`fusion.schedules`); attached adapters the composition omits get weight 0."""
        unknown = [name for name in weights if name not in self.adapters]
        if unknown:
            raise CompositionError(f"composition names adapters that are not attached: {unknown}")
        table = build_weight_table(weights, self.layout, num_steps=num_steps)
        full = torch.zeros(len(self.adapters), len(self.group_names), num_steps)
        for row, name in enumerate(table.adapters):
            full[self.adapter_names.index(name)] = table.weights[row]
        return full.to(self.state.device)

    # ----- strategies and the hooked forward -------------------------------------------------------------------

    def set_strategy(self, strategy: Strategy | None) -> None:
        """Make ``strategy`` the active one (the previous one is deactivated; None restores the base weights).
        Replacing one fused composition by another switches the fused weights in place."""
        if strategy is not None:
            missing = [name for name in strategy.weights if name not in self.adapters]
            if missing:
                raise CompositionError(
                    f"composition names adapters that are not attached: {missing}",
                    hint=f"attached: {self.adapter_names}",
                )
            if self.clock is None and strategy.needs_steps:
                raise StepUnknownError(
                    f"{strategy.name} with these weights changes over steps, but this engine has no scheduler to "
                    "read the step index from",
                    hint="create the engine with scheduler=pipe.scheduler (make_composable does), or use weights "
                    "that do not change over steps",
                )
            self._check_magnitude(strategy.weights)
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

    def _check_magnitude(self, weights: Mapping[str, WeightSpec]) -> None:
        """Refuse (before any weight is touched) a composition whose summed update could overflow a layer's dtype
        (:func:`fusion.magnitude.check_composed_magnitude`), taking each adapter's largest |weight| per group."""
        table = self.weight_table(weights, num_steps=MAGNITUDE_CHECK_STEPS).abs().amax(dim=2).cpu()
        largest: dict[str, dict[str, float]] = {}
        for row, name in enumerate(self.adapter_names):
            per_layer = self._bounds.get(name, {})
            largest[name] = {key: float(table[row, self._targets[key].group]) for key in per_layer}
        dtypes = {key: target.base.weight.dtype for key, target in self._targets.items()}
        check_composed_magnitude(self._bounds, largest, dtypes)

    def _check_finite(self, output: Any, step: int) -> Any:
        """Raise :class:`CompositionError` naming the active adapters (likeliest culprit first) when a composed
        denoiser call returned NaN or Inf: the image would come out black or NaN."""
        tensor = output_tensor(output)
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            active = [name for name in self.adapter_names if name in (self.strategy.weights if self.strategy else {})]
            active.sort(key=lambda name: -max(self._bounds.get(name, {}).values(), default=0.0))
            raise CompositionError(
                f"the denoiser's output at step {step} holds NaN or Inf with adapter(s) {active} composed; no image "
                "is made",
                hint=f"lower the weight of {active[0]!r} or leave it out" if active else None,
            )
        return output

    def reset_generation(self, *, cfg_halves: bool = False) -> None:
        """The next denoiser call starts a generation (the mixin calls this per pipeline call); puts the engine's
        hook back in the denoiser's call path if a re-installed wrapper dropped it (model cpu offload does).
        ``cfg_halves`` says this generation's denoiser batches are ``[unconditional; conditional]`` CFG halves."""
        self._fresh = True
        self._cfg_halves = cfg_halves
        reroute(self.denoiser, self._hook)

    def set_branches(self, branches: Branches) -> None:
        """Which CFG branches the adapters act on: ``"both"``, ``"conditional"`` or a per-adapter mapping of the two
        or of unconditional shares (see :mod:`fusion.cfg_branches`). In generations started with
        ``cfg_halves=True`` the unconditional half then runs under :meth:`unconditional`. Set the strategy first: a
        mapping is resolved against its adapters."""
        weights = self.strategy.weights if self.strategy is not None else {}
        mode, kept = resolve_branches(branches, weights)
        self.branches = mode
        self._unconditional_shares = kept

    @contextmanager
    def muted(self) -> Iterator[None]:
        """Every composed layer computes its base output alone inside this block (refused while fused: the fused
        base weights carry the adapters)."""
        self._refuse_fused()
        self.state.muted = True
        try:
            yield
        finally:
            self.state.muted = False

    @contextmanager
    def unconditional(self) -> Iterator[None]:
        """What the unconditional half of a conditional-branch composition runs under: every adapter muted, or with
        per-adapter shares every adapter's weights, as the strategy installs them, times its share (0 for the
        adapters on the conditional branch only); the strategy's own weights are in place again after the block."""
        if not self._unconditional_shares:
            with self.muted():
                yield
            return
        self._refuse_fused()
        shares = self._unconditional_shares
        scale = torch.tensor([shares.get(name, 0.0) for name in self.adapter_names], device=self.state.device)
        self.state.set_scale(scale)
        try:
            yield
        finally:
            self.state.set_scale(None)

    def _refuse_fused(self) -> None:
        if self._fused:
            raise CompositionError(
                "adapters cannot be muted while they are fused into the base weights",
                hint="compose with fuse=False",
            )

    @staticmethod
    def _find_timestep_position(denoiser: nn.Module) -> int | None:
        params = list(inspect.signature(type(denoiser).forward).parameters)[1:]
        return params.index("timestep") if "timestep" in params else None

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
        """One denoiser call (from the hook): find the step, hand the call to the strategy."""
        strategy = self.strategy
        if strategy is None:
            return forward(*args, **kwargs)
        timestep = self._timestep_argument(args, kwargs)
        step, num_steps, start = self.step_of(timestep, strategy)
        if start:
            strategy.start_generation(self, num_steps)
        latent = args[0] if args else next((kwargs[k] for k in _LATENT_ARGUMENTS if k in kwargs), None)
        batch = int(latent.shape[0]) if isinstance(latent, torch.Tensor) else 1
        if self.branches == "conditional" and self._cfg_halves:
            return self._check_finite(
                self._route_conditional(forward, args, kwargs, batch, step, num_steps, timestep), step
            )
        ctx = StepContext(
            engine=self,
            step=step,
            num_steps=num_steps,
            timestep=timestep,
            batch_size=batch,
            args=args,
            kwargs=kwargs,
            forward=forward,
        )
        return self._check_finite(strategy.step(ctx), step)

    def _route_conditional(
        self,
        forward: Callable[..., Any],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        batch: int,
        step: int,
        num_steps: int,
        timestep: Any,
    ) -> Any:
        """One CFG call with the adapters on its conditional half only, or on the unconditional half at a share:
        each half through the strategy (the unconditional one under :meth:`unconditional`; the base model alone
        where no adapter has a share there), the two predictions stacked back in the batch's order. The strategy
        sees two calls at one step, as under true-CFG pipelines, so per-call state (CMLoRA's caches) stays apart."""
        assert self.strategy is not None
        halves = cfg_halves(args, kwargs, batch, NON_BATCH_ARGUMENTS)
        contexts = [
            StepContext(
                engine=self,
                step=step,
                num_steps=num_steps,
                timestep=batch_slice(timestep, start, start + batch // 2, batch),
                batch_size=batch // 2,
                args=half_args,
                kwargs=half_kwargs,
                forward=forward,
            )
            for start, (half_args, half_kwargs) in zip((0, batch // 2), halves)
        ]
        with self.unconditional():
            if self._unconditional_shares:
                unconditional = output_tensor(self.strategy.step(contexts[0]))
            else:
                unconditional = output_tensor(forward(*contexts[0].args, **contexts[0].kwargs))
        conditional = output_tensor(self.strategy.step(contexts[1]))
        return contexts[1].wrap(torch.cat([unconditional, conditional]))

    # ----- teardown --------------------------------------------------------------------------------------------

    def clear(self) -> None:
        """Deactivate the strategy, restore every weight from its pristine copy, put every base module back and
        detach the hook: the model is bit-identical to before the engine attached, with every other hook in place."""
        if self.strategy is not None:
            self.strategy.deactivate(self)
            self.strategy = None
        self.unfuse()
        for key in list(self._layers):
            self._unwrap(key)
        self.adapters.clear()
        self.set_branches("both")
        detach(self.denoiser, self._hook)
