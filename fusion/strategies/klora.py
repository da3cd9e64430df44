"""K-LoRA (Ouyang, Li & Hou, CVPR 2025, "K-LoRA: Unlocking Training-Free Fusion of Any Subject and Style LoRAs";
docs/methods.md#k-lora): per layer and step, keep ONE adapter's update — the one whose top-K elements weigh most.

The paper, for a content (subject) LoRA c and a style LoRA s, in every layer ℓ at step t of T:

    S_c = Σ_{i ∈ Top-K(|ΔW_c|)} |ΔW_c|ᵢ,    S_s = Σ_{j ∈ Top-K(|ΔW_s|)} |ΔW_s|ⱼ,
    scale(t) = α·t/T + β,
    ΔW(ℓ, t) = ΔW_c  if  (S_c / γ) > S_s·scale(t)  else  ΔW_s,

with γ the mean over layers of Σ|ΔW_c| / Σ|ΔW_s| (balancing the two LoRAs' overall magnitude), K = 64, α = 1.5 and
β = 0.5 (the constants of the authors' published code, ``klora.py``). scale grows from 0.5 to 2 over the run, so
the content LoRA tends to win early steps and the style LoRA late ones.

Generalised to k adapters (k = 2 with one content and one style adapter is exactly the above):

    score_a(ℓ, t) = S_a(ℓ) / γ_a · (scale(t) if a is a style adapter else 1),    chosen(ℓ, t) = argmax_a score_a,

where γ_a = mean over the layers both update of Σ|ΔW_a| / Σ|ΔW_r| against one reference adapter r — the first style
adapter of the composition, or its first adapter when none is a style (γ_r = 1; γ_a = 1 when a and r share no
layer). Style adapters are those named in ``styles``, else those whose ``meta["category"]`` is ``style``. Only
adapters that update ℓ with a non-zero weight at t compete; ties go to the earlier adapter. t/T is the 0-based step
over the step count (0 at the first step).

ΔW_a is the adapter's own update at weight 1, formed as Merge forms it (:mod:`fusion.strategies.layer_updates`); the
chosen adapter then enters the layer at its composition weight (a number, block weights or keyframes). Layers of the
text encoders, which run before the first step, keep the choice of t = 0.

Engine fit: the choice is per layer, finer than the engine's per-group weights, so K-LoRA runs fused — each step
re-fuses only the layers whose choice (or the chosen adapter's weight) changed since the previous step. Scores are
computed once when the composition is set. ``fuse=False`` is refused (:class:`fusion.errors.CompositionError`), and
with it the conditional-branch mode.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from fusion.errors import CompositionError
from fusion.layers import ComposedLayer
from fusion.strategies import register
from fusion.strategies.base import Engine, StepContext, Strategy, check_composition, require_fused
from fusion.strategies.layer_updates import adapter_deltas, enter_fused, is_text_encoder_layer, one_hot

TOP_K = 64
ALPHA = 1.5
BETA = 0.5
NOTHING_INSTALLED = -2
"""The installed choice of a layer nothing has been fused into yet (−1 is a layer no adapter updates at a step)."""


def top_k_sum(delta: torch.Tensor, k: int) -> float:
    """Σ of the ``k`` largest |entries| of ``delta`` (all of them when it has fewer)."""
    flat = delta.reshape(-1).abs()
    return float(flat.topk(min(k, flat.numel())).values.sum())


def style_scale(step: int, num_steps: int, alpha: float = ALPHA, beta: float = BETA) -> float:
    """The paper's step-dependent factor on style scores: α·t/T + β."""
    return alpha * step / num_steps + beta


def magnitude_ratios(
    totals: Mapping[str, Mapping[str, float]], names: Sequence[str], reference: str
) -> dict[str, float]:
    """γ per adapter: the mean, over layers where it and ``reference`` both have an update, of its Σ|ΔW| over the
    reference's (``totals``: layer → adapter → Σ|ΔW|); 1 for the reference and where no layer is shared."""
    ratios: dict[str, float] = {}
    for name in names:
        shares = [row[name] / row[reference] for row in totals.values() if name in row and row.get(reference, 0.0)]
        ratios[name] = 1.0 if name == reference or not shares else sum(shares) / len(shares)
    return ratios


@register("klora")
class KLoRA(Strategy):
    """K-LoRA. Options: ``top_k`` (K, default 64), ``alpha`` / ``beta`` (the style factor α·t/T + β, 1.5 / 0.5),
    ``styles`` (names of the style adapters; default: those with category ``style``)."""

    fused_only = True

    def __init__(
        self,
        weights: Mapping[str, Any],
        *,
        fuse: bool | None = None,
        top_k: int = TOP_K,
        alpha: float = ALPHA,
        beta: float = BETA,
        styles: Sequence[str] | None = None,
        **options: Any,
    ) -> None:
        check_composition("klora", weights, options, "top_k, alpha, beta, styles")
        require_fused("klora", fuse, "it keeps one adapter per layer, finer than the engine's per-group weights")
        if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
            raise CompositionError(f"klora top_k must be a whole number ≥ 1, got {top_k!r}")
        for label, value in (("alpha", alpha), ("beta", beta)):
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise CompositionError(f"klora {label} must be a number, got {value!r}")
        if beta <= 0 or alpha + beta <= 0:
            raise CompositionError(
                f"klora's style factor α·t/T + β must stay positive over the run, got alpha={alpha!r}, beta={beta!r}"
            )
        if styles is not None:
            if isinstance(styles, str):
                styles = [styles]
            unknown = sorted(set(styles) - set(weights))
            if unknown:
                raise CompositionError(f"klora styles names adapters outside the composition: {unknown}")
        super().__init__(weights, fuse=True)
        self.top_k = top_k
        self.alpha = float(alpha)
        self.beta = float(beta)
        self.styles_option = None if styles is None else list(styles)
        self.names = list(weights)
        self.styles: list[str] = []
        self.gamma: dict[str, float] = {}
        self._layers: list[tuple[str, ComposedLayer]] = []
        self._scores = torch.zeros(0, len(self.names))
        self._chosen = torch.zeros(0, 0, dtype=torch.long)
        self._weights = torch.zeros(0, 0)
        self._installed_choice = torch.zeros(0, dtype=torch.long)
        self._installed_weight = torch.zeros(0)
        self._installed_step = -1

    @property
    def needs_steps(self) -> bool:
        """With several adapters the choice can change from step to step (the style factor grows)."""
        return len(self.weights) > 1 or super().needs_steps

    def activate(self, engine: Engine) -> None:
        """Score every layer's adapters once, then fuse the choice of step 0."""
        if self.styles_option is not None:
            self.styles = list(self.styles_option)
        else:
            self.styles = [n for n in self.names if str(engine.adapters[n].meta.get("category", "")).lower() == "style"]
        reference = self.styles[0] if self.styles else self.names[0]
        self._layers = list(engine.layers.items())
        peaks: dict[str, dict[str, float]] = {}
        totals: dict[str, dict[str, float]] = {}
        for key, layer in self._layers:
            deltas = adapter_deltas(engine, layer, self.names)
            peaks[key] = {name: top_k_sum(delta, self.top_k) for name, delta in deltas.items()}
            totals[key] = {name: float(delta.abs().sum()) for name, delta in deltas.items()}
        self.gamma = magnitude_ratios(totals, self.names, reference)
        scores = torch.full((len(self._layers), len(self.names)), float("-inf"), dtype=torch.float64)
        for row, (key, _) in enumerate(self._layers):
            for column, name in enumerate(self.names):
                if name in peaks[key]:
                    gamma = self.gamma[name]
                    scores[row, column] = peaks[key][name] / gamma if gamma > 0 else 0.0
        self._scores = scores
        self._installed_choice = torch.full((len(self._layers),), NOTHING_INSTALLED, dtype=torch.long)
        self._installed_weight = torch.zeros(len(self._layers))
        enter_fused(engine)
        self._plan(engine, 1)
        self._install(engine, 0)

    def start_generation(self, engine: Engine, num_steps: int) -> None:
        """The choice of every layer at every step of this generation."""
        self._plan(engine, num_steps)
        self._installed_step = -1

    def _choices(self, num_steps: int, table: torch.Tensor, groups: Sequence[int], rows: Sequence[int]) -> torch.Tensor:
        """(S, L) index into the composition's adapters of the adapter each layer keeps at each step (−1: none);
        ``table`` is the (A, G, S) weight table, ``groups`` each layer's group, ``rows`` each adapter's engine row."""
        style = torch.tensor([name in self.styles for name in self.names])
        steps = torch.arange(num_steps, dtype=torch.float64)
        factor = torch.where(style[None, :], (self.alpha * steps / num_steps + self.beta)[:, None], 1.0)  # (S, k)
        weights = table.cpu()[list(rows)][:, list(groups), :].permute(2, 1, 0).double()  # (S, L, k)
        scores = self._scores[None] * factor[:, None, :]  # (S, L, k)
        scores = torch.where(weights != 0, scores, torch.full_like(scores, float("-inf")))
        best = scores.argmax(dim=2)
        return torch.where(torch.isinf(scores.amax(dim=2)), torch.full_like(best, -1), best)

    def _plan(self, engine: Engine, num_steps: int) -> None:
        """Each layer's choice and the weight it enters with, at every step of a run of ``num_steps``."""
        table = engine.weight_table(self.weights, num_steps).cpu()
        rows = torch.tensor([engine.adapter_names.index(name) for name in self.names])
        groups = torch.tensor([layer.group for _, layer in self._layers], dtype=torch.long)
        chosen = self._choices(num_steps, table, groups.tolist(), rows.tolist())
        text = torch.tensor([is_text_encoder_layer(key) for key, _ in self._layers], dtype=torch.bool)
        chosen[:, text] = chosen[0, text]
        steps = torch.arange(num_steps)[:, None].expand_as(chosen)
        columns = torch.where(text[None, :], torch.zeros_like(steps), steps)
        weights = table[rows[chosen.clamp(min=0)], groups[None, :].expand_as(chosen), columns]
        self._chosen = chosen
        self._weights = torch.where(chosen < 0, torch.zeros_like(weights), weights)

    def _install(self, engine: Engine, step: int) -> None:
        """Fuse the adapter each layer keeps at ``step``, only in the layers where it (or its weight) differs from
        what is in place."""
        step = min(step, self._chosen.shape[0] - 1)
        choices, weights = self._chosen[step], self._weights[step]
        changed = (choices != self._installed_choice) | (weights != self._installed_weight)
        for index in changed.nonzero().flatten().tolist():
            layer, choice = self._layers[index][1], int(choices[index])
            if choice < 0:
                layer.fuse(torch.zeros(len(engine.adapter_names), device=engine.state.device))
            else:
                layer.fuse(one_hot(engine, self.names[choice], float(weights[index])))
        self._installed_choice = choices.clone()
        self._installed_weight = weights.clone()

    def step(self, ctx: StepContext) -> Any:
        """Fuse this step's per-layer choice (only the layers that changed) and run the denoiser once."""
        if ctx.step != self._installed_step:
            self._install(ctx.engine, ctx.step)
            self._installed_step = ctx.step
        return ctx.run()

    def deactivate(self, engine: Engine) -> None:
        """Forget the scores and choices; the engine restores pristine weights."""
        super().deactivate(engine)
        self._layers = []
        self._installed_choice = torch.zeros(0, dtype=torch.long)
        self._installed_weight = torch.zeros(0)
