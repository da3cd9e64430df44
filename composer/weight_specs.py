"""Adapter requests → the weight specs the fusion engine reads: the one place a request becomes a composition weight.

A request (:class:`composer.prompts.LoraTag`, whether it came from a ``<lora:…>`` tag, the CLI, the app or the API)
can say a weight or a keyframe schedule, a text-encoder weight of its own, block weights and a ``start=``/``stop=``
window. :func:`engine_spec` turns it into a spec :mod:`fusion.schedules` reads: a number, or a mapping of ``weight``,
``blocks`` (a block vector, a preset name, or per-group weights where the text encoders' weight differs) and
``steps`` (keyframes or a :class:`StepWindow`). :meth:`composer.mixin.ComposableMixin.set_composition` resolves every
request it is given here, so the mixin, the facade, the service and the CLI compose a request alike.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import cache
from typing import Any, Union

from composer.prompts import LoraTag
from fusion.errors import CompositionError
from fusion.layer_groups import BASE, CLIP, T5, BlockLayout
from fusion.schedules import block_weights
from fusion.strategies.base import WeightSpec

TEXT_ENCODER_GROUPS = frozenset({BASE, CLIP, T5})
"""Layer groups of the text encoders: what a request's text-encoder weight scales."""

Composition = Union[Mapping[str, Union[WeightSpec, LoraTag]], Sequence[LoraTag]]
"""What ``set_composition`` takes: adapter name → weight spec or request, or a sequence of requests."""


@dataclass(frozen=True)
class StepWindow:
    """A step schedule that is 1 inside ``[start, stop)`` and 0 outside: each bound a fraction of the run (≤ 1,
    times the number of steps) or a step number (> 1); None leaves that side open."""

    start: float | None = None
    stop: float | None = None

    def __call__(self, step: int, num_steps: int) -> float:
        """The weight factor at ``step`` of ``num_steps``."""
        lower = 0.0 if self.start is None else _position(self.start, num_steps)
        upper = float(num_steps) if self.stop is None else _position(self.stop, num_steps)
        return 1.0 if lower <= step < upper else 0.0


def _position(bound: float, num_steps: int) -> float:
    return bound * num_steps if bound <= 1.0 else bound


def engine_spec(request: LoraTag, layout: Callable[[], BlockLayout]) -> WeightSpec:
    """The weight spec for ``request``; ``layout`` gives the denoiser's block layout (asked for only when the
    text encoders' weight differs from the denoiser's). Raises :class:`CompositionError` for a keyframe schedule
    together with a window, or block weights that do not fit the layout."""
    weight, steps = request.weight, None
    if isinstance(weight, str):
        steps, weight = weight, 1.0
    if request.start is not None or request.stop is not None:
        if steps is not None:
            raise CompositionError(
                f"adapter {request.name!r}: use either a keyframe schedule or start/stop, not both",
                hint="write the window as keyframes instead, e.g. 0@0,1@0.5",
            )
        steps = StepWindow(request.start, request.stop)
    blocks: Any = request.block_weights
    text_encoder = request.text_encoder_weight
    if text_encoder is not None and text_encoder != weight:
        blocks = _per_group(blocks, float(weight), float(text_encoder), layout())
        weight = 1.0
    if blocks is None and steps is None:
        return float(weight)
    return {"weight": float(weight), "blocks": blocks, "steps": steps}


def _per_group(blocks: str | None, weight: float, text_encoder: float, layout: BlockLayout) -> dict[str, float]:
    """Every layer group's absolute weight: the block weights times ``text_encoder`` on the text encoders' groups
    and ``weight`` on every other group (blocks a vector leaves out included)."""
    scaled = block_weights(blocks, layout).tolist()
    return {
        group: value * (text_encoder if group in TEXT_ENCODER_GROUPS else weight)
        for group, value in zip(layout.groups, scaled)
    }


def engine_specs(composition: Composition, layout: Callable[[], BlockLayout]) -> dict[str, WeightSpec]:
    """Adapter name → weight spec for a whole composition: requests resolved by :func:`engine_spec` (the layout is
    built at most once), every other spec passed on as it is. A request filed under another adapter's name, or
    two requests for one adapter, is a :class:`CompositionError`."""
    once = cache(layout)
    if isinstance(composition, str) or not isinstance(composition, (Mapping, Sequence)):
        raise CompositionError(
            f"a composition is a mapping of adapter names to weights or a list of requests, not "
            f"{type(composition).__name__}",
            hint="e.g. {'style': 0.8} or the tags composer.prompts.extract_lora_tags(prompt) returns",
        )
    if isinstance(composition, Mapping):
        items = list(composition.items())
    else:
        items = [(_request(item).name, item) for item in composition]
    specs: dict[str, WeightSpec] = {}
    for name, value in items:
        if name in specs:
            raise CompositionError(f"adapter {name!r} is requested twice", hint="keep one request per adapter")
        if isinstance(value, LoraTag):
            if value.name != name:
                raise CompositionError(
                    f"the request for {value.name!r} is filed under another adapter's name, {name!r}",
                    hint="file each request under its own adapter's name",
                )
            specs[name] = engine_spec(value, once)
        else:
            specs[name] = value
    return specs


def _request(item: Any) -> LoraTag:
    if not isinstance(item, LoraTag):
        raise CompositionError(
            f"a list composition holds requests (LoraTag), not {type(item).__name__} {item!r}",
            hint="pass a mapping of adapter names to weights instead",
        )
    return item
