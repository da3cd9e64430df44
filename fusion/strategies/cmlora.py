"""CMLoRA — Cached Multi-LoRA (Zou et al., ICLR 2025; docs/methods.md#cmlora).

Every step every adapter contributes, Composite-style, one of them — the dominant adapter — weighted up; with caching
on (an option) only the dominant adapter gets a full denoiser pass and the others reuse a cache. The combined
prediction (CFG applied once by the pipeline, CFG being linear) is

    ẽ = w_dom · e_dom + w_other · Σ_{i ≠ dom} ẽ_i,   w_dom = (N − 0.5)/(2N − 1.5),   w_other = 1/(2N − 1.5)

(the paper's coeff = N − 0.5, w_nd = N/(coeff + N − 1), w_dom = coeff·w_nd, averaged over N: N = 3 → 0.556 / 0.222).
Each adapter's pass uses only that adapter at its own weight spec (number, block weights, keyframes), as in
Composite.

Order. Adapters are split into a high-frequency set H and a low-frequency set L by their ΔH
(:mod:`fusion.frequency`; option ``delta_h``, else ``Adapter.meta["delta_h"]`` or ``meta["scores"]["delta_h"]``):
ΔH > ``split`` (default 0) → H. Adapters without a score fall back to their category (option ``categories``, else
``meta["category"]``): background → L, anything else → H. Within a set, scored adapters come first by decreasing
ΔH, then the others in the composition's order (the published code's category check is a membership test, not a
ranking).

Stages. Stage 1 is steps t < ``fraction``·T (``stage="fraction"``, default 0.55: the published code's boundary,
step 120 of its 220). ``stage="online"``: stage 2 starts at the first step whose latent's own high-frequency score
is below ``g_f`` (0.68); when the latent is too small for the radius cut (or its spectrum cannot be normalised) the
score is not used and the fraction rule decides that step. Which adapters stage 2 draws the dominant one from
(``second_stage``):

- ``"reference"`` (default, the published code): one counter c counts the refresh steps; in stage 1 the dominant
  adapter is H[(c − 1) mod |H|], in stage 2 it is W[(c − 1) mod |H|] over the window W = (H + L)[1 : |H| + 1] (H
  without its first adapter, then L's first), the counter carrying on — so the dominant adapter can change at the
  boundary step itself;
- ``"paper"``: stage 2 draws from L with its own round robin, and the boundary step is a refresh step when L differs
  from H.

A stage whose set is empty uses the other set (no window then).

Refresh. Refresh steps are non-uniform: every ``c1`` = 2 steps over [0, 0.375T), every ``c2`` = 3 over
[0.375T, 0.875T), every ``c3`` = 2 over [0.875T, T) (``bounds`` moves 0.375 / 0.875). At a refresh step the
dominant pointer advances and the new dominant adapter's cache is rebuilt.

Caching (``cache``):

- ``"off"`` (default) — every adapter runs a full pass at every step, as the published non-uniform mode does (it
  caches only with a uniform interval > 1); this equals Composite with mix weights N·w;
- ``"features"`` — DeepCache-style on UNets (:class:`fusion.feature_cache.UNetFeatureCache`): a cached pass reruns
  only the shallowest down/up level with the adapter's weights, on the deep feature of its last full pass;
- ``"output"`` — any denoiser (DiTs): a cached adapter contributes its last full prediction unchanged; the full
  passes run fused (one fuse per change of the running adapter) unless ``fuse=False`` or weights are scheduled;
- ``"auto"`` — ``"features"`` on UNets, ``"output"`` otherwise.

Passes with caching on. ``recompute="every"`` (default, as the paper states it): the dominant adapter runs a full
pass at every step. ``recompute="refresh"``: only at refresh steps (and, with ``second_stage="reference"``, where the
dominant adapter changes at the boundary); in between it too reuses its cache. An adapter with nothing cached (the
first step, a new batch shape) always runs a full pass; every full pass refreshes that adapter's cache. (The
published code's stage-2 cache clear writes into a copy of its cache list and so clears nothing; it never runs
with a cache in its default mode, so that slip is not reproduced.)

Counts (reset per generation): ``full_passes`` / ``cached_passes`` per adapter name, ``fuses``, ``dominants`` (the
dominant adapter of every step), ``refreshes`` (the refresh steps seen), ``stage_switch_step`` and ``latent_scores``.
Prompts are encoded before the first denoiser call with every adapter at its step-0 weight (Merge-style), as in
Composite.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch

from fusion.errors import CompositionError
from fusion.feature_cache import UNetFeatureCache, is_unet
from fusion.frequency import CUTOFF, latent_high_frequency_score
from fusion.schedules import parse_spec
from fusion.strategies import register
from fusion.strategies.base import StepContext, Strategy, check_composition, output_tensor, with_output_tensor

if TYPE_CHECKING:
    from fusion.engine import FusionEngine

LOW_CATEGORIES = ("background",)
"""Categories of the low-frequency set L; unscored adapters of any other category (or none) form H."""

CACHE_MODES = ("off", "auto", "features", "output")
STAGE_RULES = ("fraction", "online")
SECOND_STAGE_RULES = ("reference", "paper")
RECOMPUTE = ("every", "refresh")


def refresh_steps(
    num_steps: int, c1: int = 2, c2: int = 3, c3: int = 2, bounds: tuple[float, float] = (0.375, 0.875)
) -> list[int]:
    """The non-uniform refresh steps: every c1 over [0, ⌊b1·T⌋), every c2 over [⌊b1·T⌋, ⌊b2·T⌋), every c3 after."""
    first, second = int(bounds[0] * num_steps), int(bounds[1] * num_steps)
    steps = [*range(0, first, c1), *range(first, second, c2), *range(second, num_steps, c3)]
    return sorted(set(steps))


def cmlora_weights(num_adapters: int) -> tuple[float, float]:
    """(dominant, other) mixing weights for N adapters, summing to 1: ((N − 0.5)/(2N − 1.5), 1/(2N − 1.5))."""
    coeff = num_adapters - 0.5
    other = num_adapters / (coeff + num_adapters - 1)
    return coeff * other / num_adapters, other / num_adapters


def frequency_sets(
    names: Sequence[str],
    delta_h: Mapping[str, float | None],
    categories: Mapping[str, str | None],
    split: float = 0.0,
) -> tuple[list[str], list[str]]:
    """(H, L): adapters with ΔH > ``split`` (or, unscored, any category but background) in H, the rest in L; each
    set ordered scored-first by decreasing ΔH, then the unscored ones in composition order."""
    high: list[tuple[int, float, int, str]] = []
    low: list[tuple[int, float, int, str]] = []
    for position, name in enumerate(names):
        score = delta_h.get(name)
        category = (categories.get(name) or "").lower()
        if score is not None:
            (high if score > split else low).append((0, -float(score), position, name))
        else:
            (low if category in LOW_CATEGORIES else high).append((1, 0.0, position, name))
    return [item[-1] for item in sorted(high)], [item[-1] for item in sorted(low)]


def second_stage_start(num_steps: int, fraction: float) -> int:
    """The first step of stage 2 under the fraction rule: the smallest t with t ≥ ``fraction``·T (the product
    rounded to 9 decimals first, so 0.55·220 is 121, not 121.00000000000001)."""
    return math.ceil(round(fraction * num_steps, 9))


def second_stage_window(high: Sequence[str], low: Sequence[str]) -> list[str]:
    """The published code's stage-2 pool: (H + L)[1 : |H| + 1] — H without its first adapter, then L's first
    (H itself when either set is empty)."""
    if not high or not low:
        return list(high or low)
    return [*high, *low][1 : len(high) + 1]


def spatial_latent(ctx: StepContext) -> torch.Tensor | None:
    """This call's latent as (B, C, H, W): a UNet's ``sample`` as is; a Flux-style packed sequence (B, H·W, C)
    unpacked with its ``img_ids`` (rows/columns of the generated image's tokens). None when it cannot be shaped."""
    latent = ctx.args[0] if ctx.args else ctx.kwargs.get("sample", ctx.kwargs.get("hidden_states"))
    if not isinstance(latent, torch.Tensor):
        return None
    if latent.dim() == 4:
        return latent
    ids = ctx.kwargs.get("img_ids")
    if latent.dim() != 3 or not isinstance(ids, torch.Tensor):
        return None
    ids = ids[0] if ids.dim() == 3 else ids
    own = ids[:, 0] == 0  # editing pipelines append reference-image tokens with a non-zero first id
    rows, cols = ids[own, 1].long(), ids[own, 2].long()
    height, width = int(rows.max()) + 1, int(cols.max()) + 1
    if int(own.sum()) != height * width:
        return None
    tokens = latent[:, : ids.shape[0]][:, own]
    grid = torch.zeros(latent.shape[0], height, width, latent.shape[2], dtype=latent.dtype, device=latent.device)
    grid[:, rows, cols] = tokens
    return grid.permute(0, 3, 1, 2)


@register("cmlora")
class CMLoRA(Strategy):
    """CMLoRA. Options: ``delta_h`` (name → ΔH), ``categories`` (name → category), ``split`` (ΔH threshold for H),
    ``stage`` (``"fraction"``/``"online"``), ``fraction`` (0.55), ``g_f`` (0.68), ``second_stage`` (``"reference"``/
    ``"paper"``), ``c1``/``c2``/``c3`` (2/3/2), ``bounds`` ((0.375, 0.875)), ``recompute`` (``"every"``/
    ``"refresh"``), ``cache`` (``"off"``/``"auto"``/``"features"``/``"output"``), ``shallow_levels`` (UNet levels
    rerun by a feature-cached pass, 1). The defaults are the published code's non-uniform mode."""

    def __init__(
        self,
        weights: dict[str, Any],
        *,
        fuse: bool | None = None,
        delta_h: Mapping[str, float] | None = None,
        categories: Mapping[str, str] | None = None,
        split: float = 0.0,
        stage: str = "fraction",
        fraction: float = 0.55,
        g_f: float = 0.68,
        second_stage: str = "reference",
        c1: int = 2,
        c2: int = 3,
        c3: int = 2,
        bounds: Sequence[float] = (0.375, 0.875),
        recompute: str = "every",
        cache: str = "off",
        shallow_levels: int = 1,
        **options: Any,
    ) -> None:
        check_composition(
            "cmlora",
            weights,
            options,
            "delta_h, categories, split, stage, fraction, g_f, second_stage, c1, c2, c3, bounds, recompute, cache, "
            "shallow_levels",
        )
        for label, allowed, value in (
            ("stage", STAGE_RULES, stage),
            ("second_stage", SECOND_STAGE_RULES, second_stage),
            ("recompute", RECOMPUTE, recompute),
            ("cache", CACHE_MODES, cache),
        ):
            if value not in allowed:
                raise CompositionError(f"cmlora {label} must be one of {allowed}, got {value!r}")
        for label, value in (("c1", c1), ("c2", c2), ("c3", c3)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise CompositionError(f"cmlora {label} must be a whole number of steps ≥ 1, got {value!r}")
        bounds = tuple(float(b) for b in bounds)
        if len(bounds) != 2 or not 0.0 <= bounds[0] <= bounds[1] <= 1.0:
            raise CompositionError(f"cmlora bounds must be two fractions 0 ≤ b1 ≤ b2 ≤ 1, got {bounds!r}")
        if not 0.0 <= float(fraction) <= 1.0:
            raise CompositionError(f"cmlora fraction must lie in [0, 1], got {fraction!r}")
        for label, names in (("delta_h", delta_h), ("categories", categories)):
            unknown = sorted(set(names or {}) - set(weights))
            if unknown:
                raise CompositionError(f"cmlora {label} names adapters outside the composition: {unknown}")
        if fuse and cache not in ("output", "auto"):
            raise CompositionError(
                "cmlora runs fused only with output-level caching",
                hint="use cache='output', or leave fuse unset",
            )
        super().__init__(weights, fuse=fuse)
        self.delta_h = {name: float(value) for name, value in (delta_h or {}).items()}
        self.categories = dict(categories or {})
        self.split = float(split)
        self.stage_rule = stage
        self.fraction = float(fraction)
        self.g_f = float(g_f)
        self.second_stage = second_stage
        self.intervals = (c1, c2, c3)
        self.bounds = (bounds[0], bounds[1])
        self.recompute = recompute
        self.cache_option = cache
        self.shallow_levels = shallow_levels
        self.dominant_weight, self.other_weight = cmlora_weights(len(weights))
        self.names = list(weights)
        self.high: list[str] = []
        self.low: list[str] = []
        self.cache_mode = cache
        self._features: UNetFeatureCache | None = None
        self._use_fuse = False
        self._solo: torch.Tensor | None = None
        self._encode_weights: torch.Tensor | None = None
        self._installed: int | None = None
        self._reset_generation(1)

    # ----- setup -----------------------------------------------------------------------------------------------

    @property
    def needs_steps(self) -> bool:
        """The dominant adapter and the cache refreshes follow the step index."""
        return True

    def activate(self, engine: FusionEngine) -> None:
        """Resolve the H/L sets and the cache mode; install the text-encoder weights (all adapters)."""
        adapters = {name: engine.adapters[name] for name in self.names}
        scores = {name: self.delta_h.get(name, _meta_score(adapters[name].meta)) for name in self.names}
        categories = {name: self.categories.get(name, adapters[name].meta.get("category")) for name in self.names}
        self.high, self.low = frequency_sets(self.names, scores, categories, self.split)
        unet = is_unet(engine.denoiser)
        self.cache_mode = ("features" if unet else "output") if self.cache_option == "auto" else self.cache_option
        if self.cache_mode == "features":
            self._features = UNetFeatureCache(engine.denoiser, self.shallow_levels)
        if self.fuse and self.cache_mode != "output":
            raise CompositionError(
                "cmlora runs fused only with output-level caching; on a UNet cache='auto' caches features",
                hint="pass cache='output' with fuse=True, or leave fuse unset",
            )
        static = all(parse_spec(spec).steps is None for spec in self.weights.values())
        if self.fuse and not static:
            raise CompositionError("fuse=True needs weights that do not change over steps")
        self._use_fuse = self.cache_mode == "output" and static and self.fuse is not False
        self._build(engine, 1)

    def start_generation(self, engine: FusionEngine, num_steps: int) -> None:
        """Per-step solo weight tables, the refresh steps, and empty caches and counts."""
        self._build(engine, num_steps)
        self._reset_generation(num_steps)

    def _build(self, engine: FusionEngine, num_steps: int) -> None:
        table = engine.weight_table(self.weights, num_steps)  # (A, G, S)
        solo = torch.zeros(num_steps, len(self.names), *table.shape[:2], dtype=table.dtype, device=table.device)
        for i, name in enumerate(self.names):
            row = engine.adapter_names.index(name)
            solo[:, i, row, :] = table[row].T
        self._solo = solo
        self._encode_weights = table[:, :, 0].contiguous()
        engine.unfuse()
        engine.set_weights(self._encode_weights)
        self._installed = None

    def _reset_generation(self, num_steps: int) -> None:
        self.num_steps = num_steps
        self._refresh = set(refresh_steps(num_steps, *self.intervals, bounds=self.bounds))
        self._stage = 1
        self._pointers: dict[tuple[str, ...], int] = {}
        self._counter = 0
        self._dominant: int | None = None
        self._refreshing = False
        self._plan_step = -1
        self._slot = 0
        self._cache: dict[tuple[int, int], tuple[tuple[int, ...], torch.Tensor]] = {}
        self.full_passes = dict.fromkeys(self.names, 0)
        self.cached_passes = dict.fromkeys(self.names, 0)
        self.fuses = 0
        self.dominants: list[str] = []
        self.refreshes: list[int] = []
        self.stage_switch_step: int | None = None
        self.latent_scores: list[float | None] = []

    @property
    def runs_fused(self) -> bool:
        """True when full passes run with the adapter fused into the base weights (output-level caching)."""
        return self._use_fuse

    # ----- the schedule ----------------------------------------------------------------------------------------

    def _members(self, stage: int) -> list[str]:
        """The pool stage ``stage`` draws its dominant adapter from."""
        if stage == 1:
            return self.high or self.low
        if self.second_stage == "reference":
            return second_stage_window(self.high, self.low)
        return self.low or self.high

    def _fraction_stage(self, step: int) -> int:
        return 1 if step < second_stage_start(self.num_steps, self.fraction) else 2

    def _next_stage(self, ctx: StepContext) -> int:
        """Stage of this step: the fraction rule, or (online) the latent's score with the fraction rule as guard."""
        if self._stage == 2:
            return 2
        if self.stage_rule == "fraction":
            return self._fraction_stage(ctx.step)
        latent = spatial_latent(ctx)
        score = None if latent is None else latent_high_frequency_score(latent, CUTOFF)
        value = None if score is None else float(score.mean())
        self.latent_scores.append(value)
        if value is None:
            return self._fraction_stage(ctx.step)
        return 2 if value < self.g_f else 1

    def _plan(self, ctx: StepContext) -> None:
        """At the first call of a step: update the stage, decide whether this is a refresh step, pick the dominant."""
        stage = self._next_stage(ctx)
        switched = stage != self._stage and self._members(stage) != self._members(self._stage)
        if stage != self._stage:
            self.stage_switch_step = ctx.step
            self._stage = stage
        refresh = ctx.step in self._refresh or self._dominant is None
        members = self._members(stage)
        if self.second_stage == "reference":
            self._counter += int(refresh)
            dominant = self.names.index(members[(self._counter - 1) % len(members)])
            self._refreshing = refresh or dominant != self._dominant
            self._dominant = dominant
        else:
            self._refreshing = refresh or switched
            if self._refreshing:
                pool = tuple(members)
                turn = self._pointers.get(pool, 0)
                self._pointers[pool] = turn + 1
                self._dominant = self.names.index(members[turn % len(members)])
        if self._refreshing:
            self.refreshes.append(ctx.step)
        assert self._dominant is not None
        self.dominants.append(self.names[self._dominant])

    # ----- one denoiser call -----------------------------------------------------------------------------------

    def _install(self, engine: FusionEngine, index: int, step: int, fused: bool) -> None:
        """Put adapter ``index``'s weights of ``step`` in place (fused: only when another adapter is fused now)."""
        assert self._solo is not None
        weights = self._solo[min(step, self._solo.shape[0] - 1), index]
        if fused:
            if self._installed != index:
                engine.fuse(weights)
                self._installed = index
                self.fuses += 1
            return
        if self._installed is not None:
            engine.unfuse()
            self._installed = None
        engine.set_weights(weights)

    def _needs_full(self, index: int, key: tuple[int, int], shape: tuple[int, ...]) -> bool:
        cached = self._cache.get(key)
        if self.cache_mode == "off" or cached is None or cached[0] != shape:
            return True
        return index == self._dominant and (self.recompute == "every" or self._refreshing)

    def step(self, ctx: StepContext) -> Any:
        """Run the dominant adapter's full pass and every other adapter's cached pass; return the weighted sum."""
        if ctx.step != self._plan_step:
            self._plan(ctx)
            self._plan_step = ctx.step
            self._slot = 0
        else:
            self._slot += 1
        engine = ctx.engine
        latent = ctx.args[0] if ctx.args else ctx.kwargs.get("sample", ctx.kwargs.get("hidden_states"))
        shape = tuple(latent.shape) if isinstance(latent, torch.Tensor) else ()
        total: torch.Tensor | None = None
        template: Any = None
        assert self._dominant is not None
        others = [i for i in range(len(self.names)) if i != self._dominant]
        for index in [*others, self._dominant]:  # dominant last: a fused pass stays installed for the next step
            name = self.names[index]
            key = (index, self._slot)
            if self._needs_full(index, key, shape):
                self._install(engine, index, ctx.step, self._use_fuse)
                if self._features is not None:
                    output, feature = self._features.full(ctx.run)
                    self._cache[key] = (shape, feature)
                else:
                    output = ctx.run()
                prediction = output_tensor(output)
                if self.cache_mode == "output":
                    self._cache[key] = (shape, prediction)
                template = output if template is None else template
                self.full_passes[name] += 1
            else:
                feature = self._cache[key][1]
                if self._features is not None:
                    self._install(engine, index, ctx.step, False)
                    prediction = output_tensor(self._features.shallow(ctx.run, feature))
                else:
                    prediction = feature
                self.cached_passes[name] += 1
            weight = self.dominant_weight if index == self._dominant else self.other_weight
            total = prediction * weight if total is None else total + prediction * weight
        assert total is not None
        if not self._use_fuse or ctx.step >= self.num_steps - 1:
            self._restore_encode_weights(engine)
        if template is not None:
            return with_output_tensor(template, total)
        return _wrap(ctx, total)

    def _restore_encode_weights(self, engine: FusionEngine) -> None:
        """What the next prompt encoding sees: every adapter at its step-0 weight, unfused."""
        if self._installed is not None:
            engine.unfuse()
            self._installed = None
        assert self._encode_weights is not None
        engine.set_weights(self._encode_weights)

    def deactivate(self, engine: FusionEngine) -> None:
        """Restore pristine weights and drop caches and tables."""
        super().deactivate(engine)
        self._installed = None
        self._cache = {}
        self._solo = None
        self._encode_weights = None
        self._features = None


def _meta_score(meta: Mapping[str, Any]) -> float | None:
    """ΔH stored with an adapter: ``meta["delta_h"]`` or ``meta["scores"]["delta_h"]`` (catalog scores)."""
    value = meta.get("delta_h")
    if value is None and isinstance(meta.get("scores"), Mapping):
        value = meta["scores"].get("delta_h")
    return None if value is None else float(value)


def _wrap(ctx: StepContext, prediction: torch.Tensor) -> Any:
    """``prediction`` in the structure the pipeline asked for, when no pass of this call produced one to copy."""
    if ctx.kwargs.get("return_dict", True) is False:
        return (prediction,)
    from diffusers.models.modeling_outputs import Transformer2DModelOutput
    from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput

    if is_unet(ctx.engine.denoiser):
        return UNet2DConditionOutput(sample=prediction)
    return Transformer2DModelOutput(sample=prediction)
