"""Merge (docs/methods.md#merge): W' = W + Σᵢ wᵢ·ΔWᵢ.

Static weights (one value per adapter and group at every step) are fused into the base weights once — zero extra
cost per step. Scheduled weights (keyframes, callables), or ``fuse=False``, run unfused: each step installs that
step's column of the weight table, weight[adapter, group, step], with one O(1) lookup.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from fusion.errors import CompositionError
from fusion.schedules import parse_spec
from fusion.strategies import register
from fusion.strategies.base import StepContext, Strategy

if TYPE_CHECKING:
    from fusion.engine import FusionEngine


def _is_static(name: str, spec: Any) -> bool:
    """True when adapter ``name``'s weight spec does not change over steps (a spec error names the adapter)."""
    try:
        return parse_spec(spec).steps is None
    except CompositionError as error:
        raise CompositionError(f"adapter {name!r}: {error.reason}", hint=error.hint) from error


@register("merge")
class Merge(Strategy):
    """Weighted sum of adapter deltas; fused when the weights are static unless ``fuse=False``."""

    def __init__(self, weights: dict[str, Any], *, fuse: bool | None = None, **options: Any) -> None:
        if options:
            raise CompositionError(f"merge takes no options, got {sorted(options)}")
        super().__init__(weights, fuse=fuse)
        self._static = all(_is_static(name, spec) for name, spec in self.weights.items())
        if fuse and not self._static:
            raise CompositionError(
                "fuse=True needs weights that do not change over steps",
                hint="use fuse=None (auto) or fuse=False with scheduled weights",
            )
        self._table: torch.Tensor | None = None
        self._installed_step = -1
        self._fused = False

    def activate(self, engine: FusionEngine) -> None:
        """Fuse static weights now; otherwise install the step-0 weights (what text encoders see)."""
        probe = engine.weight_table(self.weights, 1)
        self._fused = self._static and self.fuse is not False
        if self._fused:
            engine.fuse(probe[:, :, 0])
        else:
            engine.set_weights(probe[:, :, 0])
        self._table = probe

    def start_generation(self, engine: FusionEngine, num_steps: int) -> None:
        """Build this generation's weight table (scheduled weights only)."""
        if not self._static:
            self._table = engine.weight_table(self.weights, num_steps)
            self._installed_step = -1

    def step(self, ctx: StepContext) -> Any:
        """Install this step's weights (unfused, scheduled) and run the denoiser once."""
        table = self._table
        if table is not None and table.shape[2] > 1 and ctx.step != self._installed_step:
            ctx.engine.set_weights(table[:, :, min(ctx.step, table.shape[2] - 1)])
            self._installed_step = ctx.step
        return ctx.run()

    def deactivate(self, engine: FusionEngine) -> None:
        """Restore pristine weights, zero the gates and forget the table."""
        super().deactivate(engine)
        self._fused = False
        self._table = None
