"""Where a denoiser call sits in its generation, read from the pipeline's scheduler — never guessed.

:class:`StepClock` answers, for the denoiser call being made, (index into ``scheduler.timesteps``, their number):

- schedulers that keep a step index (Euler, DPM-Solver, UniPC, Heun, LCM, flow matching, …) say it: ``step_index``
  (set by ``scale_model_input`` or the previous ``step``), else ``begin_index`` (img2img), else 0 — the first call
  of a generation;
- schedulers without one (DDIM, DDPM, PNDM) are stateless in the step: the pipeline passes an exact element of
  ``scheduler.timesteps``, found with one dictionary lookup (built once per generation, integer timesteps only).

It answers None when the step cannot be known (no scheduler, no timesteps yet, a call outside a generation, a
timestep that is no element of the table); the engine then refuses compositions whose weights change over steps
(:class:`fusion.errors.StepUnknownError`). ``generation`` changes whenever the scheduler's timesteps are set anew.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch


class StepClock:
    """The step index of denoiser calls, from a scheduler (or a zero-argument callable returning the current one,
    so a pipeline whose scheduler is swapped keeps working)."""

    def __init__(self, scheduler: Any) -> None:
        self._scheduler: Callable[[], Any] = scheduler if callable(scheduler) else (lambda: scheduler)
        self._table: dict[int, int] = {}
        self._table_of: Any = None

    @property
    def generation(self) -> Any:
        """An object that changes whenever the scheduler's timesteps are set anew (a new generation)."""
        return getattr(self._scheduler(), "timesteps", None)

    def locate(self, timestep: Any) -> tuple[int, int] | None:
        """(step index, number of steps) of a denoiser call with timestep argument ``timestep``, or None."""
        scheduler = self._scheduler()
        timesteps = getattr(scheduler, "timesteps", None)
        if timesteps is None or len(timesteps) == 0:
            return None
        total = len(timesteps)
        if hasattr(scheduler, "step_index"):
            index = scheduler.step_index
            if index is None:
                index = getattr(scheduler, "begin_index", None) or 0
            return (int(index), total) if index < total else None
        index = self._exact_index(timesteps, timestep)
        return None if index is None else (index, total)

    def _exact_index(self, timesteps: Any, timestep: Any) -> int | None:
        """Position of ``timestep`` in integer ``timesteps`` (first occurrence), or None."""
        if timesteps is not self._table_of:
            values = timesteps.tolist() if isinstance(timesteps, torch.Tensor) else list(timesteps)
            self._table = {}
            for position, value in enumerate(values):
                if float(value).is_integer():
                    self._table.setdefault(int(value), position)
            self._table_of = timesteps
        if isinstance(timestep, torch.Tensor):
            if timestep.numel() == 0:
                return None
            timestep = timestep.reshape(-1)[0].item()
        if timestep is None or not float(timestep).is_integer():
            return None
        return self._table.get(int(timestep))
