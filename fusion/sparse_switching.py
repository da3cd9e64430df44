"""Fused sparse switching: write SHiRA updates straight into weights and take them out again, bit-exactly and fast.

Fused mode writes W + Σ wᵢ·valuesᵢ at the updates' sorted flat positions and keeps the base values there; taking an
adapter out writes those base values back, so the base is restored bit-exactly without subtracting anything.

Why our own path rather than PEFT's ``ShiraLayer.merge``/``unmerge``: PEFT adds a dense ΔW (O(out·in) per layer) and
unmerges by subtracting it (not bit-exact in fp16/bf16). Here a switch touches only the K stored positions per layer,
and on CPU its cost is the memory traffic of the cache lines those positions fall in (``benchmarks/shira_switch.py``
measures it against diffusers' LoRA cycle and against the bare two-scatter floor). What keeps that traffic down:

- a switch A→B works weight by weight — restore A's positions, read B's base values, write B's sums — so on a weight
  that fits the cache the lines A and B share are fetched once, not three times (large weights are not cut into
  chunks: on SD shapes the extra calls cost more than the shared lines save, and a chunk big enough to pay for its
  call does not fit the cache);
- a fused state remembers its base values and its fused values (:class:`FusedSparse`); switching back to a set seen
  before (:class:`FusedSparseCache`) is a plain scatter, with no gather and no arithmetic;
- when B has the same support as A (SHiRA masks that depend only on the base — WM, struct, or one random seed —
  give every adapter the same positions), nothing needs restoring: B's values overwrite A's in one scatter;
- int64 positions go through ``index_copy_``/``take``, which are 10–25% faster than ``index_put_``/``index_select``
  on this project's CPU; int32 positions (as SHiRA files store them) through the two that accept them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from fusion.adapters import Sparse

_SUPPORT_SAMPLES = 64
"""Positions compared before two supports are compared in full (different random masks differ at once)."""

Updates = Sequence[tuple[Sparse, float]]


@dataclass(eq=False)
class FusedSparse:
    """One weight's fused sparse state: sorted flat positions, the base values there, and the values written there."""

    index: torch.Tensor
    original: torch.Tensor
    fused: torch.Tensor
    middle: int = field(default=-1, compare=False)
    """``index[numel // 2]`` as a Python int, read once when the state is made (-1 when empty), so telling two
    states' supports apart on a switch costs no tensor access (see :func:`same_support`)."""

    def __post_init__(self) -> None:
        if self.middle == -1:
            self.middle = middle_position(self.index)

    @property
    def nbytes(self) -> int:
        """Bytes held beyond the adapter's own tensors (base values and fused values)."""
        return self.original.nbytes + self.fused.nbytes


def merge_updates(updates: Updates) -> tuple[torch.Tensor, torch.Tensor]:
    """(sorted positions, Σ wᵢ·valuesᵢ there) for one weight's updates (union of supports for several).

    The sum is fp32, except for one update at weight 1, whose values are returned as they are: added to a weight of
    the same dtype they give the same once-rounded sum (half-precision adds run in fp32, and an fp32 sum of two
    halves rounds to the nearest half exactly as the exact sum does), without a conversion pass.
    """
    if len(updates) == 1:
        update, w = updates[0]
        return update.index, update.values if w == 1.0 else update.values.float() * float(w)
    index, inverse = torch.unique(torch.cat([u.index for u, _ in updates]), sorted=True, return_inverse=True)
    increment = torch.zeros(index.numel(), dtype=torch.float32, device=index.device)
    increment.index_add_(0, inverse, torch.cat([u.values.float() * float(w) for u, w in updates]))
    return index, increment


def middle_position(index: torch.Tensor) -> int:
    """The middle element of a position tensor as a Python int (-1 when empty): one read that tells most unequal
    supports apart."""
    return int(index[index.numel() // 2]) if index.numel() else -1


def same_support(first: torch.Tensor, second: torch.Tensor) -> bool:
    """True when two sorted position tensors are equal (a strided sample first, so most unequal ones stop there).
    :func:`fuse_sparse` compares the states' :attr:`FusedSparse.middle` before calling it."""
    if first is second:
        return True
    if first.numel() != second.numel():
        return False
    if not first.numel():
        return True
    step = max(1, first.numel() // _SUPPORT_SAMPLES)
    if not torch.equal(first[::step], second[::step].to(first.dtype)):
        return False
    return torch.equal(first, second.to(first.dtype))


def _combine(original: torch.Tensor, increment: torch.Tensor) -> torch.Tensor:
    """original + increment, summed in fp32 and rounded once to the weight's dtype, as a dense fp32 sum is."""
    if increment.dtype == original.dtype:
        return torch.add(original, increment)
    return torch.add(original, increment, out=torch.empty_like(original))


def _write(flat: torch.Tensor, index: torch.Tensor, values: torch.Tensor) -> None:
    if index.dtype == torch.int64:
        flat.index_copy_(0, index, values)
    else:
        flat.index_put_((index,), values)


def _read(flat: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    return flat.take(index) if index.dtype == torch.int64 else flat.index_select(0, index)


def fuse_sparse(
    weight: torch.Tensor,
    updates: Updates,
    current: FusedSparse | None = None,
    prepared: FusedSparse | None = None,
) -> FusedSparse | None:
    """Take ``current`` out of ``weight`` and write ``updates`` in, in place; return the new state (None: no updates).

    ``prepared`` is a state an earlier call returned for the same updates on this weight (as the base is the same,
    its base values and fused values still hold): it is written as is, or not at all when it is ``current``.
    Without it the updates are merged, the base values at their positions read (after ``current`` is taken out)
    and each sum rounded once to the weight's dtype, as a dense fp32 sum is.
    """
    flat = weight.detach().view(-1)
    if prepared is not None and prepared is current:
        return current
    if prepared is None and not updates:
        if current is not None:
            _write(flat, current.index, current.original)
        return None
    if prepared is not None:
        index, increment, middle = prepared.index, None, prepared.middle
    else:
        index, increment = merge_updates(updates)
        middle = middle_position(index)
    shared = current is not None and (
        current.index is index or (current.middle == middle and same_support(current.index, index))
    )
    if current is not None and not shared:
        _write(flat, current.index, current.original)
    if prepared is None:
        assert increment is not None
        if shared:
            assert current is not None
            index, original = current.index, current.original
        else:
            original = _read(flat, index)
        prepared = FusedSparse(index, original, _combine(original, increment), middle)
    _write(flat, prepared.index, prepared.fused)
    return prepared


def restore_sparse(weight: torch.Tensor, state: FusedSparse) -> None:
    """Write the base values of ``state`` back into ``weight`` (bit-exact undo of :func:`fuse_sparse`)."""
    _write(weight.detach().view(-1), state.index, state.original)


class FusedSparseCache:
    """The fused states of the last few update sets of one weight, so switching back to one costs a single scatter.

    Entries are keyed by the identity of the :class:`Sparse` updates and their weights. They stay valid while the
    weight is only written through :func:`fuse_sparse` / :func:`restore_sparse`: a weight replaced, cast, moved, or
    written in place by anything else (its version counter moves) drops them. Writes through ``weight.data`` are
    invisible to the version counter; call :meth:`clear` after those.
    """

    def __init__(self, capacity: int = 4) -> None:
        self.capacity = capacity
        self._entries: list[tuple[tuple[tuple[Sparse, float], ...], FusedSparse]] = []
        self._seen: tuple[int, torch.dtype, torch.device, int] | None = None

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def nbytes(self) -> int:
        """Bytes held by the cached states."""
        return sum(state.nbytes for _, state in self._entries)

    def clear(self) -> None:
        """Forget every cached state."""
        self._entries = []
        self._seen = None

    def discard(self, update: Sparse) -> None:
        """Forget the states that involve ``update`` (its adapter is being detached); the others stay valid."""
        self._entries = [(key, state) for key, state in self._entries if all(u is not update for u, _ in key)]

    @staticmethod
    def _stamp(weight: torch.Tensor) -> tuple[int, torch.dtype, torch.device, int]:
        return (weight.data_ptr(), weight.dtype, weight.device, weight._version)

    def lookup(self, weight: torch.Tensor, updates: Updates) -> FusedSparse | None:
        """The cached state for exactly these updates and weights on this weight, or None."""
        if self._seen != self._stamp(weight):
            self.clear()
            return None
        for position, (key, state) in enumerate(self._entries):
            if len(key) == len(updates) and all(a is b and v == w for (a, v), (b, w) in zip(key, updates)):
                self._entries.append(self._entries.pop(position))
                return state
        return None

    def store(self, weight: torch.Tensor, updates: Updates, state: FusedSparse | None) -> None:
        """Remember ``state`` for ``updates`` (the newest entry) and the weight as it is after the write."""
        if state is not None and self.capacity > 0 and not any(s is state for _, s in self._entries):
            self._entries.append((tuple((u, float(w)) for u, w in updates), state))
            del self._entries[: max(0, len(self._entries) - self.capacity)]
        self._seen = self._stamp(weight)
