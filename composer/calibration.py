"""An adapter's calibrated default weight, measured from the adapter and the base model alone.

Adapters differ in strength the way community LoRAs do (another learning rate, alpha or training length): at weight 1
one barely shows, another paints over the whole prompt. Calibration measures how much an adapter moves the denoiser's
prediction, relative to how much the prompt itself moves it (the guidance signal), and picks the weight at which that
ratio equals one global target, :data:`composer.calibration_store.TARGET`.

The measure (docs/methods.md#calibration). Probe prompts are the adapter's trigger words (or, for a file that names
none, its catalog title) in :data:`FRAMES`, generic sentence frames. The base model (no adapter) generates from a fixed
seed (:data:`SEED`) for :data:`STEPS` steps at CFG :data:`GUIDANCE`; its denoiser inputs at :data:`PROBE_STEPS` are
kept. At each kept input x_t the base model's conditional and unconditional predictions give the guidance signal
g = e(x_t, c) − e(x_t); with the adapter merged at weight w (denoiser and text encoder) the conditional prediction
moves by d(w) = e_w(x_t, c) − e(x_t, c). Both are reduced per latent position (the norm over channels) to the mean of
their largest :data:`TOP_SHARE` of positions, so an adapter that draws a small object is measured where it acts,
not diluted by the whole image. The ratio

    R(w) = Σ top(d(w)) / Σ top(g)        (sums over probe prompts and kept steps)

is not linear in w (large effects saturate), so the calibrated weight solves R(w) = TARGET by a short
bracketed search on log w within [:data:`MIN_WEIGHT`, :data:`MAX_WEIGHT`]; an adapter whose ratio stays off target at
an end of that range gets that end and is marked ``capped``. Everything is fixed (prompts, seed, steps), so the
result is a deterministic function of the adapter file and the base model.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from composer.calibration_store import TARGET, Calibration, store, stored
from composer.results import ChosenAdapter
from fusion.adapters import Adapter
from fusion.cfg_branches import cfg_halves
from fusion.errors import ComposerError
from weights_index.hashing import file_sha256

logger = logging.getLogger(__name__)

FRAMES = ("a picture of {}", "an image showing {}, detailed")
"""Generic sentence frames the probe subject is put in (none of them is a toy-world caption phrasing)."""
NEUTRAL_SUBJECT = "a picture"
"""The probe subject of an adapter with neither trigger words nor a usable title."""
SEED = 0
STEPS = 8
GUIDANCE = 3.0
PROBE_STEPS = (0, 3, 6)
"""Steps (of :data:`STEPS`) whose denoiser inputs are probed."""
TOP_SHARE = 0.1
"""Share of latent positions, largest first, that a prediction difference is measured on."""
MIN_WEIGHT = 0.125
MAX_WEIGHT = 4.0
TOLERANCE = 0.02
"""The search stops when |log(R(w) / target)| is below this."""
MAX_EVALUATIONS = 6
"""Weights the search evaluates at most (the starting weight 1 included)."""
SLOPE_RANGE = (0.2, 3.0)
"""The slopes d log R / d log w the search extrapolates with (1 until two weights are known)."""


class CalibrationError(ComposerError):
    """An adapter could not be calibrated on this pipeline (unsupported pipeline, bad adapter, no guidance signal)."""


def probe_prompts(trigger_words: Sequence[str], title: str | None = None) -> list[str]:
    """The probe prompts of an adapter: its trigger words (joined) in each of :data:`FRAMES`; without trigger words,
    its title (underscores as spaces); without either, :data:`NEUTRAL_SUBJECT`."""
    words = [w.strip() for w in trigger_words if w and w.strip()]
    subject = ", ".join(words) or (title or "").replace("_", " ").strip() or NEUTRAL_SUBJECT
    return [frame.format(subject) for frame in FRAMES]


@dataclass
class _Probe:
    """The base model's denoiser inputs kept along its trajectory, and its predictions there."""

    inputs: list[tuple[tuple[Any, ...], dict[str, Any]]]
    conditional: list[torch.Tensor]
    guidance_top: float


def _top_mean(difference: torch.Tensor) -> torch.Tensor:
    """Per sample: the mean over the largest :data:`TOP_SHARE` of positions of the channel norm of ``difference``."""
    norms = difference.float().norm(dim=1).flatten(1)
    count = max(1, round(norms.shape[1] * TOP_SHARE))
    return norms.topk(count, dim=1).values.mean(dim=1)


class _StopGenerationError(Exception):
    """Raised by :class:`_Recorder` once it holds every call it keeps: the rest of the generation is not needed."""


class _Recorder:
    """A forward pre-hook on the denoiser that keeps the inputs of chosen calls and stops the generation after the
    last of them."""

    def __init__(self, keep: Sequence[int]) -> None:
        self.keep = set(keep)
        self.calls = 0
        self.inputs: list[tuple[tuple[Any, ...], dict[str, Any]]] = []

    def __call__(self, module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        if self.calls in self.keep:
            self.inputs.append((_detached(args), _detached(kwargs)))
        self.calls += 1
        if self.calls > max(self.keep):
            raise _StopGenerationError


def _detached(value: Any) -> Any:
    """A copy of a nested call argument with every tensor cloned (the pipeline reuses its buffers)."""
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    if isinstance(value, dict):
        return {key: _detached(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_detached(item) for item in value)
    return value


def _prediction(output: Any) -> torch.Tensor:
    """The predicted tensor of a denoiser's output (``.sample``, a tuple's first item, or the tensor)."""
    if hasattr(output, "sample"):
        return output.sample
    if isinstance(output, (tuple, list)):
        return output[0]
    return output


class Calibrator:
    """Calibrates adapters on one composable pipeline (SD 1.x/2.x, SDXL: any denoiser called with CFG batches).

    The base trajectory of the probe prompts is computed once per prompt set and reused for every weight tried.
    """

    def __init__(self, pipe: Any, *, target: float = TARGET, size: int | None = None) -> None:
        if not math.isfinite(target) or target <= 0:
            raise CalibrationError(f"the calibration target must be a positive number, got {target!r}")
        if not hasattr(pipe, "set_composition"):
            raise CalibrationError("calibration needs a composable pipeline", hint="wrap it with make_composable(pipe)")
        self.pipe = pipe
        self.target = target
        self.size = size
        self._probes: dict[tuple[str, ...], _Probe] = {}

    def _call(self, prompts: Sequence[str], steps: int) -> None:
        call: dict[str, Any] = {
            "prompt": list(prompts),
            "num_inference_steps": steps,
            "guidance_scale": GUIDANCE,
            "output_type": "latent",
            "generator": torch.Generator(device="cpu").manual_seed(SEED),
        }
        if self.size:
            call.update(height=self.size, width=self.size)
        with torch.inference_mode():
            self.pipe(**call)

    def _recorded(self, prompts: Sequence[str], steps: int, keep: Sequence[int]) -> list[tuple[tuple, dict]]:
        """The denoiser inputs of calls ``keep`` of a ``steps``-step generation of ``prompts``."""
        recorder = _Recorder(keep)
        handle = self.pipe.denoiser().register_forward_pre_hook(recorder, with_kwargs=True)
        try:
            self._call(prompts, steps)
        except _StopGenerationError:
            pass
        finally:
            handle.remove()
        if len(recorder.inputs) != len(keep):
            raise CalibrationError(
                f"{type(self.pipe).__name__} called its denoiser {recorder.calls} times in {steps} steps; "
                "calibration needs one CFG-batched call per step",
                hint="give the adapter an explicit weight (<lora:name:0.8>)",
            )
        return recorder.inputs

    def _denoise(self, args: tuple[Any, ...], kwargs: dict[str, Any], prompts: int) -> torch.Tensor:
        """The denoiser's prediction for one kept call of a generation of ``prompts`` prompts (a CFG batch)."""
        with torch.inference_mode():
            prediction = _prediction(self.pipe.denoiser()(*args, **kwargs))
        if prediction.shape[0] != 2 * prompts:
            raise CalibrationError(
                f"{type(self.pipe).__name__} runs without a CFG batch (guidance-distilled models such as FLUX.1): "
                "there is no guidance signal to calibrate against",
                hint="give the adapter an explicit weight (<lora:name:0.8>)",
            )
        return prediction

    def _probe(self, prompts: tuple[str, ...]) -> _Probe:
        """The base model's kept inputs and predictions for ``prompts`` (computed once per prompt set)."""
        if prompts not in self._probes:
            self.pipe.clear_composition()
            inputs = self._recorded(prompts, STEPS, PROBE_STEPS)
            conditional, guidance = [], 0.0
            for args, kwargs in inputs:
                unconditional, cond = self._denoise(args, kwargs, len(prompts)).chunk(2)  # diffusers' CFG order
                conditional.append(cond)
                guidance += float(_top_mean(cond - unconditional).sum())
            if not guidance > 0:
                raise CalibrationError("the base model shows no guidance signal on the probe prompts")
            self._probes[prompts] = _Probe(inputs, conditional, guidance)
        return self._probes[prompts]

    def ratio(self, name: str, weight: float, prompts: Sequence[str]) -> float:
        """R(weight) of the registered adapter ``name`` on ``prompts`` (the composition is cleared afterwards)."""
        probe = self._probe(tuple(prompts))
        self.pipe.set_composition({name: weight}, method="merge")
        try:
            ((_, text_kwargs),) = self._recorded(prompts, STEPS, (0,))
            effect = 0.0
            for (args, kwargs), base in zip(probe.inputs, probe.conditional):
                moved = {**text_kwargs, **{k: v for k, v in kwargs.items() if k in _LATENT_KEYS}}
                _, (cond_args, cond_kwargs) = cfg_halves(args, moved, 2 * base.shape[0], frozenset())
                with torch.inference_mode():
                    cond = _prediction(self.pipe.denoiser()(*cond_args, **cond_kwargs))
                effect += float(_top_mean(cond - base).sum())
        finally:
            self.pipe.clear_composition()
        return effect / probe.guidance_top

    def calibrate(self, adapter: Adapter, name: str | None = None) -> Calibration:
        """Calibrate ``adapter`` (registered on the pipeline for the measurement if it is not already)."""
        meta = adapter.meta or {}
        prompts = probe_prompts(meta.get("trigger_words") or (), meta.get("title") or adapter.name)
        key = name or adapter.name
        added = key not in self.pipe.adapters
        if added:
            key = self.pipe.add_adapter(adapter, name=key)
        try:
            return self.solve(lambda w: self.ratio(key, w, prompts), prompts)
        finally:
            if added:
                self.pipe.remove_adapter(key)

    def solve(self, ratio: Callable[[float], float], prompts: Sequence[str] = ()) -> Calibration:
        """The weight w in [MIN_WEIGHT, MAX_WEIGHT] with ``ratio(w)`` = target, found on log w from w = 1: secant
        steps in log-log space (slope 1 until two weights are known, clamped to :data:`SLOPE_RANGE`) until the target
        is bracketed, then interpolation inside the bracket (bisection when that stalls). ``ratio`` must grow with w.
        """
        target = math.log(self.target)
        low, high = math.log(MIN_WEIGHT), math.log(MAX_WEIGHT)
        seen: dict[float, float] = {}
        points: list[tuple[float, float]] = []

        def evaluate(log_w: float) -> tuple[float, float]:
            value = ratio(math.exp(log_w))
            if not math.isfinite(value) or value <= 0:
                raise CalibrationError(f"the adapter's effect at weight {math.exp(log_w):.3g} is {value!r}")
            seen[log_w] = value
            points.append((log_w, math.log(value) - target))
            return points[-1]

        best = evaluate(0.0)
        while abs(best[1]) >= TOLERANCE and len(points) < MAX_EVALUATIONS:
            below = [p for p in points if p[1] < 0]
            above = [p for p in points if p[1] > 0]
            if below and above:
                a, fa = max(below)
                b, fb = min(above)
                guess = a - fa * (b - a) / (fb - fa)
                lo, hi = min(a, b), max(a, b)
                if not lo + 0.1 * (hi - lo) <= guess <= hi - 0.1 * (hi - lo):
                    guess = (a + b) / 2
            else:
                last = points[-1]
                slope = 1.0
                if len(points) > 1 and points[-1][0] != points[-2][0]:
                    slope = (points[-1][1] - points[-2][1]) / (points[-1][0] - points[-2][0])
                slope = min(max(slope, SLOPE_RANGE[0]), SLOPE_RANGE[1])
                guess = min(max(last[0] - last[1] / slope, low), high)
                if guess == last[0]:
                    return self._result(guess, seen, prompts, capped=True)
            point = evaluate(guess)
            best = min(best, point, key=lambda item: abs(item[1]))
        return self._result(best[0], seen, prompts, capped=False)

    def _result(self, log_w: float, seen: dict[float, float], prompts: Sequence[str], *, capped: bool) -> Calibration:
        return Calibration(
            weight=round(math.exp(log_w), 4),
            ratio_at_one=round(seen[0.0], 4),
            ratio=round(seen[log_w], 4),
            target=self.target,
            capped=capped,
            probes=tuple(prompts),
        )


_LATENT_KEYS = ("sample", "hidden_states", "timestep")
"""Denoiser keyword arguments that carry the latent and the step, kept from the base trajectory."""


_FILE_CALIBRATIONS: dict[tuple[str, str], Calibration] = {}
"""Calibrations of adapters named by file path (no catalog to keep them in), by (file SHA-256, model identity)."""


def catalog_calibration(calibrator: Calibrator, library: Any, entry: Any, identity: str) -> Calibration:
    """The calibration of the catalogued ``entry`` on the model ``identity``: the stored one when current, else
    measured now on the calibrator's pipeline and stored."""
    found = stored(entry, identity)
    if found is not None:
        return found
    logger.info("calibrating %s on %s (none stored for this file and model)", entry.name, identity)
    adapter = calibrator.pipe.read_catalog_adapter(library, entry)
    result = calibrator.calibrate(adapter, entry.name)
    store(library, entry, identity, result)
    logger.info("%s: %s", entry.name, result.describe())
    return result


def file_calibration(calibrator: Calibrator, path: str | Path, identity: str) -> Calibration:
    """The calibration of the adapter file ``path`` on the model ``identity``, measured once per process per file
    content (a file outside a library has no catalog to keep it in)."""
    key = (file_sha256(path), identity)
    if key not in _FILE_CALIBRATIONS:
        logger.info("calibrating %s on %s", path, identity)
        adapter = calibrator.pipe.read_adapter_file(path)
        _FILE_CALIBRATIONS[key] = calibrator.calibrate(adapter, f"calibrating:{Path(path).name}")
    return _FILE_CALIBRATIONS[key]


def apply_calibrated_weights(chosen: Sequence[ChosenAdapter], calibration: Callable[[str], Calibration]) -> None:
    """Give every chosen adapter whose request names no weight (picked by ``loras="auto"``, ``<lora:name>``, a bare
    name) the weight ``calibration(name)`` measures. Where the model offers no guidance signal to calibrate against
    (FLUX.1), the adapter keeps the weight it had (its card's, else 1) and its reasons say why."""
    for item in chosen:
        if item.request.weight_given or item.request.is_scheduled:
            continue
        try:
            calibrated = calibration(item.name)
        except CalibrationError as error:
            logger.warning("%s keeps weight %s, not calibrated: %s", item.name, item.weight, error)
            item.reasons.append(f"weight {item.weight} (not calibrated: {error})")
            continue
        item.request = replace(item.request, weight=calibrated.weight, weight_given=True)
        item.reasons = [r for r in item.reasons if not r.startswith("weight ")] + [calibrated.describe()]
