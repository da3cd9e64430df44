"""Σ wᵢΔWᵢ of a composed layer's updates, and fused mode: that sum written into the base weight.

Fused mode writes Σ wᵢΔWᵢ into the base weight and keeps a pristine copy of that weight; unfusing copies it back
(bit-exact, never subtract-to-undo). When every update with a non-zero weight is Sparse (SHiRA), fusing instead
scatters the values at their sorted indices and saves only the original entries there; unfusing writes them back,
and re-fusing a weight set seen before reuses its fused values (:mod:`fusion.sparse_switching`).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch
from torch import nn

from fusion.adapters import AdapterKind, Dense, LowRank, Sparse
from fusion.sparse_switching import FusedSparse, FusedSparseCache, fuse_sparse, restore_sparse


@dataclass
class Slot:
    """One adapter's update inside a composed layer; low-rank slots own columns [start, stop) of the concatenation."""

    name: str
    kind: AdapterKind
    start: int = 0
    stop: int = 0


class FusedWeights(ABC):
    """The weight sums and fused mode of :class:`fusion.layers.ComposedLayer` (which holds the state named here)."""

    base: nn.Module
    slots: list[Slot]
    down_cat: torch.Tensor | None
    up_cat: torch.Tensor | None
    pristine: torch.Tensor | None
    pristine_bias: torch.Tensor | None
    _saved: FusedSparse | None
    sparse_cache: FusedSparseCache
    _slot_index: list[int]
    _owner: torch.Tensor
    _col_scale: torch.Tensor
    _extra_owner: torch.Tensor

    @property
    def rank(self) -> int:
        """Total number of concatenated low-rank columns R."""
        return 0 if self.down_cat is None else int(self.down_cat.shape[0])

    @property
    def fused(self) -> bool:
        """True while Σ wᵢΔWᵢ is written into the base weight (dense copy or sparse scatter)."""
        return self.pristine is not None or self._saved is not None or self.pristine_bias is not None

    @abstractmethod
    def _forget(self) -> None:
        """Drop what the layer cached from the weights as they were (its effective weight); called on every fuse."""

    # ----- weight sums -----------------------------------------------------------------------------------------

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

    def _combined_bias(self, weights: torch.Tensor, dtype: torch.dtype) -> torch.Tensor | None:
        """Σ wᵢΔbᵢ over the dense updates that carry a bias update, or None if none does."""
        kinds = self._extra_kinds()
        if not any(isinstance(kind, Dense) and kind.bias is not None for kind in kinds):
            return None
        w = weights[self._extra_owner]
        total = torch.zeros(self.base.weight.shape[0], dtype=torch.float32, device=self.base.weight.device)
        for i, kind in enumerate(kinds):
            if isinstance(kind, Dense) and kind.bias is not None:
                total += w[i] * kind.bias_delta(torch.float32)
        return total.to(dtype)

    def _merged_bias(self, weights: torch.Tensor) -> torch.Tensor | None:
        """The base bias plus Σ wᵢΔbᵢ (the base bias itself when no update touches it)."""
        bias = self.base.bias
        extra = None if bias is None else self._combined_bias(weights, torch.float32)
        return bias if extra is None else (bias.detach().float() + extra).to(bias.dtype)

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
            flat += extra.reshape(flat.shape)
        if not direct:
            target.copy_(work)

    def merged(self, weight: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """A new tensor ``weight`` + Σ wᵢΔWᵢ (``weight`` itself is left as it is)."""
        out = weight.detach().clone()
        self.add_into(out, weights)
        return out

    def pristine_weight(self) -> torch.Tensor:
        """The base weight as it was before any fusing (the weight itself when not fused, else a copy)."""
        if self.pristine is not None:
            return self.pristine
        weight = self.base.weight.detach()
        if self._saved is None:
            return weight
        copy = weight.clone()
        restore_sparse(copy, self._saved)
        return copy

    def _sparse_updates(self, weights: torch.Tensor) -> list[tuple[Sparse, float]] | None:
        """(update, weight) for every non-zero-weight slot if all of them are Sparse, else None."""
        values = weights.tolist()
        active = [(slot.kind, values[i]) for slot, i in zip(self.slots, self._slot_index) if values[i] != 0.0]
        if all(isinstance(kind, Sparse) for kind, _ in active):
            return [(kind, w) for kind, w in active if isinstance(kind, Sparse)]
        return None

    def fuse(self, weights: torch.Tensor) -> None:
        """Write pristine W + Σ wᵢΔWᵢ into the base weight (``weights``: (A,) for this layer's group).

        Sparse-only updates are scattered in place with the original entries saved (no full pristine copy);
        anything else writes the dense sum, keeping a pristine copy of the weight. Runs without autograd (entered
        here only when the caller has not: the engine fuses every layer under one ``no_grad``).
        """
        if torch.is_grad_enabled():
            with torch.no_grad():
                return self.fuse(weights)
        param = self.base.weight.detach()
        self._forget()
        sparse = self._sparse_updates(weights)
        if sparse is None:
            self._fuse_bias(weights)
            self._restore_sparse()
            if self.pristine is None:
                self.pristine = param.clone()
            else:
                param.copy_(self.pristine)
            self.add_into(param, weights)
            return
        self._restore_bias()  # no update with a non-zero weight carries a bias
        if self.pristine is not None:
            param.copy_(self.pristine)
            self.pristine = None
        prepared = self.sparse_cache.lookup(param, sparse) if sparse else None
        saved = fuse_sparse(param, sparse, self._saved, prepared)
        self.sparse_cache.store(param, sparse, saved)
        if saved is None:
            empty = torch.zeros(0, dtype=torch.long, device=param.device)
            saved = FusedSparse(empty, param.new_zeros(0), param.new_zeros(0))
        vars(self)["_saved"] = saved  # a plain attribute, set without nn.Module's checks (per layer, per switch)

    def _fuse_bias(self, weights: torch.Tensor) -> None:
        """Write pristine b + Σ wᵢΔbᵢ into the base bias (keeping a pristine copy), or put the pristine one back
        (called under ``fuse``'s no_grad)."""
        bias = self.base.bias
        extra = None if bias is None else self._combined_bias(weights, torch.float32)
        if extra is None:
            self._restore_bias()
            return
        if self.pristine_bias is None:
            self.pristine_bias = bias.detach().clone()
        bias.copy_((self.pristine_bias.float() + extra).to(bias.dtype))

    def _restore_bias(self) -> None:
        if self.pristine_bias is not None:
            self.base.bias.copy_(self.pristine_bias)
            self.pristine_bias = None

    def _restore_sparse(self) -> None:
        if self._saved is not None:
            param = self.base.weight.detach()
            restore_sparse(param, self._saved)
            self.sparse_cache.store(param, [], None)
            self._saved = None

    @torch.no_grad()
    def unfuse(self) -> None:
        """Put the pristine weight (and bias) back (bit-exact) and leave fused mode."""
        self._restore_bias()
        if self._saved is not None:
            self._restore_sparse()
            self._forget()
        if self.pristine is not None:
            self.base.weight.copy_(self.pristine)
            self.pristine = None
            self._forget()
