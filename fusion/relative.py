"""Updates defined relative to the base weight: IA3, (B)OFT, DoRA and GLoRA's weight-product term.

These adapter kinds do not store an additive ΔW: they store a function W ↦ f(W) of the weight they adapt
(a per-channel scale, a block rotation, a re-normalisation, a product with W). LoRA Composer composes everything
additively, so each is turned into a dense update **relative to the pristine base weight at attach time**:

    ΔW = f(W₀) − W₀

(:meth:`fusion.adapters.Relative.resolve`, called before anything is touched when the engine attaches the adapter).
With that definition a single adapter at weight 1 reproduces its producer exactly, and every composition method
(merge, switch, composite, CMLoRA, gated; fused or unfused) treats it like any other ΔW: the adapter weight w scales
ΔW linearly.

Consequences worth knowing:

- **Stacking is not sequential application.** Two relative adapters compose as W₀ + ΔW₁ + ΔW₂, whereas applying
  them one after another in their producer gives f₂(f₁(W₀)). The difference is second order in the updates
  (e.g. for two IA3 scales it is W₀·s₁·s₂); ``tests/weights_index/test_lycoris_producers.py`` measures it.
- **Weights other than 1 are linear in ΔW.** That matches LyCORIS's multiplier for IA3 and diag-OFT without
  rescale; for BOFT (multiplier applied per butterfly stage) and DoRA (re-normalised after scaling) LyCORIS's
  multiplier is non-linear and differs from w·ΔW for w ∉ {0, 1}.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from fusion.adapters import Dense, LowRank, Relative
from fusion.errors import ShapeMismatchError


def _channel_view(vector: torch.Tensor, shape: tuple[int, ...], axis: int) -> torch.Tensor:
    """``vector`` shaped to broadcast along ``axis`` of a weight of ``shape``."""
    view = [1] * len(shape)
    view[axis] = shape[axis]
    return vector.float().reshape(view)


@dataclass(frozen=True, eq=False)
class ChannelScale(Relative):
    """IA3: f(W) = W ⊙ (1 + v), v scaling output channels (rows) or, with ``on_input``, input channels."""

    vector: torch.Tensor
    shape: tuple[int, ...]
    on_input: bool = False

    def __post_init__(self) -> None:
        axis = 1 if self.on_input else 0
        if self.vector.numel() != self.shape[axis]:
            side = "input" if self.on_input else "output"
            raise ShapeMismatchError(f"IA3 vector of {self.vector.numel()} for {self.shape[axis]} {side} channels")

    def apply(self, weight: torch.Tensor) -> torch.Tensor:
        """W ⊙ (1 + v) along the scaled axis."""
        return weight * (1.0 + _channel_view(self.vector, self.shape, 1 if self.on_input else 0))

    def tensors(self) -> tuple[torch.Tensor, ...]:
        """The scale vector."""
        return (self.vector,)

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> ChannelScale:
        """A copy on ``device`` / in ``dtype``."""
        return replace(self, vector=self.vector.to(device=device, dtype=dtype))


def cayley(blocks: torch.Tensor, constraint: float) -> torch.Tensor:
    """Orthogonal blocks R = (I + Q)(I − Q)⁻¹ from Q = B − Bᵀ (B: (…, b, b)).

    With ``constraint`` > 0, Q is first scaled down to Frobenius norm ``constraint`` when (‖Q‖ + 1e-8) exceeds it
    (LyCORIS's COFT constraint: alpha · out_features).
    """
    q = blocks.float() - blocks.float().transpose(-1, -2)
    if constraint > 0:
        norm = float(torch.linalg.norm(q)) + 1e-8
        if norm > constraint:
            q = q * (constraint / norm)
    eye = torch.eye(q.shape[-1], dtype=q.dtype, device=q.device)
    return (eye + q) @ torch.linalg.inv(eye - q)


@dataclass(frozen=True, eq=False)
class Orthogonal(Relative):
    """OFT / BOFT: f(W) = R·W (then ``rescale`` per output channel), R orthogonal and block-structured.

    ``blocks`` (n, b, b) is diag-OFT: output rows are cut into n consecutive groups of b and group k becomes
    R_kᵀ·W_k (LyCORIS's contraction over the block's first index). ``blocks`` (m, n, b, b) is BOFT: m butterfly
    stages; stage i pairs rows 2^i·b/2 apart (rows viewed as (·, 2, k) and swapped to (·, k, 2), k = 2^i·b/2), applies
    R_(i,j)·W to each consecutive group of b rows, and undoes the pairing. ``constraint`` is alpha · out_features.
    """

    blocks: torch.Tensor
    shape: tuple[int, ...]
    constraint: float = 0.0
    rescale: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if self.blocks.dim() not in (3, 4) or self.blocks.shape[-1] != self.blocks.shape[-2]:
            raise ShapeMismatchError(f"OFT blocks must be (n, b, b) or (m, n, b, b), got {tuple(self.blocks.shape)}")
        n, b = int(self.blocks.shape[-3]), int(self.blocks.shape[-1])
        if n * b != self.shape[0]:
            raise ShapeMismatchError(f"OFT blocks {tuple(self.blocks.shape)} do not cover {self.shape[0]} output rows")

    @property
    def butterfly(self) -> bool:
        """True for BOFT's staged butterfly blocks."""
        return self.blocks.dim() == 4

    def apply(self, weight: torch.Tensor) -> torch.Tensor:
        """R·W (diag or butterfly), times ``rescale`` if present."""
        rotations = cayley(self.blocks, self.constraint)
        out, rest = weight.shape[0], weight.shape[1:]
        b = rotations.shape[-1]
        if not self.butterfly:
            grouped = weight.reshape(-1, b, *rest)
            result = torch.einsum("knm,kn...->km...", rotations, grouped).reshape(weight.shape)
        else:
            result = weight
            for stage, stage_rotations in enumerate(rotations):
                k = (2**stage) * (b // 2)
                paired = result.reshape(-1, 2, k, *rest).transpose(1, 2).reshape(-1, b, *rest)
                mixed = torch.einsum("gij,gj...->gi...", stage_rotations, paired)
                result = mixed.reshape(-1, k, 2, *rest).transpose(1, 2).reshape(out, *rest)
        if self.rescale is not None:
            result = result * self.rescale.float().reshape(out, *([1] * len(rest)))
        return result

    def tensors(self) -> tuple[torch.Tensor, ...]:
        """The blocks (and rescale)."""
        return (self.blocks,) if self.rescale is None else (self.blocks, self.rescale)

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> Orthogonal:
        """A copy on ``device`` / in ``dtype``."""
        rescale = None if self.rescale is None else self.rescale.to(device=device, dtype=dtype)
        return replace(self, blocks=self.blocks.to(device=device, dtype=dtype), rescale=rescale)


@dataclass(frozen=True, eq=False)
class WeightDecomposed(Relative):
    """DoRA: f(W) = m ⊙ (W + ΔW) / (‖W + ΔW‖ + eps), the norm per output row (``on_output``) or per input column.

    ``update`` is the directional ΔW (LoRA, LoHa or LoKr, scale folded in); ``magnitude`` is m, shaped (out, 1, …)
    or (1, in, …) as stored. LyCORIS adds eps = fp32 machine epsilon to the norm; PEFT adds nothing.
    """

    update: LowRank | Dense
    magnitude: torch.Tensor
    on_output: bool = True
    eps: float = 0.0

    def __post_init__(self) -> None:
        axis = 0 if self.on_output else 1
        if self.magnitude.numel() != self.shape[axis]:
            raise ShapeMismatchError(
                f"DoRA magnitude of {self.magnitude.numel()} values for a weight of shape {self.shape}"
            )

    @property
    def shape(self) -> tuple[int, ...]:  # type: ignore[override]
        """Shape of the adapted weight (the directional update's)."""
        return tuple(self.update.shape)

    def apply(self, weight: torch.Tensor) -> torch.Tensor:
        """Re-normalise W + ΔW to the stored magnitudes."""
        merged = weight + self.update.delta(torch.float32).reshape(weight.shape)
        if self.on_output:
            norm = merged.reshape(merged.shape[0], -1).norm(dim=1)
            axis = 0
        else:
            norm = merged.transpose(0, 1).reshape(merged.shape[1], -1).norm(dim=1)
            axis = 1
        scale = self.magnitude.float().reshape(-1) / (norm + self.eps)
        return merged * _channel_view(scale, tuple(merged.shape), axis)

    def tensors(self) -> tuple[torch.Tensor, ...]:
        """The directional factors and the magnitudes."""
        return (*self.update.tensors(), self.magnitude)

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> WeightDecomposed:
        """A copy on ``device`` / in ``dtype``."""
        return replace(self, update=self.update.to(device, dtype), magnitude=self.magnitude.to(device, dtype))


@dataclass(frozen=True, eq=False)
class WeightProduct(Relative):
    """GLoRA: f(W) = W + scale · (W ×_in (a1 @ a2) + b1 @ b2), the product acting on W's input axis.

    ``a1`` (in, r) and ``a2`` (r, in) are stored as LyCORIS's Linear weights; the ``b`` term is an ordinary
    :class:`LowRank` (its own alpha folded in as ``scale``).
    """

    a1: torch.Tensor
    a2: torch.Tensor
    additive: LowRank
    scale: float

    def __post_init__(self) -> None:
        inp = self.shape[1]
        if tuple(self.a1.flatten(1).shape) != (inp, self.a2.shape[0]) or self.a2.flatten(1).shape[1] != inp:
            raise ShapeMismatchError(
                f"GLoRA a-factors {tuple(self.a1.shape)}·{tuple(self.a2.shape)} do not act on {inp} input channels"
            )

    @property
    def shape(self) -> tuple[int, ...]:  # type: ignore[override]
        """Shape of the adapted weight."""
        return tuple(self.additive.shape)

    def apply(self, weight: torch.Tensor) -> torch.Tensor:
        """W + scale · (W·A + B) with A = a1 @ a2 applied on the input-channel axis."""
        mix = self.a1.flatten(1).float() @ self.a2.flatten(1).float()
        product = torch.einsum("oi...,ij->oj...", weight, mix)
        return weight + self.scale * (product + self.additive.delta(torch.float32).reshape(weight.shape))

    def tensors(self) -> tuple[torch.Tensor, ...]:
        """The a-factors and the b-factors."""
        return (self.a1, self.a2, *self.additive.tensors())

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> WeightProduct:
        """A copy on ``device`` / in ``dtype``."""
        return replace(
            self,
            a1=self.a1.to(device=device, dtype=dtype),
            a2=self.a2.to(device=device, dtype=dtype),
            additive=self.additive.to(device, dtype),
        )
