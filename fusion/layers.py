"""Composed layers: one base Linear/Conv2d plus every attached adapter's update, computed in one pair of matmuls.

A composed layer replaces the base module in its parent but keeps the base module object as ``.base`` (and forwards
attribute lookups to it, so ``layer.weight`` / ``layer.in_features`` still work for diffusers code; ``state_dict``
keys stay the base's, so saving a composed model writes the usual names — with the fused weights while fused).
All low-rank adapters' factors live concatenated along rank, ``down_cat`` (R×in) and ``up_cat`` (out×R), with a
gate over the R rank columns (adapter weight × alpha/rank), so the unfused forward is

    y = base(x) + ((x @ down_catᵀ) * gate) @ up_catᵀ

whatever the number of adapters (with the gate folded into ``up_cat`` once per weight change). Where the factors are
at least as large as the weight itself, or Sparse/Dense updates are attached, the layer instead keeps one effective
weight W + Σ wᵢΔWᵢ beside the untouched base and runs a single matmul. A per-sample gate matrix (N×R) lets each
sample of a batch see its own adapters (LoRA Composite in one batched pass).

Adapter weights come from a :class:`GateState` shared by every composed layer of an engine: the engine swaps its
(G×A) weight tensor per step and bumps ``version``; each layer recomputes its gate lazily, only when the version
changed, so a step costs no module walk.

Fused mode writes Σ wᵢΔWᵢ into the base weight and keeps a pristine copy of that weight; unfusing copies it back
(bit-exact, never subtract-to-undo).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from fusion.adapters import AdapterKind, LowRank
from fusion.errors import CompositionError


class GateState:
    """Adapter weights every composed layer of one engine reads: ``weights`` (G, A), optional ``sample_weights``
    (N, G, A), and a ``version`` bumped on every change so layers know when to recompute their gates."""

    def __init__(self, num_groups: int, device: torch.device) -> None:
        self.device = device
        self.weights = torch.zeros(num_groups, 0, device=device)
        self.sample_weights: torch.Tensor | None = None
        self.version = 0

    def set(self, weights: torch.Tensor, sample_weights: torch.Tensor | None) -> None:
        """Install new (G, A) weights and (N, G, A) per-sample weights (or None)."""
        self.weights = weights
        self.sample_weights = sample_weights
        self.version += 1


@dataclass
class _Slot:
    """One adapter's update inside a composed layer; low-rank slots own columns [start, stop) of the concatenation."""

    name: str
    kind: AdapterKind
    start: int = 0
    stop: int = 0


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


class ComposedLayer(nn.Module):
    """Shared machinery of :class:`ComposedLinear` and :class:`ComposedConv2d` (see the module docstring)."""

    def __init__(self, base: nn.Module, key: str, group: int, state: GateState) -> None:
        super().__init__()
        self.base = base
        self.key = key
        self.group = group
        self.state = state
        self.slots: list[_Slot] = []
        self.down_cat: torch.Tensor | None = None
        self.up_cat: torch.Tensor | None = None
        self.pristine: torch.Tensor | None = None
        self._owner = torch.zeros(0, dtype=torch.long, device=base.weight.device)
        self._col_scale = torch.zeros(0, device=base.weight.device)
        self._extra_owner = torch.zeros(0, dtype=torch.long, device=base.weight.device)
        self._version = -1
        self._dense_path = False
        self._up_scaled: torch.Tensor | None = None
        self._effective: torch.Tensor | None = None
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
    def weight_param(self) -> torch.Tensor:
        """The base module's weight parameter (what fused mode writes)."""
        return self.base.weight

    @property
    def rank(self) -> int:
        """Total number of concatenated low-rank columns R."""
        return 0 if self.down_cat is None else int(self.down_cat.shape[0])

    @property
    def names(self) -> list[str]:
        """Names of the adapters attached to this layer, in attach order."""
        return [slot.name for slot in self.slots]

    @property
    def fused(self) -> bool:
        """True while Σ wᵢΔWᵢ is written into the base weight."""
        return self.pristine is not None

    def add(self, name: str, kind: AdapterKind) -> None:
        """Attach one adapter's update (already on the base weight's device and dtype)."""
        slot = _Slot(name, kind)
        if isinstance(kind, LowRank):
            slot.start = self.rank
            slot.stop = slot.start + kind.rank
            self.down_cat = kind.down if self.down_cat is None else torch.cat([self.down_cat, kind.down], 0)
            self.up_cat = kind.up if self.up_cat is None else torch.cat([self.up_cat, kind.up], 1)
        self.slots.append(slot)

    def remove(self, name: str) -> None:
        """Detach the named adapter's update; its rank columns are cut out of the concatenation."""
        slot = next(s for s in self.slots if s.name == name)
        self.slots.remove(slot)
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
        """Map each rank column (and each sparse/dense update) to its adapter's index in the engine's weights."""
        device = self.base.weight.device
        owner: list[int] = []
        scale: list[float] = []
        extra: list[int] = []
        for slot in self.slots:
            if isinstance(slot.kind, LowRank):
                owner += [index[slot.name]] * slot.kind.rank
                scale += [slot.kind.scale] * slot.kind.rank
            else:
                extra.append(index[slot.name])
        self._owner = torch.tensor(owner, dtype=torch.long, device=device)
        self._col_scale = torch.tensor(scale, dtype=torch.float32, device=device)
        self._extra_owner = torch.tensor(extra, dtype=torch.long, device=device)
        weight = self.base.weight
        self._dense_path = bool(extra) or self.rank * (weight[0].numel() + weight.shape[0]) >= weight.numel()
        self._forget()

    def _forget(self) -> None:
        """Drop the cached gate / effective weight so the next forward recomputes them."""
        self._version = -1
        self._up_scaled = None
        self._effective = None

    # ----- gates -----------------------------------------------------------------------------------------------

    def _extra_kinds(self) -> list[AdapterKind]:
        return [slot.kind for slot in self.slots if not isinstance(slot.kind, LowRank)]

    def _combined_extra(self, weights: torch.Tensor, dtype: torch.dtype) -> torch.Tensor | None:
        """Σ wᵢΔWᵢ over the sparse/dense updates for adapter weights ``weights`` (A,), or None if there are none."""
        kinds = self._extra_kinds()
        if not kinds:
            return None
        w = weights[self._extra_owner]
        total = torch.zeros(self.base.weight.shape, dtype=torch.float32, device=self.base.weight.device)
        for i, kind in enumerate(kinds):
            total += w[i] * kind.delta(torch.float32)
        return total.to(dtype)

    def _refresh(self) -> None:
        """Recompute what the shared-weight forward needs if the engine's weights changed (once per change).

        Where the concatenated factors are at least as large as the weight (R·(in+out) ≥ in·out), or sparse/dense
        updates are attached, the cheapest exact forward is one matmul with an effective weight W + Σ wᵢΔWᵢ, kept
        beside the untouched base weight (no larger than the factors it replaces). Otherwise the gate is folded into
        the up factor so a forward is base + two thin matmuls.
        """
        state = self.state
        if self._version == state.version:
            return
        weights = state.weights[self.group]
        weight = self.base.weight
        if self._dense_path:
            self._effective = self.merged(weight, weights)
        else:
            assert self.up_cat is not None
            gate = (weights[self._owner] * self._col_scale).to(weight.dtype)
            self._up_scaled = self.up_cat * self._broadcast(gate[None], self.up_cat)[0]
        self._version = state.version

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
        weights = sample[:, self.group]
        dtype = self.base.weight.dtype
        gate = (weights[:, self._owner] * self._col_scale).to(dtype)
        return gate, weights[:, self._extra_owner].to(dtype)

    # ----- fused mode ------------------------------------------------------------------------------------------

    def delta(self, weights: torch.Tensor) -> torch.Tensor:
        """Σ wᵢΔWᵢ for adapter weights ``weights`` (A,), in fp32, shaped like the base weight."""
        weight = self.base.weight
        total = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
        self.add_into(total, weights)
        return total

    @torch.no_grad()
    def add_into(self, target: torch.Tensor, weights: torch.Tensor) -> None:
        """target += Σ wᵢΔWᵢ in place (``target`` shaped like the base weight).

        Low-rank updates go in as one in-place GEMM over the concatenated factors (gate folded into the up factor),
        in the target's dtype where that is exact enough and fast (fp32 anywhere, half precision on accelerators);
        half precision on CPU is summed in fp32 and rounded once.
        """
        direct = target.dtype == torch.float32 or target.device.type != "cpu"
        work = target if direct else target.float()
        flat = work.view(work.shape[0], -1)
        if self.rank:
            assert self.down_cat is not None
            assert self.up_cat is not None
            gate = (weights[self._owner] * self._col_scale).to(work.dtype)
            flat.addmm_(self.up_cat.flatten(1).to(work.dtype) * gate, self.down_cat.flatten(1).to(work.dtype))
        extra = self._combined_extra(weights, work.dtype)
        if extra is not None:
            flat += extra.flatten(1)
        if not direct:
            target.copy_(work)

    def merged(self, weight: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """A new tensor ``weight`` + Σ wᵢΔWᵢ (``weight`` itself is left as it is)."""
        out = weight.detach().clone()
        self.add_into(out, weights)
        return out

    @torch.no_grad()
    def fuse(self, weights: torch.Tensor) -> None:
        """Write pristine W + Σ wᵢΔWᵢ into the base weight (``weights``: (A,) for this layer's group)."""
        param = self.base.weight.data
        self._forget()
        if self.pristine is None:
            self.pristine = param.clone()
        else:
            param.copy_(self.pristine)
        self.add_into(param, weights)

    @torch.no_grad()
    def unfuse(self) -> None:
        """Copy the pristine weight back (bit-exact) and leave fused mode."""
        if self.pristine is not None:
            self.base.weight.copy_(self.pristine)
            self.pristine = None
            self._forget()

    # ----- forward ---------------------------------------------------------------------------------------------

    def _down(self, x: torch.Tensor) -> torch.Tensor:
        """x → (…, R) through the concatenated down factors."""
        raise NotImplementedError

    def _add_up(self, y: torch.Tensor, h: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        """y + h through the up factors ``up`` (the gate already folded in, or applied to ``h``)."""
        raise NotImplementedError

    def _with_weight(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """The base layer's operation (bias included) with another weight."""
        raise NotImplementedError

    def _apply_delta(self, x: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        """The base layer's operation with ``delta`` as the weight and no bias."""
        raise NotImplementedError

    def _broadcast(self, gate: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        """Shape an (N, C) per-sample gate to multiply ``h`` (channels last for linear, dim 1 for conv)."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Base output plus every attached update at the current weights (the base alone while fused)."""
        if self.pristine is not None or not self.slots:
            return self.base(x)
        per_sample = self._sample_gate(x.shape[0])
        if per_sample is None:
            self._refresh()
            if self._effective is not None:
                return self._with_weight(x, self._effective)
            assert self._up_scaled is not None
            return self._add_up(self.base(x), self._down(x), self._up_scaled)
        gate, extra_weights = per_sample
        y = self.base(x)
        if self.rank:
            assert self.up_cat is not None
            y = self._add_up(y, self._down(x) * self._broadcast(gate, x), self.up_cat)
        for i, kind in enumerate(self._extra_kinds()):
            term = self._apply_delta(x, kind.delta(x.dtype))
            y = y + term * self._broadcast(extra_weights[:, i : i + 1], term)
        return y


class ComposedLinear(ComposedLayer):
    """A composed ``nn.Linear``: low-rank term as two linears (down R×in, up out×R)."""

    def _down(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.down_cat)

    def _add_up(self, y: torch.Tensor, h: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        flat = torch.addmm(y.reshape(-1, y.shape[-1]), h.reshape(-1, h.shape[-1]), up.T)
        return flat.reshape(y.shape)

    def _with_weight(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return F.linear(x, weight, self.base.bias)

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

    def _with_weight(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return self.base._conv_forward(x, weight, self.base.bias)

    def _apply_delta(self, x: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        return self.base._conv_forward(x, delta, None)

    def _broadcast(self, gate: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        return gate.reshape(gate.shape[0], gate.shape[1], *([1] * (h.dim() - 2)))


def compose(base: nn.Module, key: str, group: int, state: GateState) -> ComposedLayer:
    """Wrap ``base`` (an ``nn.Linear`` or ``nn.Conv2d``) in the matching composed layer."""
    if isinstance(base, nn.Linear):
        return ComposedLinear(base, key, group, state)
    if isinstance(base, nn.Conv2d):
        return ComposedConv2d(base, key, group, state)
    raise CompositionError(f"module {key!r} is a {type(base).__name__}; only Linear and Conv2d layers can be composed")


def is_composable(module: nn.Module) -> bool:
    """True for module types :func:`compose` accepts."""
    return isinstance(module, (nn.Linear, nn.Conv2d))
