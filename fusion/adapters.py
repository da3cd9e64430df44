"""Canonical adapters: every file format is read into these, every composition method computes from them.

Three kinds of per-layer update exist, and each answers ``.delta()`` with the dense ΔW (scale folded in),
the ground truth every fast path is tested against:

- :class:`LowRank` — LoRA/LoCon factors ``up @ down`` with ``alpha / rank`` scaling (linear and conv);
- :class:`Sparse` — SHiRA-style sorted flat indices + values into the weight;
- :class:`Dense` — a full ΔW (LoKr, full fine-tune diffs, anything without a cheaper exact form).

A fourth family, :class:`Relative` (IA3, OFT/BOFT, DoRA, GLoRA: the kinds in :mod:`fusion.relative`), is a function
of the base weight; it has no ΔW of its own until the engine resolves it against the pristine weight it adapts.

An :class:`Adapter` groups them by module path: ``layers`` for the denoiser (UNet or DiT), and
``text_encoder_layers`` keyed ``"text_encoder.<path>"`` / ``"text_encoder_2.<path>"``.

The exact helpers (QR-core SVD, concatenation, LoRA→sparse) never form ΔW for low-rank
inputs except where the result is inherently dense.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Union

import torch

from fusion.errors import CompositionError, ShapeMismatchError

FAMILIES = ("sd1", "sd2", "sdxl", "flux")
"""Base-model families an adapter can be made for. FLUX.1 Kontext shares the ``flux`` family."""

TEXT_ENCODER_PREFIXES = ("text_encoder.", "text_encoder_2.")


@dataclass(frozen=True, eq=False)
class LowRank:
    """A LoRA/LoCon update ΔW = (alpha / rank) · up @ down.

    ``down`` is (r, in) for linear layers or (r, in, kh, kw) for convs; ``up`` is (out, r) or (out, r, 1, 1).
    ``alpha=None`` means alpha = rank (scale 1), which is what files without an alpha key intend.
    """

    down: torch.Tensor
    up: torch.Tensor
    alpha: float | None = None

    def __post_init__(self) -> None:
        if self.down.dim() not in (2, 4) or self.up.dim() != self.down.dim():
            raise ShapeMismatchError(
                f"LoRA factors must both be 2-D (linear) or 4-D (conv), got down {tuple(self.down.shape)} "
                f"and up {tuple(self.up.shape)}"
            )
        if self.up.shape[1] != self.down.shape[0]:
            raise ShapeMismatchError(
                f"LoRA rank mismatch: down has rank {self.down.shape[0]}, up has rank {self.up.shape[1]}"
            )
        if self.down.shape[0] == 0:
            raise ShapeMismatchError("LoRA factors of rank 0 (empty): the update has no scale")
        if self.up.dim() == 4 and tuple(self.up.shape[2:]) != (1, 1):
            raise ShapeMismatchError(f"conv LoRA up factor must be 1×1, got {tuple(self.up.shape)}")

    @property
    def rank(self) -> int:
        """Number of rank columns (r)."""
        return int(self.down.shape[0])

    @property
    def scale(self) -> float:
        """alpha / rank, the factor folded into :meth:`delta`."""
        alpha = self.rank if self.alpha is None else float(self.alpha)
        return alpha / self.rank

    @property
    def shape(self) -> tuple[int, ...]:
        """Shape of the weight this update applies to: (out, in) or (out, in, kh, kw)."""
        return (int(self.up.shape[0]), *(int(s) for s in self.down.shape[1:]))

    @property
    def is_conv(self) -> bool:
        """True for conv (LoCon) factors."""
        return self.down.dim() == 4

    def delta(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Dense ΔW = scale · up @ down, computed in fp32 and returned in ``dtype`` (default: the factors')."""
        out_dtype = dtype or self.up.dtype
        product = self.up.flatten(1).float() @ self.down.flatten(1).float()
        return (product * self.scale).reshape(self.shape).to(out_dtype)

    def tensors(self) -> tuple[torch.Tensor, ...]:
        """The tensors this update owns (for byte counts and device moves)."""
        return (self.down, self.up)

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> LowRank:
        """A copy on ``device`` / in ``dtype``."""
        return replace(self, down=self.down.to(device=device, dtype=dtype), up=self.up.to(device=device, dtype=dtype))


@dataclass(frozen=True, eq=False)
class Sparse:
    """A sparse update: ``values`` written at sorted, unique flat ``index`` positions of a weight of ``shape``.

    ``index`` is int64, or int32 as SHiRA files store it (kept as read: no conversion pass, half the bytes); other
    integer dtypes are widened to int64.
    """

    index: torch.Tensor
    values: torch.Tensor
    shape: tuple[int, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "shape", tuple(int(s) for s in self.shape))
        if self.index.is_floating_point() or self.index.is_complex() or self.index.dtype == torch.bool:
            raise ShapeMismatchError(f"sparse indices must be integers, got {self.index.dtype}")
        if self.index.dtype not in (torch.int32, torch.int64):
            object.__setattr__(self, "index", self.index.long())
        if self.index.dim() != 1 or self.values.dim() != 1 or self.index.numel() != self.values.numel():
            raise ShapeMismatchError(
                f"sparse update needs 1-D index and values of equal length, got {tuple(self.index.shape)} "
                f"and {tuple(self.values.shape)}"
            )
        if self.index.numel():
            if self.index.numel() > 1 and not bool((self.index[1:] > self.index[:-1]).all()):
                raise ShapeMismatchError("sparse indices must be sorted and unique")
            if int(self.index[0]) < 0 or int(self.index[-1]) >= math.prod(self.shape):
                raise ShapeMismatchError(f"sparse indices fall outside a weight of shape {self.shape}")

    @classmethod
    def from_unsorted(cls, index: torch.Tensor, values: torch.Tensor, shape: Iterable[int]) -> Sparse:
        """Build from flat indices in any order (duplicates are summed)."""
        index = index.reshape(-1).long()
        values = values.reshape(-1)
        unique, inverse = torch.unique(index, sorted=True, return_inverse=True)
        summed = torch.zeros(unique.numel(), dtype=values.dtype, device=values.device)
        summed.index_add_(0, inverse, values)
        return cls(unique, summed, tuple(shape))

    @property
    def nnz(self) -> int:
        """Number of stored entries."""
        return int(self.index.numel())

    @property
    def density(self) -> float:
        """Fraction of the weight's entries that are stored."""
        return self.nnz / max(1, math.prod(self.shape))

    def delta(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Dense ΔW with the values at their positions and zeros elsewhere."""
        out = torch.zeros(math.prod(self.shape), dtype=dtype or self.values.dtype, device=self.values.device)
        out[self.index] = self.values.to(out.dtype)
        return out.reshape(self.shape)

    def tensors(self) -> tuple[torch.Tensor, ...]:
        """The tensors this update owns."""
        return (self.index, self.values)

    def to(
        self,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        index_dtype: torch.dtype | None = None,
    ) -> Sparse:
        """This update on ``device`` / with values in ``dtype`` (indices in ``index_dtype``, int32 or int64, else
        as they are); itself when nothing changes. The positions were checked when it was built and moving them
        keeps them valid, so the copy skips the O(K) checks (attaching an adapter moves every layer's update)."""
        if index_dtype not in (None, torch.int32, torch.int64):
            raise ShapeMismatchError(f"sparse indices are int32 or int64, not {index_dtype}")
        index = self.index.to(device=device, dtype=index_dtype)
        values = self.values.to(device=device, dtype=dtype)
        if index is self.index and values is self.values:
            return self
        moved = object.__new__(Sparse)
        for name, value in (("index", index), ("values", values), ("shape", self.shape)):
            object.__setattr__(moved, name, value)
        return moved


@dataclass(frozen=True, eq=False)
class Dense:
    """A full update ΔW = scale · weight, for kinds with no cheaper exact form (e.g. LoKr).

    ``bias`` is an optional bias update Δb = scale · bias (LyCORIS full/diff's ``diff_b``), one value per output.
    """

    weight: torch.Tensor
    scale: float = 1.0
    bias: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if self.bias is not None and self.bias.numel() != self.weight.shape[0]:
            raise ShapeMismatchError(
                f"bias update of {self.bias.numel()} values for a weight with {self.weight.shape[0]} outputs"
            )

    @property
    def shape(self) -> tuple[int, ...]:
        """Shape of the weight this update applies to."""
        return tuple(int(s) for s in self.weight.shape)

    def delta(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Dense ΔW with the scale folded in."""
        out_dtype = dtype or self.weight.dtype
        if self.scale == 1.0:
            return self.weight.to(out_dtype)
        return (self.weight.float() * self.scale).to(out_dtype)

    def bias_delta(self, dtype: torch.dtype | None = None) -> torch.Tensor | None:
        """Δb with the scale folded in (1-D), or None when the update leaves the bias alone."""
        if self.bias is None:
            return None
        out_dtype = dtype or self.bias.dtype
        return (self.bias.float().reshape(-1) * self.scale).to(out_dtype)

    def tensors(self) -> tuple[torch.Tensor, ...]:
        """The tensors this update owns."""
        return (self.weight,) if self.bias is None else (self.weight, self.bias)

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> Dense:
        """A copy on ``device`` / in ``dtype``."""
        bias = None if self.bias is None else self.bias.to(device=device, dtype=dtype)
        return replace(self, weight=self.weight.to(device=device, dtype=dtype), bias=bias)


class Relative(ABC):
    """An update defined as a function of the base weight it adapts; :meth:`resolve` gives the dense ΔW (the kinds
    are in :mod:`fusion.relative`)."""

    shape: tuple[int, ...]

    @abstractmethod
    def apply(self, weight: torch.Tensor) -> torch.Tensor:
        """f(W): the adapted weight, computed in fp32 from the base weight ``weight``."""

    @abstractmethod
    def tensors(self) -> tuple[torch.Tensor, ...]:
        """The tensors this update owns."""

    @abstractmethod
    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> Relative:
        """A copy on ``device`` / in ``dtype``."""

    def resolve(self, weight: torch.Tensor) -> Dense:
        """ΔW = f(W) − W against the (pristine) base weight, as a :class:`Dense` in fp32."""
        if tuple(weight.shape) != tuple(self.shape):
            raise ShapeMismatchError(
                f"{type(self).__name__} update of shape {self.shape} given a weight {weight.shape}"
            )
        base = weight.detach().float()
        return Dense(weight=self.apply(base) - base)

    def delta(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Not defined without the base weight: always raises :class:`CompositionError` saying what to do."""
        raise CompositionError(
            f"a {type(self).__name__} update is a function of the base weight and has no ΔW of its own",
            hint="attach the adapter to a model (the engine resolves it), or call resolve(base_weight)",
        )


AdapterKind = Union[LowRank, Sparse, Dense, Relative]


@dataclass(eq=False)
class Adapter:
    """One adapter, whatever file it came from: per-module updates for the denoiser and the text encoders.

    ``family`` is one of :data:`FAMILIES` (or ``"unknown"``). ``task_prompt`` is set for restoration/editing
    adapters (Edit2Restore), which also set ``needs_input_image``. ``meta`` holds everything else read from
    the file (title, trigger words, preferred weight, category, source format, ...).
    """

    name: str
    family: str
    layers: dict[str, AdapterKind]
    text_encoder_layers: dict[str, AdapterKind] = field(default_factory=dict)
    task_prompt: str | None = None
    needs_input_image: bool = False
    meta: dict[str, Any] = field(default_factory=dict)
    source: str | None = None

    def __post_init__(self) -> None:
        for key in self.text_encoder_layers:
            if not key.startswith(TEXT_ENCODER_PREFIXES):
                raise ShapeMismatchError(
                    f"text-encoder layer key {key!r} must start with one of {TEXT_ENCODER_PREFIXES}",
                    path=self.source,
                )

    def all_layers(self) -> Iterator[tuple[str, AdapterKind]]:
        """Denoiser layers, then text-encoder layers, as (key, update) pairs."""
        yield from self.layers.items()
        yield from self.text_encoder_layers.items()

    def tensors(self) -> Iterator[torch.Tensor]:
        """Every tensor the adapter owns."""
        for _, kind in self.all_layers():
            yield from kind.tensors()

    @property
    def nbytes(self) -> int:
        """Bytes held by the adapter's tensors (what a host-memory cache budgets)."""
        return sum(t.numel() * t.element_size() for t in self.tensors())

    @property
    def num_params(self) -> int:
        """Number of stored scalars (indices excluded)."""
        total = 0
        for _, kind in self.all_layers():
            total += kind.values.numel() if isinstance(kind, Sparse) else sum(t.numel() for t in kind.tensors())
        return total

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> Adapter:
        """A copy with every update on ``device`` / in ``dtype``."""
        return replace(
            self,
            layers={k: v.to(device, dtype) for k, v in self.layers.items()},
            text_encoder_layers={k: v.to(device, dtype) for k, v in self.text_encoder_layers.items()},
            meta=dict(self.meta),
        )


@dataclass(frozen=True, eq=False)
class Spectrum:
    """Exact thin SVD of a low-rank update: ΔW = U · diag(S) · Vh (U: out×r, S: r, Vh: r×in_flat)."""

    U: torch.Tensor
    S: torch.Tensor
    Vh: torch.Tensor


def qr_core_svd(update: LowRank) -> Spectrum:
    """Exact singular values/vectors of ΔW via QR of both factors and an SVD of the r×r core (LoRA-Squeeze)."""
    up = update.up.flatten(1).double()
    down = update.down.flatten(1).double()
    q_up, r_up = torch.linalg.qr(up)
    q_down, r_down = torch.linalg.qr(down.T)
    core = (r_up @ r_down.T) * update.scale
    u_core, singular, vh_core = torch.linalg.svd(core, full_matrices=False)
    return Spectrum(U=q_up @ u_core, S=singular, Vh=vh_core @ q_down.T)


def concat_low_rank(weighted: Iterable[tuple[LowRank, float]]) -> LowRank:
    """One LowRank whose delta is exactly Σ wᵢ·ΔWᵢ: factors concatenated along rank, scales folded into ``up``."""
    items = list(weighted)
    if not items:
        raise ValueError("concat_low_rank needs at least one update")
    shapes = {u.shape for u, _ in items}
    if len(shapes) != 1:
        raise ShapeMismatchError(f"cannot concatenate updates of different shapes: {sorted(shapes)}")
    up = torch.cat([u.up.float() * (w * u.scale) for u, w in items], dim=1).to(items[0][0].up.dtype)
    down = torch.cat([u.down for u, _ in items], dim=0)
    return LowRank(down=down, up=up, alpha=float(down.shape[0]))


def to_sparse(update: LowRank | Dense | Sparse, density: float) -> tuple[Sparse, float]:
    """Keep the top-K |ΔW| entries (K = ceil(density · numel)); return the sparse update and retained energy.

    Retained energy is ‖ΔW_kept‖² / ‖ΔW‖² (1.0 for an all-zero ΔW).
    """
    if not 0.0 < density <= 1.0:
        raise ValueError(f"density must be in (0, 1], got {density}")
    delta = update.delta(torch.float32).reshape(-1)
    keep = min(delta.numel(), max(1, math.ceil(density * delta.numel())))
    top = torch.topk(delta.abs(), keep, sorted=False).indices
    index, _ = torch.sort(top)
    values = delta[index]
    total = float((delta.double() ** 2).sum())
    retained = 1.0 if total == 0.0 else float((values.double() ** 2).sum()) / total
    dtype = update.values.dtype if isinstance(update, Sparse) else update.delta().dtype
    return Sparse(index=index, values=values.to(dtype), shape=update.shape), retained


def validate_shapes(adapter: Adapter, expected: Mapping[str, tuple[int, ...]]) -> None:
    """Raise :class:`ShapeMismatchError` unless every layer of ``adapter`` targets a known key of that shape.

    ``expected`` maps layer keys (denoiser paths and ``text_encoder*.`` paths) to weight shapes.
    """
    for key, kind in adapter.all_layers():
        if key not in expected:
            raise ShapeMismatchError(
                f"adapter {adapter.name!r} targets {key!r}, which this model does not have",
                path=adapter.source,
                hint="check the adapter's base family matches the pipeline",
            )
        if tuple(kind.shape) != tuple(expected[key]):
            flattened = len(expected[key]) == 4 and math.prod(kind.shape) == math.prod(expected[key])
            raise ShapeMismatchError(
                f"adapter {adapter.name!r} layer {key!r} has shape {tuple(kind.shape)}, "
                f"the model's weight is {tuple(expected[key])}",
                path=adapter.source,
                hint="this conv update is stored flattened: read the file with the model's shapes "
                "(read_adapter(..., shapes=pipe.model_shapes()))"
                if flattened
                else "the adapter was made for a base model with other layer sizes",
            )
