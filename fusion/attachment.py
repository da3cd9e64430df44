"""Adapters attached to a model's layers, and the weights they run at.

:class:`AttachedAdapters` holds a model's :class:`fusion.layer_index.LayerIndex`. Adding adapters is atomic: every
adapter is validated and converted to its targets' devices and dtypes (:meth:`fusion.layer_index.LayerIndex.validate`)
before the first module is touched; a module is replaced by a :class:`fusion.layers.ComposedLayer` only when some
adapter targets it, and gets its base module back when the last adapter on it is removed.

Weights are installed unfused (one shared gate state every composed layer reads: :class:`fusion.gate_state.GateState`),
per sample, or fused into the base weights (from pristine copies, so fusing other weights is an exact switch and
unfusing is bit-exact). While a strategy is active, changing the adapters deactivates it first and activates it
again after.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager

import torch
from torch import nn

from fusion.adapters import Adapter
from fusion.errors import CompositionError
from fusion.gate_state import GateState
from fusion.layer_index import LayerIndex
from fusion.layers import ComposedLayer, compose
from fusion.magnitude import check_composed_magnitude, delta_bound
from fusion.schedules import build_weight_table
from fusion.strategies.base import Strategy, WeightSpec

logger = logging.getLogger(__name__)

MAGNITUDE_CHECK_STEPS = 16
"""Steps a composition's schedules are sampled at when its largest weights are bounded."""


class AttachedAdapters:
    """Adapters on the layers ``index`` found in ``denoiser`` and its text encoders, with the weights they run at;
    :class:`fusion.engine.FusionEngine` adds the strategy that sets them per call."""

    def __init__(self, denoiser: nn.Module, index: LayerIndex) -> None:
        self.denoiser = denoiser
        self.index = index
        self.layout = self.index.layout
        self.group_names: list[str] = list(self.layout.groups)
        self.state = GateState(len(self.group_names), next(denoiser.parameters()).device)
        self.adapters: dict[str, Adapter] = {}
        self.strategy: Strategy | None = None
        self._bounds: dict[str, dict[str, float]] = {}
        self._layers: dict[str, ComposedLayer] = {}
        self._fused = False

    # ----- adapters --------------------------------------------------------------------------------------------

    @property
    def expected_shapes(self) -> dict[str, tuple[int, ...]]:
        """Weight shape of every composable layer, by key."""
        return self.index.shapes

    @property
    def adapter_names(self) -> list[str]:
        """Attached adapters in index order (the A axis of every weight tensor)."""
        return list(self.adapters)

    @property
    def layers(self) -> Mapping[str, ComposedLayer]:
        """The composed layers, by key."""
        return self._layers

    def validate(self, adapters: Iterable[Adapter]) -> list[Adapter]:
        """``adapters`` checked against the model and the attached adapters' names, normalised and with
        weight-relative updates resolved against the pristine weights (:meth:`LayerIndex.validate`)."""
        return self.index.validate(adapters, taken=self.adapters, pristine=self._pristine)

    def _pristine(self, key: str) -> torch.Tensor:
        """The base weight of ``key`` as it was before any fusing."""
        layer = self._layers.get(key)
        return layer.pristine_weight() if layer is not None else self.index.base_weight(key)

    def add_adapter(self, adapter: Adapter) -> None:
        """Attach one adapter (atomic: nothing changes if it does not fit the model)."""
        self.add_adapters([adapter])

    def add_adapters(self, adapters: Sequence[Adapter]) -> None:
        """Attach several adapters atomically: all are validated and converted before any module is touched."""
        prepared = [self.index.on_targets(adapter) for adapter in self.validate(adapters)]
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
            target = self.index.targets[key]
            layer = compose(target.base, key, target.group, self.state)
            setattr(target.parent, target.attr, layer)
            self._layers[key] = layer
        return layer

    def _unwrap(self, key: str) -> None:
        layer = self._layers.pop(key)
        layer.unfuse()
        layer.release()
        target = self.index.targets[key]
        setattr(target.parent, target.attr, target.base)

    def _detach_all(self) -> None:
        """Restore every weight from its pristine copy and put every base module back (the strategy is gone)."""
        self.unfuse()
        for key in list(self._layers):
            self._unwrap(key)
        self.adapters.clear()

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
        self.check_attached(weights)
        table = build_weight_table(weights, self.layout, num_steps=num_steps)
        full = torch.zeros(len(self.adapters), len(self.group_names), num_steps)
        for row, name in enumerate(table.adapters):
            full[self.adapter_names.index(name)] = table.weights[row]
        return full.to(self.state.device)

    def check_attached(self, names: Iterable[str]) -> None:
        """Raise :class:`CompositionError` naming every adapter of ``names`` that is not attached."""
        missing = [name for name in names if name not in self.adapters]
        if missing:
            raise CompositionError(
                f"composition names adapters that are not attached: {missing}", hint=f"attached: {self.adapter_names}"
            )

    def check_magnitude(self, weights: Mapping[str, WeightSpec]) -> None:
        """Refuse (before any weight is touched) a composition whose summed update could overflow a layer's dtype
        (:func:`fusion.magnitude.check_composed_magnitude`), taking each adapter's largest |weight| per group."""
        table = self.weight_table(weights, num_steps=MAGNITUDE_CHECK_STEPS).abs().amax(dim=2).cpu()
        targets = self.index.targets
        largest: dict[str, dict[str, float]] = {}
        for row, name in enumerate(self.adapter_names):
            per_layer = self._bounds.get(name, {})
            largest[name] = {key: float(table[row, targets[key].group]) for key in per_layer}
        dtypes = {key: target.base.weight.dtype for key, target in targets.items()}
        check_composed_magnitude(self._bounds, largest, dtypes)

    def largest_updates_first(self, names: Iterable[str]) -> list[str]:
        """``names`` ordered by the largest update any of their layers can make, largest first."""
        return sorted(names, key=lambda name: -max(self._bounds.get(name, {}).values(), default=0.0))

    # ----- muting ----------------------------------------------------------------------------------------------

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
    def scaled(self, scale: Sequence[float]) -> Iterator[None]:
        """Every adapter's installed weights times its entry of ``scale`` (A,) inside this block (refused while
        fused); the installed weights are in place again after it."""
        self._refuse_fused()
        self.state.set_scale(torch.tensor(scale, device=self.state.device))
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
