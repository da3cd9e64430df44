"""Composed layers: one base Linear/Conv2d plus every attached adapter's update, computed in one pair of matmuls.

(Affine LayerNorm/GroupNorm layers are composed too, for dense updates of their weight and bias only.)

A composed layer replaces the base module in its parent but keeps the base module object as ``.base`` (and forwards
attribute lookups to it, so ``layer.weight`` / ``layer.in_features`` still work for diffusers code; ``state_dict``
keys stay the base's, so saving a composed model writes the usual names — with the fused weights while fused).
All low-rank adapters' factors live concatenated along rank, ``down_cat`` (R×in) and ``up_cat`` (out×R), with a
gate over the R rank columns (adapter weight × alpha/rank), so the unfused forward is

    y = base(x) + ((x @ down_catᵀ) * gate) @ up_catᵀ

whatever the number of adapters. A per-sample gate matrix (N×R) lets each sample of a batch see its own adapters
(LoRA Composite in one batched pass).

The gates live in one buffer per (device, dtype) shared by every composed layer of an engine
(:class:`fusion.gate_state.GateState`): a weight change costs O(1) Python, nothing per layer.

Where the factors are at least as large as the weight itself (R·(in+out) ≥ in·out), one matmul with an effective
weight W + Σ wᵢΔWᵢ is cheaper than three; such a layer caches that weight once the same weights served two
forwards in a row (static weights). Otherwise a linear layer whose call has more rows than in·out/(in+out) builds a
transient effective weight for that call alone — building it (out·in·R) costs less than the factor path
(rows·R·(in+out)) — and drops it after, so weights that change every step stay cheap without keeping a weight copy.
Layers with Sparse/Dense updates always run on an effective weight (rebuilt lazily when the weights change).

Per-adapter outputs: with a ``mixer`` set (gated fusion, :mod:`fusion.gates`), the layer computes the base output b
and every low-rank adapter's own output lₖ = wₖ·ΔWₖ·x as one (K, …, out) stack — one down matmul over
rank-padded factors and one batched up matmul — and returns ``mixer(layer, b, l)``.

Fused mode writes Σ wᵢΔWᵢ into the base weight and restores it bit-exactly (:mod:`fusion.fused_weights`).
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Callable
from functools import lru_cache
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from fusion.adapters import AdapterKind, Dense, LowRank, Sparse
from fusion.errors import CompositionError
from fusion.fused_weights import FusedWeights, Slot
from fusion.gate_state import Columns, GateState
from fusion.sparse_switching import FusedSparse, FusedSparseCache

Mixer = Callable[["ComposedLayer", torch.Tensor, torch.Tensor], torch.Tensor]
"""``mixer(layer, b, l) -> y``: combines the base output ``b`` (…, out) with per-adapter outputs ``l`` (K, …, out)."""


@lru_cache(maxsize=4096)
def _index_tensor(
    values: tuple[int, ...] | tuple[float, ...], dtype: torch.dtype, device: torch.device
) -> torch.Tensor:
    """A read-only tensor of ``values``, shared by every layer with the same list (most layers of one adapter set
    map to the same few indices): building one per layer on every attach cost more than the rest of re-indexing.
    Made outside inference mode, so a tensor first built under it can still be saved for backward later."""
    with torch.inference_mode(False):
        return torch.tensor(values, dtype=dtype, device=device)


def _hide_base_prefix(module: nn.Module, state_dict: dict[str, Any], prefix: str, _metadata: Any) -> None:
    """state_dict hook: a composed layer saves its base's tensors under the base's own names (``to_q.weight``)."""
    inner = f"{prefix}base."
    for key in [k for k in state_dict if k.startswith(inner)]:
        state_dict[prefix + key[len(inner) :]] = state_dict.pop(key)


def _restore_base_prefix(module: nn.Module, state_dict: dict[str, Any], prefix: str, *_: Any) -> None:
    """load_state_dict pre-hook: route ``to_q.weight`` back to the base module (``to_q.base.weight``)."""
    names = [name for name, _ in module.base.named_parameters()] + [name for name, _ in module.base.named_buffers()]
    for name in names:
        if prefix + name in state_dict:
            state_dict[f"{prefix}base.{name}"] = state_dict.pop(prefix + name)


class ComposedLayer(FusedWeights, nn.Module):
    """Shared machinery of :class:`ComposedLinear` and :class:`ComposedConv2d` (see the module docstring)."""

    def __init__(self, base: nn.Module, key: str, group: int, state: GateState) -> None:
        super().__init__()
        self.base = base
        self.key = key
        self.group = group
        self.state = state
        self.slots: list[Slot] = []
        self.down_cat: torch.Tensor | None = None
        self.up_cat: torch.Tensor | None = None
        self.pristine: torch.Tensor | None = None
        self.pristine_bias: torch.Tensor | None = None
        self.mixer: Mixer | None = None
        self._saved: FusedSparse | None = None
        self.sparse_cache = FusedSparseCache()
        """Fused sparse states this layer can switch back to without recomputing them (replace it with
        ``FusedSparseCache(capacity=0)`` to measure uncached switching)."""
        self._columns: Columns | None = None
        self._slot_index: list[int] = []
        self._output_owners = torch.zeros(0, dtype=torch.long, device=base.weight.device)
        self._col_scale = torch.zeros(0, device=base.weight.device)
        self._owner = torch.zeros(0, dtype=torch.long, device=base.weight.device)
        self._extra_owner = torch.zeros(0, dtype=torch.long, device=base.weight.device)
        self._needs_effective = False
        self._prefers_effective = False
        self._transient_rows = float("inf")
        self._effective: torch.Tensor | None = None
        self._effective_bias: torch.Tensor | None = None
        self._effective_version = -1
        self._seen_version = -1
        self._gate_view: torch.Tensor | None = None
        self._gate_generation = -1
        self._padded: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None = None
        self.register_state_dict_post_hook(_hide_base_prefix)
        self.register_load_state_dict_pre_hook(_restore_base_prefix)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            modules = self.__dict__.get("_modules", {})
            if "base" not in modules:
                raise
            return getattr(modules["base"], name)

    # ----- attaching -------------------------------------------------------------------------------------------

    @property
    def names(self) -> list[str]:
        """Names of the adapters attached to this layer, in attach order."""
        return [slot.name for slot in self.slots]

    @property
    def output_owners(self) -> torch.Tensor:
        """Engine adapter index of each row of the per-adapter output stack (low-rank slots, attach order)."""
        return self._output_owners

    def add(self, name: str, kind: AdapterKind) -> None:
        """Attach one adapter's update (already on the base weight's device and dtype)."""
        slot = Slot(name, kind)
        if isinstance(kind, LowRank):
            slot.start = self.rank
            slot.stop = slot.start + kind.rank
            self.down_cat = kind.down if self.down_cat is None else torch.cat([self.down_cat, kind.down], 0)
            self.up_cat = kind.up if self.up_cat is None else torch.cat([self.up_cat, kind.up], 1)
        self.slots.append(slot)
        self._padded = None

    def remove(self, name: str) -> None:
        """Detach the named adapter's update; its rank columns are cut out of the concatenation."""
        slot = next(s for s in self.slots if s.name == name)
        self.slots.remove(slot)
        self._padded = None
        if isinstance(slot.kind, Sparse):
            self.sparse_cache.discard(slot.kind)
        if isinstance(slot.kind, LowRank):
            width = slot.stop - slot.start
            keep = [s for s in self.slots if isinstance(s.kind, LowRank)]
            if not keep:
                self.down_cat = self.up_cat = None
            else:
                assert self.down_cat is not None
                assert self.up_cat is not None
                self.down_cat = torch.cat([self.down_cat[: slot.start], self.down_cat[slot.stop :]], 0)
                self.up_cat = torch.cat([self.up_cat[:, : slot.start], self.up_cat[:, slot.stop :]], 1)
                for other in keep:
                    if other.start > slot.start:
                        other.start -= width
                        other.stop -= width

    def reindex(self, index: dict[str, int]) -> None:
        """Map each rank column (and each sparse/dense update) to its adapter's index in the engine's weights and
        register the columns with the shared gate state."""
        weight = self.base.weight
        device = weight.device
        owner: list[int] = []
        scale: list[float] = []
        extra: list[int] = []
        for slot in self.slots:
            if isinstance(slot.kind, LowRank):
                owner += [index[slot.name]] * slot.kind.rank
                scale += [slot.kind.scale] * slot.kind.rank
            else:
                extra.append(index[slot.name])
        low_rank = tuple(index[slot.name] for slot in self.slots if isinstance(slot.kind, LowRank))
        owners = _index_tensor(tuple(owner), torch.long, device)
        scales = _index_tensor(tuple(scale), torch.float32, device)
        vars(self).update(  # plain attributes, set without nn.Module's checks: this runs per layer on every attach
            _slot_index=[index[slot.name] for slot in self.slots],
            _output_owners=_index_tensor(low_rank, torch.long, device),
            _owner=owners,
            _col_scale=scales,
            _extra_owner=_index_tensor(tuple(extra), torch.long, device),
            _needs_effective=bool(extra),
            _prefers_effective=self.rank * (weight[0].numel() + weight.shape[0]) >= weight.numel(),
            _transient_rows=self._transient_threshold(),
            _columns=Columns(self.group, owners, scales, (device, weight.dtype)) if owner else None,
        )
        self.state.register(self, self._columns)
        self._forget()

    def release(self) -> None:
        """Unregister from the shared gate state (the layer is being unwrapped)."""
        self.state.register(self, None)
        self._columns = None

    def _forget(self) -> None:
        """Drop the cached gate view / effective weight so the next forward recomputes them (plain attributes, set
        without nn.Module's registration checks: this runs for every layer on every fuse)."""
        vars(self).update(
            _effective=None, _effective_version=-1, _seen_version=-1, _gate_view=None, _gate_generation=-1
        )

    # ----- gates -----------------------------------------------------------------------------------------------

    def _gate(self) -> torch.Tensor:
        """This layer's (R,) column gates: a view into the shared buffer (re-sliced only when it is reallocated)."""
        state = self.state
        state.ensure()
        if self._gate_generation != state.generation or self._gate_view is None:
            assert self._columns is not None
            columns = self._columns
            self._gate_view = state.bank(columns).gate[columns.start : columns.stop]
            self._gate_generation = state.generation
        return self._gate_view

    def effective_weight(self) -> torch.Tensor | None:
        """The effective weight W + Σ wᵢΔWᵢ this forward should use, or None for the factor path.

        Layers with sparse/dense updates rebuild it whenever the weights changed. Layers whose factors outgrow the
        weight build it only when the current weights already served the previous forward, so per-step
        re-weighting keeps to the factor path and never pays an O(out·in) rebuild.
        """
        version = self.state.version
        if self._effective is not None:
            if self._effective_version == version:
                return self._effective
            self._effective = None
        if self._needs_effective or (self._prefers_effective and self._seen_version == version):
            self._effective = self.merged(self.base.weight, self.state.weights[self.group])
            self._effective_bias = self._merged_bias(self.state.weights[self.group])
            self._effective_version = version
            return self._effective
        self._seen_version = version
        return None

    def _sample_gate(self, batch: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Per-sample (N, R) gate and (N, E) sparse/dense weights, or None when per-sample gating is off."""
        sample = self.state.sample_weights
        if sample is None:
            return None
        if sample.shape[0] != batch:
            raise CompositionError(
                f"per-sample adapter weights are set for a batch of {sample.shape[0]} but layer {self.key!r} "
                f"received a batch of {batch}",
                hint="set sample weights with one row per sample of the tiled batch",
            )
        dtype = self.base.weight.dtype
        if self._columns is None:
            gate = torch.zeros(batch, 0, dtype=dtype, device=self.base.weight.device)
        else:
            bank_gate = self.state.bank(self._columns).sample_gate
            assert bank_gate is not None
            gate = bank_gate[:, self._columns.start : self._columns.stop]
        return gate, sample[:, self.group][:, self._extra_owner].to(dtype)

    # ----- per-adapter outputs ---------------------------------------------------------------------------------

    def _padded_factors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Low-rank factors padded to the largest rank: down (K·r, in), up (K, r, out), the (K·r,) column of the
        concatenation each padded row reads, and a (K·r,) mask of real rows. Built once per attach change."""
        if self._padded is None:
            assert self.down_cat is not None
            assert self.up_cat is not None
            slots = [s for s in self.slots if isinstance(s.kind, LowRank)]
            width = max(s.stop - s.start for s in slots)
            columns = torch.zeros(len(slots), width, dtype=torch.long)
            real = torch.zeros(len(slots), width, dtype=torch.bool)
            for i, slot in enumerate(slots):
                columns[i, : slot.stop - slot.start] = torch.arange(slot.start, slot.stop)
                real[i, : slot.stop - slot.start] = True
            device = self.down_cat.device
            columns, real = columns.reshape(-1).to(device), real.reshape(-1).to(device)
            down = self.down_cat.flatten(1)[columns] * real[:, None]
            up = (self.up_cat.flatten(1)[:, columns] * real).T.reshape(len(slots), width, -1)
            self._padded = (down, up, columns, real)
        return self._padded

    def adapter_outputs(self, x: torch.Tensor) -> torch.Tensor:
        """Every low-rank adapter's own output wₖ·ΔWₖ·x at the current weights, stacked: (K, …, out) for a linear
        layer's (…, in) input (linear layers only). One down matmul and one batched up matmul, whatever K."""
        down, up, columns, real = self._padded_factors()
        gate = self._gate().index_select(0, columns) * real
        h = F.linear(x, down) * gate
        lead = h.shape[:-1]
        k, width, out = up.shape
        h = h.reshape(-1, k, width).transpose(0, 1)
        return torch.bmm(h, up).reshape(k, *lead, out)

    # ----- forward ---------------------------------------------------------------------------------------------

    @abstractmethod
    def _down(self, x: torch.Tensor) -> torch.Tensor:
        """x → (…, R) through the concatenated down factors."""

    @abstractmethod
    def _add_up(self, y: torch.Tensor, h: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        """y + h through the up factors ``up`` (the gate already applied to ``h``)."""

    @abstractmethod
    def _with_weight(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """The base layer's operation with another weight and bias."""

    @abstractmethod
    def _apply_delta(self, x: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        """The base layer's operation with ``delta`` as the weight and no bias."""

    @abstractmethod
    def _broadcast(self, gate: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        """Shape an (N, C) per-sample gate to multiply ``h`` (channels last for linear, dim 1 for conv)."""

    def _transient_threshold(self) -> float:
        """Rows per call above which a transient effective weight beats the factor path (never, for convs)."""
        return float("inf")

    def _traceable(self) -> bool:
        """Under torch.compile, plain low-rank layers take the factor path reading the gate buffer in place: no
        version bookkeeping is traced, so new weights (filled into the same buffer) never recompile."""
        return (
            self.mixer is None and self.state.sample_weights is None and not self._needs_effective and bool(self.rank)
        )

    def _mixed(self, x: torch.Tensor, mixer: Mixer) -> torch.Tensor:
        """Gated forward: the mixer combines the base output with the per-adapter outputs; sparse/dense updates
        (never gated) are added at their weights."""
        y = self.base(x)
        if self.rank:
            y = mixer(self, y, self.adapter_outputs(x))
        if not self._needs_effective:
            return y
        weights = self.state.weights[self.group]
        extra = self._combined_extra(weights, x.dtype)
        if extra is not None:
            y = y + self._apply_delta(x, extra)
        bias = self._combined_bias(weights, x.dtype)
        return y if bias is None else y + self._broadcast(bias[None], y)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Base output plus every attached update at the current weights (the base alone while fused or muted)."""
        if self.fused or not self.slots or self.state.muted:
            return self.base(x)
        if torch.compiler.is_compiling() and self._traceable():
            return self._add_up(self.base(x), self._down(x) * self._broadcast(self._gate()[None], x), self.up_cat)
        per_sample = self._sample_gate(x.shape[0])
        if per_sample is None:
            if self.mixer is not None:
                return self._mixed(x, self.mixer)
            effective = self.effective_weight()
            if effective is not None:
                return self._with_weight(x, effective, self._effective_bias)
            assert self.up_cat is not None
            if x.numel() > self._transient_rows * x.shape[-1]:
                transient = torch.addmm(self.base.weight, self.up_cat * self._gate(), self.down_cat)
                return self._with_weight(x, transient, self.base.bias)
            return self._add_up(self.base(x), self._down(x) * self._broadcast(self._gate()[None], x), self.up_cat)
        gate, extra_weights = per_sample
        y = self.base(x)
        if self.rank:
            assert self.up_cat is not None
            y = self._add_up(y, self._down(x) * self._broadcast(gate, x), self.up_cat)
        for i, kind in enumerate(self._extra_kinds()):
            term = self._apply_delta(x, kind.delta(x.dtype))
            if isinstance(kind, Dense) and kind.bias is not None:
                term = term + self._broadcast(kind.bias_delta(x.dtype)[None], term)
            y = y + term * self._broadcast(extra_weights[:, i : i + 1], term)
        return y


class ComposedLinear(ComposedLayer):
    """A composed ``nn.Linear``: low-rank term as two linears (down R×in, up out×R)."""

    def _transient_threshold(self) -> float:
        weight = self.base.weight
        if weight.device.type == "cpu" and weight.dtype in (torch.float16, torch.bfloat16):
            return float("inf")  # half-precision GEMMs on a CPU are slow: stay on the factor path
        out_features, in_features = weight.shape
        return out_features * in_features / (out_features + in_features)

    def _down(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.down_cat)

    def _add_up(self, y: torch.Tensor, h: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        flat = torch.addmm(y.reshape(-1, y.shape[-1]), h.reshape(-1, h.shape[-1]), up.T)
        return flat.reshape(y.shape)

    def _with_weight(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return F.linear(x, weight, bias)

    def _apply_delta(self, x: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        return F.linear(x, delta)

    def _broadcast(self, gate: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        return gate.reshape(gate.shape[0], *([1] * (h.dim() - 2)), gate.shape[1])


class ComposedConv2d(ComposedLayer):
    """A composed ``nn.Conv2d`` (LoCon): down as a conv with the base's kernel/stride/padding, up as a 1×1 conv."""

    def _down(self, x: torch.Tensor) -> torch.Tensor:
        return self.base._conv_forward(x, self.down_cat, None)

    def _add_up(self, y: torch.Tensor, h: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        return y + F.conv2d(h, up)

    def _with_weight(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return self.base._conv_forward(x, weight, bias)

    def _apply_delta(self, x: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        return self.base._conv_forward(x, delta, None)

    def _broadcast(self, gate: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        return gate.reshape(gate.shape[0], gate.shape[1], *([1] * (h.dim() - 2)))


class ComposedNorm(ComposedLayer):
    """A composed ``nn.LayerNorm`` / ``nn.GroupNorm`` (LyCORIS norm training): dense updates of its affine weight and
    bias, y = normalise(x)·(w + Σ wᵢΔwᵢ) + b + Σ wᵢΔbᵢ. Low-rank updates never target it (their shapes are ≥ 2-D)."""

    def _normalised(self, x: torch.Tensor) -> torch.Tensor:
        base = self.base
        if isinstance(base, nn.GroupNorm):
            return F.group_norm(x, base.num_groups, None, None, base.eps)
        return F.layer_norm(x, base.normalized_shape, None, None, base.eps)

    def _down(self, x: torch.Tensor) -> torch.Tensor:
        raise CompositionError(f"norm layer {self.key!r} takes dense updates only, not LoRA factors")

    def _add_up(self, y: torch.Tensor, h: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        raise CompositionError(f"norm layer {self.key!r} takes dense updates only, not LoRA factors")

    def _with_weight(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        base = self.base
        if isinstance(base, nn.GroupNorm):
            return F.group_norm(x, base.num_groups, weight, bias, base.eps)
        return F.layer_norm(x, base.normalized_shape, weight, bias, base.eps)

    def _apply_delta(self, x: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        normalised = self._normalised(x)
        if isinstance(self.base, nn.GroupNorm):
            return normalised * delta.reshape(1, -1, *([1] * (x.dim() - 2)))
        return normalised * delta

    def _broadcast(self, gate: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        if isinstance(self.base, nn.GroupNorm):
            return gate.reshape(gate.shape[0], gate.shape[1], *([1] * (h.dim() - 2)))
        return gate.reshape(gate.shape[0], *([1] * (h.dim() - 2)), gate.shape[1])


def compose(base: nn.Module, key: str, group: int, state: GateState) -> ComposedLayer:
    """Wrap ``base`` (an ``nn.Linear``, ``nn.Conv2d`` or affine ``nn.LayerNorm`` / ``nn.GroupNorm``) in the
    matching composed layer."""
    if isinstance(base, nn.Linear):
        return ComposedLinear(base, key, group, state)
    if isinstance(base, nn.Conv2d):
        return ComposedConv2d(base, key, group, state)
    if isinstance(base, (nn.LayerNorm, nn.GroupNorm)) and base.weight is not None:
        return ComposedNorm(base, key, group, state)
    raise CompositionError(
        f"module {key!r} is a {type(base).__name__}; only Linear, Conv2d and affine norm layers can be composed"
    )


def is_composable(module: nn.Module) -> bool:
    """True for module types :func:`compose` accepts."""
    if isinstance(module, (nn.LayerNorm, nn.GroupNorm)):
        return module.weight is not None
    return isinstance(module, (nn.Linear, nn.Conv2d))
