"""LoRA-Squeeze for whole adapters and composed layers: any exact update → ordinary LoRA factors at a chosen rank.

A low-rank update (or a weighted sum of several, whose factors concatenate exactly) is squeezed through the QR-core
SVD of :func:`fusion.adapters.qr_core_svd` without forming ΔW; any other update (Dense, Sparse, or a resolved
weight-relative kind) goes through an SVD of its dense ΔW, flattened to (out, in·kh·kw) for convs. Either way the
result at full rank reproduces ΔW exactly (to float rounding), and a lower rank is the best approximation in
Frobenius norm; the retained energy Σ_kept σ² / Σ σ² is reported per layer.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch

from fusion.adapters import AdapterKind, Dense, LowRank, Sparse, concat_low_rank, qr_core_svd
from fusion.errors import CompositionError


@dataclass(frozen=True)
class Squeezed:
    """One layer after squeezing: the new factors, its rank before (of the exact form) and after, the energy
    ‖ΔW‖² = Σ σ² and the retained fraction of it."""

    update: LowRank
    rank_before: int
    rank_after: int
    energy: float
    retained: float


def _kept_rank(singular: torch.Tensor, rank: int | None, energy: float | None) -> int:
    """How many singular values to keep for a fixed ``rank`` or an ``energy`` fraction (exactly one given)."""
    if (rank is None) == (energy is None):
        raise CompositionError("give exactly one of rank or energy", hint="e.g. --rank 16 or --energy 0.99")
    if rank is not None:
        if rank < 1:
            raise CompositionError(f"rank must be ≥ 1, got {rank}")
        return max(1, min(rank, singular.numel()))
    assert energy is not None
    if not 0.0 < energy <= 1.0:
        raise CompositionError(f"energy must be in (0, 1], got {energy}")
    cumulative = torch.cumsum(singular.double() ** 2, 0)
    if not cumulative.numel() or float(cumulative[-1]) == 0.0:
        return 1
    total = cumulative[-1]
    return min(singular.numel(), int(torch.searchsorted(cumulative, energy * total - 1e-12 * total).item()) + 1)


def _factors(
    u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor, keep: int, shape: tuple[int, ...], dtype: torch.dtype
) -> LowRank:
    root = s[:keep].sqrt()
    up = (u[:, :keep] * root).reshape(shape[0], keep, *([1, 1] if len(shape) == 4 else []))
    down = (root[:, None] * vh[:keep]).reshape(keep, *shape[1:])
    return LowRank(down=down.to(dtype), up=up.to(dtype), alpha=float(keep))


def squeeze_update(
    update: LowRank | Dense | Sparse,
    *,
    rank: int | None = None,
    energy: float | None = None,
    dtype: torch.dtype = torch.float32,
) -> Squeezed:
    """Ordinary LoRA factors (alpha = rank, scale 1) for ``update`` at ``rank`` or ``energy``; see the module."""
    if isinstance(update, LowRank):
        spectrum = qr_core_svd(update)
        u, s, vh = spectrum.U, spectrum.S, spectrum.Vh
        before = update.rank
    else:
        delta = update.delta(torch.float64).reshape(update.shape[0], -1)
        u, s, vh = torch.linalg.svd(delta, full_matrices=False)
        before = int(s.numel())
    keep = _kept_rank(s, rank, energy)
    total = float((s.double() ** 2).sum())
    retained = 1.0 if total == 0.0 else float((s[:keep].double() ** 2).sum()) / total
    return Squeezed(_factors(u, s, vh, keep, tuple(update.shape), dtype), before, keep, total, retained)


def combine(weighted: Iterable[tuple[AdapterKind, float]]) -> LowRank | Dense:
    """The exact Σ wᵢ·ΔWᵢ of one layer's updates: concatenated factors when all are low-rank, else dense."""
    items = [(kind, w) for kind, w in weighted if w != 0.0]
    if any((isinstance(kind, Dense) and kind.bias is not None) or len(kind.shape) == 1 for kind, _ in items):
        raise CompositionError(
            "a layer's composition includes a bias or norm-layer update (LyCORIS diff_b, w_norm/b_norm), which LoRA "
            "factors cannot hold",
            hint="export without that adapter, or apply it separately",
        )
    if not items:
        raise CompositionError("no update with a non-zero weight to combine")
    low_rank = [(kind, w) for kind, w in items if isinstance(kind, LowRank)]
    if len(low_rank) == len(items):
        return concat_low_rank(low_rank)
    total = sum(float(w) * kind.delta(torch.float64) for kind, w in items)
    assert isinstance(total, torch.Tensor)
    return Dense(weight=total)
