"""CMLoRA: the weights and refresh schedule of docs/methods.md#cmlora, H/L ordering, caching off = the weighted
Composite formula, pass counts with caching on = the refresh schedule, stage switching (fraction and online with its
guard), on tiny-sd (feature and output caching) and tiny-flux (output caching)."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest
import torch
from torch import nn

from composer.mixin import make_composable
from fusion.adapters import Adapter, LowRank
from fusion.errors import CompositionError
from fusion.feature_cache import UNetFeatureCache
from fusion.strategies.base import StepContext
from fusion.strategies.cmlora import (
    CMLoRA,
    cmlora_weights,
    frequency_sets,
    refresh_steps,
    second_stage_start,
    second_stage_window,
    spatial_latent,
)

GUIDANCE = 6.0
WEIGHTS = {"l0": 0.8, "l1": 1.1, "l2": 0.5}
SCORES = {"l0": 0.1, "l1": 0.05, "l2": -0.1}  # H = [l0, l1], L = [l2]
DOMINANTS_8 = ["l0", "l0", "l1", "l0", "l0", "l2", "l2", "l2"]
"""T = 8, second_stage="paper": refresh steps 0, 2, 3, 6, 7 plus the stage switch at step 5 (5 < 0.55·8 is false)."""
REFERENCE_8 = ["l0", "l0", "l1", "l0", "l0", "l1", "l2", "l1"]
"""T = 8, the published stage 2: refresh counter c = 1, 1, 2, 3, 3, 3, 4, 5; stage 1 picks H[(c−1) mod 2], stage 2
W[(c−1) mod 2] over W = [l1, l2] (H without its first adapter, then L's first)."""
PAPER = {"second_stage": "paper"}


def _lora(denoiser: nn.Module, rank: int, seed: int, every: int) -> dict[str, LowRank]:
    """Random factors on every ``every``-th linear of the attention/feed-forward layers (and UNet resnet conv1)."""
    g = torch.Generator().manual_seed(seed)
    targets = [
        (name, m)
        for name, m in denoiser.named_modules()
        if (isinstance(m, nn.Linear) and (".attn" in name or ".ff" in name))
        or (isinstance(m, nn.Conv2d) and name.endswith("conv1"))
    ]
    layers = {}
    for name, module in targets[::every]:
        w = module.weight
        down = torch.randn(rank, *w.shape[1:], generator=g) * 0.3
        up = torch.randn(w.shape[0], rank, *([1, 1] if w.dim() == 4 else []), generator=g) * 0.3
        layers[name] = LowRank(down=down, up=up, alpha=rank / 2)
    return layers


def _setup(pipe: Any, family: str = "sd1") -> list[Adapter]:
    pipe = make_composable(pipe)
    denoiser = pipe.denoiser()
    adapters = [Adapter(f"l{i}", family, _lora(denoiser, 2 + i, seed=10 + i, every=i + 1)) for i in range(3)]
    for adapter in adapters:
        pipe.add_adapter(adapter)
    return adapters


def _run(pipe: Any, steps: int = 8, size: int = 64, **extra: Any) -> torch.Tensor:
    with torch.inference_mode():
        out = pipe(
            "a corgi astronaut",
            num_inference_steps=steps,
            guidance_scale=GUIDANCE,
            height=size,
            width=size,
            output_type="latent",
            generator=torch.Generator().manual_seed(0),
            **extra,
        )
    return out.images


def _strategy(pipe: Any) -> CMLoRA:
    return pipe.composition_engine.strategy


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


# ----- pure functions ------------------------------------------------------------------------------------------


def test_refresh_steps_follow_the_non_uniform_schedule() -> None:
    assert refresh_steps(8) == [0, 2, 3, 6, 7]
    assert refresh_steps(20) == [0, 2, 4, 6, 7, 10, 13, 16, 17, 19]
    assert refresh_steps(50) == [*range(0, 18, 2), *range(18, 43, 3), 43, 45, 47, 49]
    assert refresh_steps(10, c1=1, c2=4, c3=5, bounds=(0.2, 0.5)) == [0, 1, 2, 5]


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5])
def test_weights_are_the_methods_formula_normalised(n: int) -> None:
    dominant, other = cmlora_weights(n)
    coeff = n - 0.5
    w_nd = n / (coeff + n - 1)
    assert dominant == pytest.approx(coeff * w_nd / n)
    assert other == pytest.approx(w_nd / n)
    assert dominant + (n - 1) * other == pytest.approx(1.0)
    assert dominant == pytest.approx((n - 0.5) / (2 * n - 1.5))
    if n == 3:
        assert (round(dominant, 3), round(other, 3)) == (0.556, 0.222)


def test_frequency_sets_use_scores_then_categories() -> None:
    names = ["bg", "style", "char", "thing", "mystery", "scored_low", "scored_high"]
    scores = {"scored_low": -0.02, "scored_high": 0.3, "bg": 0.01}
    categories = {"bg": "background", "style": "style", "char": "Character", "thing": "object", "scored_low": "style"}
    high, low = frequency_sets(names, scores, categories)
    assert high == ["scored_high", "bg", "style", "char", "thing", "mystery"]  # a score beats the category
    assert low == ["scored_low"]
    high, low = frequency_sets(["a", "b", "c"], {}, {"a": "background", "b": "clothing"})
    assert (high, low) == (["b", "c"], ["a"])


def test_unscored_adapters_keep_the_combination_order() -> None:
    names = ["hat", "bg", "hero", "ink", "tree"]
    categories = {"hat": "clothing", "bg": "background", "hero": "character", "ink": "style", "tree": "object"}
    assert frequency_sets(names, {}, categories) == (["hat", "hero", "ink", "tree"], ["bg"])


@pytest.mark.parametrize(("steps", "first"), [(20, 11), (50, 28), (220, 121), (8, 5)])
def test_stage_two_starts_where_the_published_code_puts_it(steps: int, first: int) -> None:
    assert second_stage_start(steps, 0.55) == first  # 220 steps: stage 1 is steps 0…120, as in the published code
    strategy = CMLoRA(WEIGHTS)
    strategy._reset_generation(steps)
    assert [strategy._fraction_stage(t) for t in (first - 1, first)] == [1, 2]


def test_default_dominant_schedule_is_the_published_one() -> None:
    strategy = CMLoRA({"char": 1.0, "ink": 1.0, "bg": 1.0})
    assert (strategy.cache_option, strategy.second_stage, strategy.fraction) == ("off", "reference", 0.55)
    strategy.high, strategy.low = ["char", "ink"], ["bg"]
    strategy._reset_generation(20)
    for step in range(20):
        strategy._plan(SimpleNamespace(step=step))  # type: ignore[arg-type]
    # refresh steps 0 2 4 6 7 10 | 13 16 17 19 advance one counter; from step 11 the pool is [ink, bg]
    c, i, b = "char", "ink", "bg"
    assert strategy.dominants == [c, c, i, i, c, c, i, c, c, c, i, b, b, i, i, i, b, i, i, b]
    assert second_stage_window(["a", "b", "c"], ["d", "e"]) == ["b", "c", "d"]
    assert second_stage_window([], ["d", "e"]) == ["d", "e"]


def test_spatial_latent_unpacks_flux_tokens() -> None:
    from diffusers import FluxPipeline

    latent = torch.randn(2, 16, 8, 6)
    packed = FluxPipeline._pack_latents(latent, 2, 16, 8, 6)  # (2, 4·3, 64)
    ids = FluxPipeline._prepare_latent_image_ids(2, 4, 3, latent.device, latent.dtype)
    ctx = StepContext(None, 0, 1, None, 2, (), {"hidden_states": packed, "img_ids": ids}, lambda: None)  # type: ignore[arg-type]
    grid = spatial_latent(ctx)
    assert grid is not None
    assert grid.shape == (2, 64, 4, 3)
    assert torch.equal(grid.permute(0, 2, 3, 1).reshape(2, 12, 64), packed)


def test_options_are_validated() -> None:
    with pytest.raises(CompositionError, match="unknown options"):
        CMLoRA(WEIGHTS, tau=3)
    with pytest.raises(CompositionError, match="cache"):
        CMLoRA(WEIGHTS, cache="deep")
    with pytest.raises(CompositionError, match="c2"):
        CMLoRA(WEIGHTS, c2=0)
    with pytest.raises(CompositionError, match="bounds"):
        CMLoRA(WEIGHTS, bounds=(0.8, 0.2))
    with pytest.raises(CompositionError, match="outside the composition"):
        CMLoRA(WEIGHTS, delta_h={"other": 0.1})
    with pytest.raises(CompositionError, match="fused only"):
        CMLoRA(WEIGHTS, fuse=True, cache="features")


# ----- the feature cache ---------------------------------------------------------------------------------------


def test_shallow_pass_on_its_own_feature_reproduces_the_full_pass(tiny_sd: Any) -> None:
    unet = tiny_sd.unet
    cache = UNetFeatureCache(unet)
    g = torch.Generator().manual_seed(0)
    x, context = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 5, 32, generator=g)
    with torch.no_grad():
        full, feature = cache.full(lambda: unet(x, 500, encoder_hidden_states=context).sample)
        calls: list[str] = []
        hook = unet.mid_block.resnets[0].register_forward_hook(lambda *_: calls.append("deep"))
        shallow = cache.shallow(lambda: unet(x, 500, encoder_hidden_states=context).sample, feature)
        assert calls == []  # the deep path did not run
        other = cache.shallow(lambda: unet(x, 900, encoder_hidden_states=context).sample, feature)
        with pytest.raises(RuntimeError):
            cache.shallow(lambda: unet(x[:1], 500, encoder_hidden_states=context[:1]).sample, feature)
        unet(x, 500, encoder_hidden_states=context)
        hook.remove()
    assert calls == ["deep"]  # stubs are gone after a pass, also after one that failed
    assert torch.equal(shallow, full)
    assert not torch.equal(other, full)
    assert all("forward" not in m.__dict__ for m in unet.modules())


# ----- caching off = the paper's formula -----------------------------------------------------------------------


@pytest.mark.slow
def test_defaults_equal_the_weighted_formula_from_single_lora_runs(tiny_sd: Any, fresh_pipeline: Any) -> None:
    """The defaults (no caching, the published stage 2) against diffusers' own LoRA path, call by call."""
    adapters = _setup(tiny_sd)
    tiny_sd.set_composition(WEIGHTS, method="cmlora", delta_h=SCORES)
    calls: list[tuple[tuple, dict, torch.Tensor]] = []
    hook = tiny_sd.unet.register_forward_hook(
        lambda _m, args, kwargs, out: calls.append((args, dict(kwargs), out[0].clone())), with_kwargs=True
    )
    _run(tiny_sd)
    hook.remove()
    strategy = _strategy(tiny_sd)
    assert strategy.dominants == REFERENCE_8
    assert strategy.full_passes == {"l0": 8, "l1": 8, "l2": 8}

    reference = fresh_pipeline("tiny-sd")  # diffusers' own LoRA path, no engine
    with torch.no_grad():
        for adapter in adapters:
            state = {}
            for name, update in adapter.layers.items():
                state[f"unet.{name}.lora_A.weight"] = update.down.clone()
                state[f"unet.{name}.lora_B.weight"] = update.up.clone() * update.scale
            reference.load_lora_weights(state, adapter_name=adapter.name)
    dominant, other = cmlora_weights(3)
    for step, (args, kwargs, ours) in enumerate(calls):
        formula = torch.zeros_like(ours)
        for name, weight in WEIGHTS.items():
            reference.set_adapters([name], [weight])
            with torch.inference_mode():
                single = reference.unet(*args, **{**kwargs, "return_dict": False})[0]
            formula += (dominant if name == REFERENCE_8[step] else other) * single
        assert _relative(ours, formula) <= 1e-5


def _fixed_dominant_equals_composite(pipe: Any, **run: Any) -> None:
    """With one adapter in H for the whole run it is always dominant: Composite with mix N·w is the reference."""
    scores = {"l0": 0.2, "l1": -0.1, "l2": -0.3}
    pipe.set_composition(WEIGHTS, method="cmlora", cache="off", delta_h=scores, fraction=1.0)
    ours = _run(pipe, **run)
    assert set(_strategy(pipe).dominants) == {"l0"}
    n = len(WEIGHTS)
    coeff = n - 0.5
    w_nd = n / (coeff + n - 1)
    mix = {"l0": coeff * w_nd, "l1": w_nd, "l2": w_nd}
    pipe.set_composition(WEIGHTS, method="composite", mode="sequential", mix=mix)
    composite = _run(pipe, **run)
    assert _relative(ours, composite) <= 1e-5
    pipe.set_composition(WEIGHTS, method="composite", mode="sequential")
    assert _relative(ours, _run(pipe, **run)) > 1e-4  # the weighting matters


def test_caching_off_equals_weighted_composite_on_tiny_sd(tiny_sd: Any) -> None:
    _setup(tiny_sd)
    _fixed_dominant_equals_composite(tiny_sd, steps=4)


@pytest.mark.slow
def test_caching_off_equals_weighted_composite_on_tiny_flux(tiny_flux: Any) -> None:
    _setup(tiny_flux, "flux")
    _fixed_dominant_equals_composite(tiny_flux, steps=3, max_sequence_length=16)


# ----- caching on: pass counts follow the refresh schedule -----------------------------------------------------


@pytest.mark.parametrize(
    ("cache", "recompute", "full"),
    [
        # every: step 0 fills all caches, then the dominant of each step runs in full
        ("features", "every", {"l0": 4, "l1": 2, "l2": 4}),
        ("output", "every", {"l0": 4, "l1": 2, "l2": 4}),
        # refresh: step 0 fills all caches, then only the newly dominant adapter at refresh steps 2, 3, 5, 6, 7
        ("features", "refresh", {"l0": 2, "l1": 2, "l2": 4}),
        ("output", "refresh", {"l0": 2, "l1": 2, "l2": 4}),
    ],
)
def test_full_passes_match_the_refresh_schedule(tiny_sd: Any, cache: str, recompute: str, full: dict) -> None:
    _setup(tiny_sd)
    tiny_sd.set_composition(WEIGHTS, method="cmlora", cache=cache, recompute=recompute, delta_h=SCORES, **PAPER)
    deep_runs: list[int] = []
    hook = tiny_sd.unet.up_blocks[0].resnets[0].register_forward_hook(lambda *_: deep_runs.append(1))
    latents = _run(tiny_sd)
    hook.remove()
    strategy = _strategy(tiny_sd)
    assert strategy.refreshes == [0, 2, 3, 5, 6, 7]
    assert strategy.stage_switch_step == 5
    assert strategy.dominants == DOMINANTS_8
    assert strategy.full_passes == full
    assert strategy.cached_passes == {name: 8 - count for name, count in full.items()}
    assert len(deep_runs) == sum(full.values())  # cached passes never ran the deep path
    assert bool(torch.isfinite(latents).all())


def test_output_caching_runs_fused_and_leaves_text_encoder_weights(tiny_sd: Any) -> None:
    _setup(tiny_sd)
    pristine = {k: v.clone() for k, v in tiny_sd.unet.state_dict().items()}
    tiny_sd.set_composition(WEIGHTS, method="cmlora", cache="output", delta_h=SCORES)
    engine = tiny_sd.composition_engine
    fused_during: list[bool] = []
    hook = tiny_sd.unet.conv_in.register_forward_hook(lambda *_: fused_during.append(engine.fused))
    first = _run(tiny_sd)
    hook.remove()
    assert len(fused_during) == 10
    assert all(fused_during)
    assert not engine.fused
    encode = engine.weight_table(WEIGHTS, 1)[:, :, 0]
    assert torch.equal(engine.state.weights, engine._per_group(encode))
    assert torch.equal(_run(tiny_sd), first)  # a second generation starts from empty caches
    tiny_sd.set_composition(WEIGHTS, method="cmlora", cache="output", delta_h=SCORES, fuse=False)
    assert _relative(_run(tiny_sd), first) <= 1e-5
    tiny_sd.clear_composition()
    assert all(torch.equal(v, pristine[k]) for k, v in tiny_sd.unet.state_dict().items())


def test_feature_caching_stays_close_to_caching_off(tiny_sd: Any) -> None:
    _setup(tiny_sd)
    results = {}
    for cache in ("off", "features", "output"):
        tiny_sd.set_composition(WEIGHTS, method="cmlora", cache=cache, delta_h=SCORES)
        results[cache] = _run(tiny_sd)
    assert 0 < _relative(results["features"], results["off"]) < 0.05
    assert 0 < _relative(results["output"], results["off"]) < 0.2


@pytest.mark.slow
def test_output_caching_on_flux_with_true_cfg_caches_each_call(tiny_flux: Any) -> None:
    _setup(tiny_flux, "flux")
    with pytest.raises(CompositionError, match="UNet"):
        tiny_flux.set_composition(WEIGHTS, method="cmlora", cache="features")
    tiny_flux.set_composition(WEIGHTS, method="cmlora", cache="auto", delta_h=SCORES, **PAPER)
    assert _strategy(tiny_flux).cache_mode == "output"
    runs: list[int] = []
    hook = tiny_flux.transformer.x_embedder.register_forward_hook(lambda *_: runs.append(1))
    latents = _run(tiny_flux, negative_prompt="blurry", true_cfg_scale=2.0, max_sequence_length=16)
    hook.remove()
    strategy = _strategy(tiny_flux)
    assert strategy.dominants == DOMINANTS_8
    assert strategy.full_passes == {"l0": 8, "l1": 4, "l2": 8}  # the schedule, once per CFG call
    assert len(runs) == 20
    assert bool(torch.isfinite(latents).all())


# ----- stages --------------------------------------------------------------------------------------------------


def test_fraction_stage_switch(tiny_sd: Any) -> None:
    _setup(tiny_sd)
    tiny_sd.set_composition(WEIGHTS, method="cmlora", cache="output", delta_h=SCORES, fraction=0.25, **PAPER)
    _run(tiny_sd)
    strategy = _strategy(tiny_sd)
    assert strategy.stage_switch_step == 2
    assert strategy.dominants == ["l0", "l0", "l2", "l2", "l2", "l2", "l2", "l2"]
    assert strategy.refreshes == [0, 2, 3, 6, 7]  # the switch falls on a refresh step
    tiny_sd.set_composition(WEIGHTS, method="cmlora", cache="output", categories={"l2": "background"}, **PAPER)
    _run(tiny_sd)
    assert _strategy(tiny_sd).dominants == DOMINANTS_8  # no scores: categories decide (l0, l1 unknown → H)


def test_online_stage_switch_follows_the_latent_score(tiny_sd: Any) -> None:
    _setup(tiny_sd)
    tiny_sd.set_composition(WEIGHTS, method="cmlora", cache="output", delta_h=SCORES, stage="online", g_f=-1.0, **PAPER)
    _run(tiny_sd)
    never = _strategy(tiny_sd)
    scores = list(never.latent_scores)
    assert never.stage_switch_step is None
    assert len(scores) == 8
    assert None not in scores
    assert set(never.dominants) == {"l0", "l1"}
    threshold = sorted(scores)[4]
    expected = next(step for step, score in enumerate(scores) if score < threshold)
    tiny_sd.set_composition(
        WEIGHTS, method="cmlora", cache="output", delta_h=SCORES, stage="online", g_f=threshold, **PAPER
    )
    _run(tiny_sd)
    online = _strategy(tiny_sd)
    assert online.stage_switch_step == expected
    assert online.latent_scores == scores[: expected + 1]  # scores stop once stage 2 is reached
    assert online.dominants[expected:] == ["l2"] * (8 - expected)


def test_online_stage_guard_falls_back_to_the_fraction_rule(tiny_sd: Any) -> None:
    _setup(tiny_sd)
    tiny_sd.set_composition(WEIGHTS, method="cmlora", cache="output", delta_h=SCORES, stage="online", g_f=2.0, **PAPER)
    _run(tiny_sd, size=32)  # a 4×4 latent: too small for the radius cut
    strategy = _strategy(tiny_sd)
    assert strategy.latent_scores == [None] * 6  # steps 0…5: scored (guarded) until stage 2
    assert strategy.stage_switch_step == 5
    assert strategy.dominants == DOMINANTS_8
    _run(tiny_sd, size=64)  # large enough: g_f = 2 is above any score, so stage 2 starts at once
    assert _strategy(tiny_sd).stage_switch_step == 0
    assert set(_strategy(tiny_sd).dominants) == {"l2"}
