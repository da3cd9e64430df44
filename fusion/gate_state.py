"""The adapter weights every composed layer of one engine reads, kept as flat gate buffers.

Gates cost O(1) Python per weight change: every composed layer of an engine registers its low-rank columns (owning
adapter, group, scale) with the engine's :class:`GateState`, which keeps ONE flat gate buffer per (device, dtype) for
all layers; installing new (G, A) weights fills it with a single gather + multiply, and each layer reads its columns
through a view. Nothing per layer runs when weights change.
"""

from __future__ import annotations

import torch
from torch import nn


class Columns:
    """One layer's low-rank columns as registered with a :class:`GateState`: for each column its group, owning
    adapter index and alpha/rank scale; ``start``/``stop`` locate them in the bank's flat gate buffer."""

    __slots__ = ("bank", "group", "owner", "scale", "start", "stop")

    def __init__(self, group: int, owner: torch.Tensor, scale: torch.Tensor, bank: tuple[torch.device, torch.dtype]):
        self.group = group
        self.owner = owner
        self.scale = scale
        self.bank = bank
        self.start = 0
        self.stop = 0


class _Bank:
    """Every registered column of one (device, dtype): a flat gather index into the (G, A) weights, the scales,
    and the gate buffer all layers read (``generation`` changes whenever the buffer is reallocated)."""

    def __init__(self, device: torch.device, dtype: torch.dtype, columns: list[Columns], num_adapters: int) -> None:
        self.device = device
        self.dtype = dtype
        self.num_adapters = num_adapters
        stop = 0
        for col in columns:
            col.start, stop = stop, stop + int(col.owner.numel())
            col.stop = stop
        if columns:
            self.index = torch.cat([c.group * num_adapters + c.owner for c in columns]).to(device)
            self.scale = torch.cat([c.scale for c in columns]).to(device)
        else:
            self.index = torch.zeros(0, dtype=torch.long, device=device)
            self.scale = torch.zeros(0, device=device)
        self.gate = torch.zeros(stop, dtype=dtype, device=device)
        self.sample_gate: torch.Tensor | None = None

    def fill(self, weights: torch.Tensor, sample_weights: torch.Tensor | None) -> None:
        """gate[c] = weight[group(c), owner(c)] · scale(c) for every column c, in one gather (and per sample)."""
        flat = weights.reshape(-1).to(self.device)
        self.gate.copy_(flat.index_select(0, self.index) * self.scale)
        if sample_weights is None:
            self.sample_gate = None
        else:
            per_sample = sample_weights.reshape(sample_weights.shape[0], -1).to(self.device)
            self.sample_gate = (per_sample.index_select(1, self.index) * self.scale).to(self.dtype)


class GateState:
    """Adapter weights every composed layer of one engine reads: ``weights`` (G, A), optional ``sample_weights``
    (N, G, A), a ``version`` bumped on every change, and the flat per-column gate buffers computed from them.
    ``installed`` holds the two as a strategy set them; while a per-adapter ``scale`` (A,) is set (the unconditional
    half of a branch-share composition) ``weights`` and ``sample_weights`` are those times the scale, so a strategy
    runs unchanged on the unconditional half at a share of its weights. While ``muted`` every unfused composed layer
    computes its base output alone."""

    def __init__(self, num_groups: int, device: torch.device) -> None:
        self.device = device
        self.weights = torch.zeros(num_groups, 0, device=device)
        self.sample_weights: torch.Tensor | None = None
        self.installed: tuple[torch.Tensor, torch.Tensor | None] = (self.weights, None)
        self.scale: torch.Tensor | None = None
        self.muted = False
        self.version = 0
        self.generation = 0
        self._columns: dict[int, Columns] = {}
        self._banks: dict[tuple[torch.device, torch.dtype], _Bank] = {}
        self._dirty = False

    def set(self, weights: torch.Tensor, sample_weights: torch.Tensor | None) -> None:
        """Install new (G, A) weights and (N, G, A) per-sample weights (or None): one gather per bank."""
        self.installed = (weights, sample_weights)
        if self.scale is not None:
            weights = weights * self.scale
            sample_weights = None if sample_weights is None else sample_weights * self.scale
        self.weights = weights
        self.sample_weights = sample_weights
        self.version += 1
        if self._dirty or any(b.num_adapters != weights.shape[1] for b in self._banks.values()):
            self._rebuild()
        else:
            for bank in self._banks.values():
                bank.fill(weights, sample_weights)

    def set_scale(self, scale: torch.Tensor | None) -> None:
        """Multiply every adapter's installed weights by ``scale`` (A,) from now on (None: by 1 again)."""
        self.scale = scale
        self.set(*self.installed)

    def register(self, layer: nn.Module, columns: Columns | None) -> None:
        """(Re)register ``layer``'s columns (None unregisters); the buffers are rebuilt at the next use."""
        if columns is None:
            self._columns.pop(id(layer), None)
        else:
            self._columns[id(layer)] = columns
        self._dirty = True

    def ensure(self) -> None:
        """Rebuild the buffers if layers registered since the last weight install."""
        if self._dirty:
            self._rebuild()

    def bank(self, columns: Columns) -> _Bank:
        """The bank holding ``columns`` (buffers up to date)."""
        if self._dirty:
            self._rebuild()
        return self._banks[columns.bank]

    def _rebuild(self) -> None:
        grouped: dict[tuple[torch.device, torch.dtype], list[Columns]] = {}
        for columns in self._columns.values():
            grouped.setdefault(columns.bank, []).append(columns)
        num_adapters = int(self.weights.shape[1])
        self._banks = {key: _Bank(key[0], key[1], cols, num_adapters) for key, cols in grouped.items()}
        for bank in self._banks.values():
            bank.fill(self.weights, self.sample_weights)
        self.generation += 1
        self._dirty = False
