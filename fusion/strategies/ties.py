"""TIES merging (Yadav et al., NeurIPS 2023, "TIES-Merging: Resolving Interference When Merging Models";
docs/methods.md#ties): trim, elect sign, disjoint mean — applied to the adapters' updates ΔWᵢ, layer by layer.

For every composed layer, with ΔWᵢ each adapter's own update there (formed as Merge forms it, see
:mod:`fusion.strategies.layer_updates`) and wᵢ its composition weight in the layer's group:

1. Trim: τ̂ᵢ keeps the ⌊p·n⌋ entries of ΔWᵢ with the largest magnitude (n = entries of the weight; ``density``
   p = 0.2, the paper's top 20%) and zeroes the rest.
2. Elect: γ = sgn(Σᵢ τ̂ᵢ), per entry (the paper's "total" sign: the sign of the summed trimmed values).
3. Disjoint mean: with Aₑ = {i : τ̂ᵢ,ₑ ≠ 0 and sgn(τ̂ᵢ,ₑ) = γₑ}, the merged update is
   τₘ,ₑ = (1/|Aₑ|) Σ_{i∈Aₑ} wᵢ·τ̂ᵢ,ₑ (0 where Aₑ is empty).

W' = W + τₘ. With every weight equal to w this is the paper's θ = θ₀ + λ·τₘ with λ = w; unequal weights scale each
adapter's agreeing entries before the mean (as PEFT's ``ties`` combination does). Adapters whose weight is 0 in a
layer's group take no part in that layer. Trimming is per layer (each ΔWᵢ of one weight matrix), not over the whole
model as the paper's flattened task vector.

The merge is static: it is computed once when the composition is set (every layer's k updates formed densely, one
top-k per adapter and layer) and fused into the base weights, so a denoising step costs what the base model costs.
Refused with :class:`fusion.errors.CompositionError`: ``fuse=False`` (the merged update is not a weighted sum of the
adapters' factors, so it can only be written into the weights; the conditional-branch mode needs that), weights
that change over steps (keyframes, callables), and adapters that update biases (dense LyCORIS ``diff_b``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from fusion.errors import CompositionError
from fusion.schedules import parse_spec
from fusion.strategies import register
from fusion.strategies.base import Engine, StepContext, Strategy, check_composition, require_fused
from fusion.strategies.layer_updates import adapter_deltas, enter_fused, fuse_layer_delta, updates_bias

DENSITY = 0.2
"""The paper's default: keep the top 20% of each update's entries by magnitude."""


def trim(delta: torch.Tensor, density: float) -> torch.Tensor:
    """``delta`` with all but its ⌊density·n⌋ largest-magnitude entries set to 0."""
    flat = delta.reshape(-1)
    keep = int(density * flat.numel())
    kept = torch.zeros_like(flat)
    if keep > 0:
        index = flat.abs().topk(keep).indices
        kept[index] = flat[index]
    return kept.reshape(delta.shape)


def ties_merge(deltas: Sequence[torch.Tensor], weights: Sequence[float], density: float = DENSITY) -> torch.Tensor:
    """TIES of one layer's updates: trim each to ``density``, elect the sign of the summed trimmed values, and
    average wᵢ·τ̂ᵢ over the entries that carry the elected sign."""
    trimmed = torch.stack([trim(delta, density) for delta in deltas])
    elected = trimmed.sum(0).sign()
    agree = (trimmed.sign() == elected) & (trimmed != 0)
    scale = torch.tensor(list(weights), dtype=trimmed.dtype, device=trimmed.device)
    total = (trimmed * scale.view(-1, *([1] * (trimmed.dim() - 1))) * agree).sum(0)
    return total / agree.sum(0).clamp(min=1)


@register("ties")
class Ties(Strategy):
    """TIES merging of the adapters' updates. Option: ``density`` (fraction of each update kept, default 0.2)."""

    fused_only = True

    def __init__(
        self,
        weights: Mapping[str, Any],
        *,
        fuse: bool | None = None,
        density: float = DENSITY,
        **options: Any,
    ) -> None:
        check_composition("ties", weights, options, "density")
        require_fused("ties", fuse, "the merged update is not a weighted sum of the adapters' factors")
        if isinstance(density, bool) or not isinstance(density, (int, float)) or not 0.0 < float(density) <= 1.0:
            raise CompositionError(f"ties density must be a fraction in (0, 1], got {density!r}")
        for name, spec in weights.items():
            try:
                scheduled = parse_spec(spec).steps is not None
            except CompositionError as error:
                raise CompositionError(f"adapter {name!r}: {error.reason}", hint=error.hint) from error
            if scheduled:
                raise CompositionError(
                    f"ties merges once, but adapter {name!r} has a weight that changes over steps",
                    hint="give constant (or block) weights, or use method='merge' for scheduled weights",
                )
        super().__init__(weights, fuse=True)
        self.density = float(density)

    def activate(self, engine: Engine) -> None:
        """Merge every composed layer's updates and fuse the result into its weight."""
        names = list(self.weights)
        table = engine.weight_table(self.weights, 1)[:, :, 0].cpu()  # (A, G)
        rows = {name: engine.adapter_names.index(name) for name in names}
        for key, layer in engine.layers.items():
            refused = [name for name in names if name in layer.names and updates_bias(layer, name)]
            if refused:
                raise CompositionError(
                    f"ties merges weight updates, but {refused} also update the bias of {key!r}",
                    hint="use method='merge' for adapters with bias updates",
                )
        enter_fused(engine)
        for layer in engine.layers.values():
            weights = {name: float(table[rows[name], layer.group]) for name in names}
            deltas = adapter_deltas(engine, layer, [name for name in names if weights[name] != 0.0])
            if deltas:
                merged = ties_merge(list(deltas.values()), [weights[name] for name in deltas], self.density)
                fuse_layer_delta(layer, merged)
            else:
                layer.fuse(torch.zeros(len(engine.adapter_names), device=engine.state.device))

    def step(self, ctx: StepContext) -> Any:
        """The merged weights are in place: run the denoiser once."""
        return ctx.run()
