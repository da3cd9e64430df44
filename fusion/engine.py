"""FusionEngine: attaches adapters to a denoiser (and its text encoders) and lets a strategy drive every step.

Attaching walks the model once: every ``nn.Linear`` / ``nn.Conv2d`` of the denoiser (keyed by its module path) and of
the text encoders (keyed ``text_encoder.<path>`` / ``text_encoder_2.<path>``) is indexed with its weight shape and its
layer group (:class:`fusion.layer_groups.BlockLayout`). Adding adapters is atomic: every key and shape of every adapter
is validated (and a SHiRA adapter's base fingerprint checked against the pristine weights), weight-relative updates
(IA3, OFT, DoRA, GLoRA) resolved to ΔW = f(W₀) − W₀ against the pristine weights, and every tensor converted to its
target's device and dtype before the first module is touched; a module is replaced by a
:class:`fusion.layers.ComposedLayer` only when some adapter targets it.

The denoiser's ``forward`` is wrapped on the instance (no subclassing): each call is looked up in a step table built
from the scheduler's timesteps at the first call of a generation (O(1) per call: the previous or next entry), then
handed to the active :class:`fusion.strategies.base.Strategy` as a :class:`fusion.strategies.base.StepContext`.

:meth:`FusionEngine.clear` restores every touched weight from its pristine copy, puts every base module back in its
parent and unwraps the forward, leaving the model bit-identical to before the engine existed.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from fusion.adapters import Adapter, AdapterKind, Dense, LowRank, validate_shapes
from fusion.errors import CompositionError, ShapeMismatchError
from fusion.layer_groups import BlockLayout
from fusion.layers import ComposedLayer, GateState, compose, is_composable
from fusion.relative import Relative
from fusion.schedules import build_weight_table
from fusion.sparse import check_base_fingerprint
from fusion.strategies.base import StepContext, Strategy, WeightSpec

TimestepSource = Callable[[], torch.Tensor | Sequence[float] | None]
"""Returns the current generation's timesteps (``lambda: pipe.scheduler.timesteps``)."""

_LATENT_ARGUMENTS = ("sample", "hidden_states")
_STEP_TOLERANCE = 1e-2
"""Relative distance under which a denoiser's timestep argument matches a scheduler timestep (bf16 rounds ~4e-3)."""


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


def _normalise(kind: AdapterKind, module: nn.Module) -> AdapterKind:
    """Reshape 2-D LoRA factors aimed at a 1×1 conv into conv factors (files store both ways)."""
    is_pointwise = isinstance(module, nn.Conv2d) and tuple(module.weight.shape[2:]) == (1, 1)
    if isinstance(kind, LowRank) and not kind.is_conv and is_pointwise:
        return LowRank(kind.down[:, :, None, None], kind.up[:, :, None, None], kind.alpha)
    return kind


class FusionEngine:
    """Adapters on a denoiser (UNet2DConditionModel or FluxTransformer2DModel) and its text encoders.

    ``text_encoders`` maps ``"text_encoder"`` / ``"text_encoder_2"`` to modules (None entries are skipped);
    ``timesteps`` returns the scheduler's timesteps for the step lookup (without it every call is step 0 of 1).
    """

    def __init__(
        self,
        denoiser: nn.Module,
        *,
        text_encoders: Mapping[str, nn.Module | None] | None = None,
        timesteps: TimestepSource | None = None,
        family: str = "unknown",
    ) -> None:
        self.denoiser = denoiser
        self.family = family
        self.timesteps = timesteps
        self.layout = BlockLayout.from_denoiser(family, denoiser)
        self.group_names: list[str] = list(self.layout.groups)
        param = next(denoiser.parameters())
        self.state = GateState(len(self.group_names), param.device)
        self._targets: dict[str, _Target] = {}
        roots = [("", denoiser)] + [(f"{k}.", m) for k, m in (text_encoders or {}).items() if m is not None]
        for prefix, root in roots:
            for key, (parent, attr, module) in _index_modules(root, prefix).items():
                self._targets[key] = _Target(parent, attr, module, self.layout.group_index(key))
        self.expected_shapes = {key: tuple(t.base.weight.shape) for key, t in self._targets.items()}
        self.adapters: dict[str, Adapter] = {}
        self._layers: dict[str, ComposedLayer] = {}
        self._fused = False
        self.strategy: Strategy | None = None
        self._step_values: list[float] | None = None
        self._last_step = -1
        self._timestep_position = self._find_timestep_position(denoiser)
        self._had_instance_forward = "forward" in denoiser.__dict__
        self._inner_forward = denoiser.forward
        denoiser.forward = self._forward

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
        """A copy of ``adapter`` whose every update sits on its target weight's device and dtype."""

        def move(key: str, kind: AdapterKind) -> AdapterKind:
            weight = self._targets[key].base.weight
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
        self._suspend()
        for adapter in prepared:
            for key, kind in adapter.all_layers():
                self._layer(key).add(adapter.name, kind)
            self.adapters[adapter.name] = adapter
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
        self.set_weights(torch.zeros(len(index)))

    def _suspend(self) -> None:
        """Before changing adapters: let the strategy undo its work and restore pristine weights."""
        if self.strategy is not None:
            self.strategy.deactivate(self)
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
        """Unfused adapter weights, (A,) or (A, G); per-sample weights are switched off."""
        self.state.set(self._per_group(weights), None)

    def set_sample_weights(self, weights: torch.Tensor | None) -> None:
        """Per-sample adapter weights (N, A) or (N, A, G) for the next batched call, or None to switch them off."""
        if weights is None:
            self.state.set(self.state.weights, None)
            return
        w = torch.as_tensor(weights, dtype=torch.float32, device=self.state.device)
        if w.dim() == 2:
            w = w[:, :, None].expand(-1, -1, len(self.group_names))
        if w.dim() != 3 or tuple(w.shape[1:]) != (len(self.adapters), len(self.group_names)):
            raise CompositionError(
                f"per-sample weights must be shaped (N, {len(self.adapters)}) or "
                f"(N, {len(self.adapters)}, {len(self.group_names)}), got {tuple(w.shape)}"
            )
        self.state.set(self.state.weights, w.transpose(1, 2))

    @property
    def fused(self) -> bool:
        """True while adapter deltas are written into the base weights."""
        return self._fused

    def fuse(self, weights: torch.Tensor | Sequence[float]) -> None:
        """Write pristine W + Σ wᵢΔWᵢ into every composed layer's weight; (A,) or (A, G) weights. Re-fusing with
        other weights is an exact switch (always computed from the pristine copy)."""
        per_group = self._per_group(weights)
        for layer in self._layers.values():
            layer.fuse(per_group[layer.group])
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

    # ----- strategies and the wrapped forward ------------------------------------------------------------------

    def set_strategy(self, strategy: Strategy | None) -> None:
        """Make ``strategy`` the active one (the previous one is deactivated and weights restored)."""
        if strategy is not None:
            missing = [name for name in strategy.weights if name not in self.adapters]
            if missing:
                raise CompositionError(
                    f"composition names adapters that are not attached: {missing}",
                    hint=f"attached: {self.adapter_names}",
                )
        self._suspend()
        self.set_weights(torch.zeros(len(self.adapters)))
        self.strategy = strategy
        self.reset_generation()
        self._resume()

    def reset_generation(self) -> None:
        """Forget the step table: the next denoiser call starts a generation (the mixin calls this per pipeline
        call)."""
        self._step_values = None
        self._last_step = -1

    @staticmethod
    def _find_timestep_position(denoiser: nn.Module) -> int | None:
        params = list(inspect.signature(denoiser.forward).parameters)
        return params.index("timestep") if "timestep" in params else None

    def _timestep_argument(self, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> Any:
        if "timestep" in kwargs:
            return kwargs["timestep"]
        position = self._timestep_position
        return args[position] if position is not None and len(args) > position else None

    @staticmethod
    def _as_float(value: Any) -> float | None:
        if isinstance(value, torch.Tensor):
            return float(value.reshape(-1)[0]) if value.numel() else None
        return None if value is None else float(value)

    def _build_step_table(self, value: float) -> bool:
        """Read the scheduler's timesteps; scale them to the denoiser's convention (Flux passes t/1000)."""
        source = self.timesteps() if self.timesteps is not None else None
        if source is None or len(source) == 0:
            self._step_values = None
            return False
        steps = [float(t) for t in (source.tolist() if isinstance(source, torch.Tensor) else source)]
        best = min((abs(s * scale - value), scale) for scale in (1.0, 1e-3) for s in steps)
        self._step_values = [s * best[1] for s in steps]
        return True

    def _nearest(self, value: float) -> tuple[int, float]:
        assert self._step_values is not None
        values = self._step_values
        candidates = [i for i in (self._last_step, self._last_step + 1) if 0 <= i < len(values)]
        if candidates:
            best = min(candidates, key=lambda i: abs(values[i] - value))
            if abs(values[best] - value) <= _STEP_TOLERANCE * max(abs(value), 1e-3):
                return best, 0.0
        best = min(range(len(values)), key=lambda i: abs(values[i] - value))
        return best, abs(values[best] - value) / max(abs(value), 1e-3)

    def step_of(self, value: float | None) -> tuple[int, int, bool]:
        """(step index, number of steps, whether a generation starts here) for a denoiser timestep argument."""
        fresh = self._step_values is None
        if value is None or (fresh and not self._build_step_table(value)):
            start = self._last_step < 0
            self._last_step = 0
            return 0, 1, start
        step, error = self._nearest(value)
        if error > _STEP_TOLERANCE and not fresh:
            self._build_step_table(value)
            step, _ = self._nearest(value)
            fresh = True
        assert self._step_values is not None
        start = fresh or step < self._last_step
        self._last_step = step
        return step, len(self._step_values), start

    def _forward(self, *args: Any, **kwargs: Any) -> Any:
        """The wrapped denoiser forward: find the step, hand the call to the strategy."""
        strategy = self.strategy
        if strategy is None:
            return self._inner_forward(*args, **kwargs)
        timestep = self._timestep_argument(args, kwargs)
        step, num_steps, start = self.step_of(self._as_float(timestep))
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
            forward=self._inner_forward,
        )
        return strategy.step(ctx)

    # ----- teardown --------------------------------------------------------------------------------------------

    def clear(self) -> None:
        """Deactivate the strategy, restore every weight from its pristine copy, put every base module back and
        unwrap the forward: the model is bit-identical to before the engine attached."""
        if self.strategy is not None:
            self.strategy.deactivate(self)
            self.strategy = None
        self.unfuse()
        for key in list(self._layers):
            self._unwrap(key)
        self.adapters.clear()
        if self._had_instance_forward:
            self.denoiser.forward = self._inner_forward
        elif "forward" in self.denoiser.__dict__:
            del self.denoiser.forward
