"""Weight schedules: per adapter a scalar, a block-weight vector and/or timestep keyframes → one precomputed table.

Every way a user can weight an adapter ends up in a :class:`WeightTable`, ``weight[adapter, layer_group, step]``,
computed once per generation by :func:`build_weight_table`. The hot path then does one lookup per step
(:meth:`WeightTable.at`), never a parse, a module walk or a Python loop over layers.

Accepted per-adapter specs (:func:`parse_spec`):

- a number — a plain weight (``0.8``);
- a block-weight vector — a list of floats, a string ``"1,0,0.5,..."``, or an A1111 preset name (``NONE``,
  ``ALL``, ``INS``, ``IND``, ``INALL``, ``MIDD``, ``OUTD``, ``OUTS``, ``OUTALL``); lengths and block order are
  the denoiser's (:mod:`fusion.layer_groups`): 17 or 26 on SD 1.x, 12 or 20 on SDXL;
- timestep keyframes in loractl syntax — ``"0@0,1@0.5"``: ``weight@position`` items, a position ≤ 1 is a
  fraction of the run (step *t* of *N* sits at t/(N−1)), a position > 1 is a 0-based step number; linear
  interpolation between keyframes, constant before the first and after the last; at equal positions the later
  item wins from that point on (a jump);
- a callable ``(step, num_steps) -> float``;
- an :class:`AdapterSchedule` or a mapping with keys ``weight``, ``blocks``, ``steps`` combining them:
  ``weight · block[group] · step_weight[step]``.

The parsers are public so prompt syntax (``<lora:name:0.8:lbw=OUTALL>``) can reuse them.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Union

import torch

from fusion.errors import CompositionError
from fusion.layer_groups import BASE, MID, BlockLayout
from fusion.weight_range import checked_weight

StepFunction = Callable[[int, int], float]
BlockSpec = Union[str, Sequence[float]]
StepSpec = Union[str, "Keyframes", StepFunction]

PRESET_NAMES = ("NONE", "ALL", "INS", "IND", "INALL", "MIDD", "OUTD", "OUTS", "OUTALL")
"""A1111 LoRA Block Weight preset names accepted wherever a block vector is."""

_NUMBER = r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?"
_KEYFRAME = re.compile(rf"^\s*({_NUMBER})\s*@\s*({_NUMBER})\s*$")


@dataclass(frozen=True)
class Keyframes:
    """Timestep keyframes: (weight, position) pairs as written, position ≤ 1 a fraction, > 1 a step number."""

    points: tuple[tuple[float, float], ...]

    def values(self, num_steps: int) -> torch.Tensor:
        """Weight at each of ``num_steps`` steps (float64), linearly interpolated, constant outside."""
        coords = [(p * max(num_steps - 1, 0) if p <= 1.0 else p, w) for w, p in self.points]
        coords.sort(key=lambda item: item[0])  # stable: equal positions keep their written order
        out = torch.empty(num_steps, dtype=torch.float64)
        for step in range(num_steps):
            out[step] = _interpolate(coords, float(step))
        return out


def _interpolate(coords: Sequence[tuple[float, float]], x: float) -> float:
    last = -1
    for i, (position, _) in enumerate(coords):
        if position <= x:
            last = i
    if last < 0:
        return coords[0][1]
    if last == len(coords) - 1:
        return coords[-1][1]
    (x0, w0), (x1, w1) = coords[last], coords[last + 1]
    return w0 + (w1 - w0) * (x - x0) / (x1 - x0)


@dataclass(frozen=True)
class AdapterSchedule:
    """One adapter's weighting: ``weight · block[group] · steps[step]`` (``None`` parts are all-ones)."""

    weight: float = 1.0
    blocks: BlockSpec | None = None
    steps: StepSpec | None = None


def parse_keyframes(text: str) -> Keyframes:
    """Parse loractl keyframes ``"0@0,1@0.5"`` (``,`` or ``;`` separated); a bare number is a constant."""
    items = [item for item in re.split(r"[,;]", text) if item.strip()]
    if not items:
        raise CompositionError(f"empty keyframe schedule {text!r}", hint="write weight@position, e.g. 0@0,1@0.5")
    if len(items) == 1 and "@" not in items[0]:
        return Keyframes(((_parse_float(items[0], text), 0.0),))
    points = []
    for item in items:
        match = _KEYFRAME.match(item)
        if match is None:
            raise CompositionError(
                f"bad keyframe {item.strip()!r} in {text!r}",
                hint="each item is weight@position; position ≤ 1 is a fraction of the steps, > 1 a step number",
            )
        weight, position = float(match.group(1)), float(match.group(2))
        if not math.isfinite(position) or position < 0:
            raise CompositionError(f"keyframe {item.strip()!r} in {text!r} needs a finite position ≥ 0")
        points.append((checked_weight(weight, f"keyframe weight in {text!r}"), position))
    return Keyframes(tuple(points))


def parse_block_vector(text: str) -> tuple[float, ...]:
    """Parse ``"1,0,0.5,..."`` into floats (the length is checked against a layout later)."""
    return tuple(_parse_float(item, text) for item in text.split(","))


def _parse_float(item: str, whole: str) -> float:
    try:
        value = float(item.strip())
    except ValueError:
        raise CompositionError(f"{item.strip()!r} in {whole!r} is not a number") from None
    return checked_weight(value, f"weight in {whole!r}")


def preset_vector(name: str, layout: BlockLayout) -> tuple[float, ...]:
    """An A1111 preset as a short-form vector for ``layout``.

    The presets are defined by role, which reproduces the extension's SD 1.x values exactly and gives SDXL and
    smaller UNets the same meaning: with I the attention input blocks and O the attention output blocks,
    INS = first ⌈|I|/2⌉ of I, IND = the rest of I, OUTD = first ⌊|O|/2⌋ of O, OUTS = the rest of O,
    MIDD = IND + MID + OUTD; INALL/OUTALL = all of I/O; every preset but NONE also sets BASE. On SDXL this
    gives S = IN04 IN05 OUT03-05 and D = IN07 IN08 OUT00-02, the usual SDXL reading of these names.
    FLUX has only NONE and ALL.
    """
    key = name.strip().upper()
    slots = layout.short.slots
    if key == "NONE":
        return tuple(0.0 for _ in slots)
    if key == "ALL":
        return tuple(1.0 for _ in slots)
    if key not in PRESET_NAMES:
        raise CompositionError(f"unknown block-weight preset {name!r}", hint=f"use one of {', '.join(PRESET_NAMES)}")
    if not layout.is_unet:
        raise CompositionError(
            f"block-weight preset {key} is defined for UNets; this {layout.family} denoiser has only NONE and ALL",
            hint="give a vector instead",
        )
    ins, outs = layout.input_attention, layout.output_attention
    in_shallow, in_deep = ins[: math.ceil(len(ins) / 2)], ins[math.ceil(len(ins) / 2) :]
    out_deep, out_shallow = outs[: len(outs) // 2], outs[len(outs) // 2 :]
    chosen = {
        "INS": in_shallow,
        "IND": in_deep,
        "INALL": ins,
        "MIDD": (*in_deep, MID, *out_deep),
        "OUTD": out_deep,
        "OUTS": out_shallow,
        "OUTALL": outs,
    }[key]
    on = {BASE, *chosen}
    return tuple(1.0 if slot in on else 0.0 for slot in slots)


def parse_spec(spec: Any) -> AdapterSchedule:
    """Normalise any accepted per-adapter spec (see the module docstring) into an :class:`AdapterSchedule`."""
    if isinstance(spec, AdapterSchedule):
        return spec
    if isinstance(spec, bool):
        raise CompositionError(f"weight {spec!r} is a boolean, not a number")
    if isinstance(spec, (int, float)):
        return AdapterSchedule(weight=_finite(float(spec)))
    if isinstance(spec, Keyframes) or callable(spec):
        return AdapterSchedule(steps=spec)
    if isinstance(spec, str):
        text = spec.strip()
        if "@" in text:
            return AdapterSchedule(steps=parse_keyframes(text))
        if text.upper() in PRESET_NAMES:
            return AdapterSchedule(blocks=text.upper())
        if "," in text:
            return AdapterSchedule(blocks=parse_block_vector(text))
        return AdapterSchedule(weight=_parse_float(text, spec))
    if isinstance(spec, Mapping):
        unknown = set(spec) - {"weight", "blocks", "steps"}
        if unknown:
            raise CompositionError(f"unknown schedule keys {sorted(unknown)}", hint="use weight, blocks, steps")
        weight = spec.get("weight", 1.0)
        if isinstance(weight, bool) or not isinstance(weight, (int, float)):
            raise CompositionError(f"schedule weight must be a number, got {weight!r}")
        return AdapterSchedule(weight=_finite(float(weight)), blocks=spec.get("blocks"), steps=spec.get("steps"))
    if isinstance(spec, Sequence):
        return AdapterSchedule(blocks=tuple(_finite(float(v)) for v in spec))
    raise CompositionError(f"cannot read a weight schedule from {type(spec).__name__} {spec!r}")


def is_step_dependent(spec: Any) -> bool:
    """True when ``spec`` weights the steps of a generation differently (keyframes with more than one point, a
    callable, a mapping with such ``steps``): evaluating it needs each call's step index."""
    steps = parse_spec(spec).steps
    if steps is None:
        return False
    if isinstance(steps, str):
        steps = parse_keyframes(steps) if "@" in steps else None
    return not (isinstance(steps, Keyframes) and len(steps.points) == 1) and steps is not None


def _finite(value: float) -> float:
    return checked_weight(value, "weight")


def block_weights(blocks: BlockSpec | None, layout: BlockLayout) -> torch.Tensor:
    """Per-group weights (float64, ordered like ``layout.groups``) for a vector, vector string or preset name."""
    if blocks is None:
        return torch.ones(len(layout.groups), dtype=torch.float64)
    if isinstance(blocks, str):
        text = blocks.strip()
        if text.upper() in PRESET_NAMES:
            values = preset_vector(text, layout)
        elif "," in text:
            values = parse_block_vector(text)
        else:
            raise CompositionError(
                f"unknown block-weight preset {blocks!r}", hint=f"use one of {', '.join(PRESET_NAMES)} or a vector"
            )
    else:
        values = tuple(_finite(float(v)) for v in blocks)
    by_group = layout.vector_weights(values)
    return torch.tensor([by_group[g] for g in layout.groups], dtype=torch.float64)


def step_weights(steps: StepSpec | None, num_steps: int) -> torch.Tensor:
    """Per-step weights (float64, length ``num_steps``) for keyframes, a keyframe string or a callable."""
    if steps is None:
        return torch.ones(num_steps, dtype=torch.float64)
    if isinstance(steps, str):
        steps = parse_keyframes(steps)
    if isinstance(steps, Keyframes):
        return steps.values(num_steps)
    if callable(steps):
        values = []
        for step in range(num_steps):
            value = steps(step, num_steps)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise CompositionError(f"step schedule returned {value!r} at step {step}, not a number")
            values.append(checked_weight(value, f"step schedule value at step {step}"))
        return torch.tensor(values, dtype=torch.float64)
    raise CompositionError(f"cannot read a step schedule from {type(steps).__name__} {steps!r}")


@dataclass(frozen=True, eq=False)
class WeightTable:
    """``weights[adapter, group, step]`` for one generation, plus a step-major copy for O(1) per-step lookups.

    ``groups`` follow the :class:`~fusion.layer_groups.BlockLayout` it was built for, so a layer's column is
    ``layout.group_index(key)``. Text-encoder groups (``BASE``/``CLIP``/``T5``) are read at step 0: prompts
    are encoded once per generation.
    """

    adapters: tuple[str, ...]
    groups: tuple[str, ...]
    weights: torch.Tensor
    by_step: torch.Tensor

    @property
    def num_steps(self) -> int:
        """Number of steps the table covers."""
        return int(self.weights.shape[2])

    @property
    def is_static(self) -> bool:
        """True when no weight changes over steps (a composition that can be fused once)."""
        return bool((self.weights == self.weights[:, :, :1]).all())

    def at(self, step: int) -> torch.Tensor:
        """(adapters, groups) weights at ``step`` — a view, clamped to the last step for extra calls."""
        return self.by_step[min(max(step, 0), self.num_steps - 1)]

    def regroup(self, keys: Sequence[str], layout: BlockLayout) -> WeightTable:
        """The same table with one column per layer key (or group-prefix key) in ``keys``, via ``layout.group_of``.

        Lets an engine that gates per module (or per attention block) index the table by its own group order.
        """
        index = torch.tensor([self.groups.index(layout.group_of(key)) for key in keys], dtype=torch.long)
        weights = self.weights.index_select(1, index.to(self.weights.device))
        return WeightTable(self.adapters, tuple(keys), weights, weights.permute(2, 0, 1).contiguous())

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> WeightTable:
        """A copy on ``device`` / in ``dtype`` (do this once per generation, not per step)."""
        weights = self.weights.to(device=device, dtype=dtype)
        return WeightTable(self.adapters, self.groups, weights, weights.permute(2, 0, 1).contiguous())


def build_weight_table(
    specs: Mapping[str, Any],
    layout: BlockLayout,
    family: str | None = None,
    num_steps: int = 1,
    *,
    adapter_names: Sequence[str] | None = None,
) -> WeightTable:
    """Precompute ``weight[adapter, layer_group, step]`` (float32) for a generation of ``num_steps`` steps.

    ``specs`` maps adapter names to any spec :func:`parse_spec` accepts; ``layout`` is the denoiser's
    :class:`~fusion.layer_groups.BlockLayout` (its groups are the table's columns); ``family``, when given, must
    match it. ``adapter_names`` fixes the row order (an engine's attach order); adapters it lists that ``specs``
    omits get all-zero rows. Raises :class:`CompositionError` naming the adapter whose spec is wrong.
    """
    if family is not None and family != layout.family and "unknown" not in (family, layout.family):
        raise CompositionError(f"weight table asked for family {family!r} on a {layout.family} denoiser layout")
    if num_steps < 1:
        raise CompositionError(f"num_steps must be at least 1, got {num_steps}")
    names = tuple(specs) if adapter_names is None else tuple(adapter_names)
    unknown = [name for name in specs if name not in names]
    if unknown:
        raise CompositionError(f"schedules name adapters {unknown} that are not among {list(names)}")
    weights = torch.zeros(len(names), len(layout.groups), num_steps, dtype=torch.float64)
    for row, name in enumerate(names):
        if name not in specs:
            continue
        try:
            schedule = parse_spec(specs[name])
            groups = block_weights(schedule.blocks, layout)
            steps = step_weights(schedule.steps, num_steps)
        except CompositionError as error:
            raise CompositionError(f"adapter {name!r}: {error.reason}", hint=error.hint) from error
        weights[row] = schedule.weight * groups[:, None] * steps[None, :]
    weights = weights.float()
    return WeightTable(names, layout.groups, weights, weights.permute(2, 0, 1).contiguous())
