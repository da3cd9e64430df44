"""LoRA Switch (Zhong et al. 2024; docs/methods.md#lora-switch): one adapter active per step, rotating every τ steps.

The schedule (option ``switch_offset``):

- ``"reference"`` (default) — the published code's: it switches inside a step-end callback when ``t > 0 and
  t % τ == 0``, so the switch after step t takes effect at step t+1 and the first adapter runs τ+1 steps (steps
  0…τ), every later turn τ steps: active at 0-based step t = ``order[(max(t−1, 0) // τ) mod k]``;
- ``"uniform"`` — every turn exactly τ steps: active = ``order[(t // τ) mod k]``.

The default order puts known categories first, in the order the paper found best — character, clothing, style,
background, object (from ``Adapter.meta["category"]``) — and keeps the composition's order among the rest.

The active adapter gets its own weight spec (a number, block weights or keyframes, see :mod:`fusion.schedules`),
every other adapter 0; the whole (step, adapter, group) table is built once per generation, so a step is one
lookup and, only at a switch, one weight install. Weights are fused into the base weights at each switch (cost ≈
Merge) unless some spec changes every step or ``fuse=False``. After the last step the first adapter is
re-installed, so the next prompt encoding (which precedes the first denoiser call) sees the same adapter as the
first generation did.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch

from fusion.errors import CompositionError
from fusion.schedules import parse_spec
from fusion.strategies import register
from fusion.strategies.base import StepContext, Strategy, check_composition

if TYPE_CHECKING:
    from fusion.engine import FusionEngine

CATEGORY_ORDER = ("character", "clothing", "style", "background", "object")
"""Default switching order by adapter category (character first is best, style first worst, in the paper)."""

SWITCH_OFFSETS = ("reference", "uniform")
"""The switching schedules: the published code's (default) and τ steps for every turn."""


def active_index(step: int, tau: int, k: int, switch_offset: str = "reference") -> int:
    """Index (into the switching order) of the adapter active at 0-based ``step``."""
    turn = step // tau if switch_offset == "uniform" else max(step - 1, 0) // tau
    return turn % k


def category_order(names: Sequence[str], categories: Sequence[str | None]) -> list[str]:
    """``names`` sorted by :data:`CATEGORY_ORDER` of their category; unknown categories last, order kept."""
    rank = {category: i for i, category in enumerate(CATEGORY_ORDER)}
    keyed = [(rank.get((c or "").lower(), len(rank)), i, n) for i, (n, c) in enumerate(zip(names, categories))]
    return [name for _, _, name in sorted(keyed)]


@register("switch")
class Switch(Strategy):
    """LoRA Switch. Options: ``tau`` (steps per turn, default 5), ``order`` (``"category"`` (default),
    ``"given"`` or a list of the composition's adapter names), ``switch_offset`` (``"reference"``, the published
    schedule where the first adapter runs τ+1 steps (default), or ``"uniform"``, τ steps every turn)."""

    def __init__(
        self,
        weights: dict[str, Any],
        *,
        fuse: bool | None = None,
        tau: int = 5,
        order: str | Sequence[str] = "category",
        switch_offset: str = "reference",
        **options: Any,
    ) -> None:
        check_composition("switch", weights, options, "tau, order, switch_offset")
        if isinstance(tau, bool) or not isinstance(tau, int) or tau < 1:
            raise CompositionError(f"switch tau must be a whole number of steps ≥ 1, got {tau!r}")
        if switch_offset not in SWITCH_OFFSETS:
            raise CompositionError(f"switch_offset must be one of {SWITCH_OFFSETS}, got {switch_offset!r}")
        if not isinstance(order, str) and sorted(order) != sorted(weights):
            raise CompositionError(
                f"switch order {list(order)} must list each adapter of the composition once: {sorted(weights)}"
            )
        if isinstance(order, str) and order not in ("category", "given"):
            raise CompositionError(f"switch order must be 'category', 'given' or a list of names, got {order!r}")
        super().__init__(weights, fuse=fuse)
        self.tau = tau
        self.order_option = order
        self.switch_offset = switch_offset
        self.order: list[str] = []
        self._per_step: torch.Tensor | None = None
        self._segment: list[int] = []
        self._installed: int | None = None
        self._use_fuse = False

    @property
    def needs_steps(self) -> bool:
        """Several adapters take turns by step index."""
        return len(self.weights) > 1 or super().needs_steps

    def activate(self, engine: FusionEngine) -> None:
        """Resolve the order, decide fused vs unfused, install the first adapter (what text encoders see)."""
        names = list(self.weights)
        if self.order_option == "category":
            self.order = category_order(names, [engine.adapters[n].meta.get("category") for n in names])
        elif self.order_option == "given":
            self.order = names
        else:
            self.order = list(self.order_option)
        scheduled = any(parse_spec(spec).steps is not None for spec in self.weights.values())
        self._use_fuse = bool(self.fuse) or (self.fuse is None and not scheduled)
        self._build(engine, 1)
        self._install(engine, 0)

    def start_generation(self, engine: FusionEngine, num_steps: int) -> None:
        """Build this generation's (step, adapter, group) table with only the active adapter non-zero."""
        self._build(engine, num_steps)
        self._install(engine, 0)

    def _build(self, engine: FusionEngine, num_steps: int) -> None:
        table = engine.weight_table(self.weights, num_steps)  # (A, G, S)
        rows = [engine.adapter_names.index(name) for name in self.order]
        mask = torch.zeros(table.shape[0], num_steps, dtype=table.dtype, device=table.device)
        for step in range(num_steps):
            mask[rows[active_index(step, self.tau, len(rows), self.switch_offset)], step] = 1.0
        per_step = (table * mask[:, None, :]).permute(2, 0, 1).contiguous()  # (S, A, G)
        segment = [0]
        for step in range(1, num_steps):
            same = torch.equal(per_step[step], per_step[step - 1])
            segment.append(segment[-1] if same else step)
        self._per_step = per_step
        self._segment = segment
        self._installed = None

    def _install(self, engine: FusionEngine, step: int) -> None:
        """Install the weights of ``step`` unless the same weights (same segment) are already in place."""
        assert self._per_step is not None
        step = min(step, len(self._segment) - 1)
        if self._installed == self._segment[step]:
            return
        if self._use_fuse:
            engine.fuse(self._per_step[step])
        else:
            engine.set_weights(self._per_step[step])
        self._installed = self._segment[step]

    def step(self, ctx: StepContext) -> Any:
        """Install the active adapter of this step (a no-op between switches) and run the denoiser once."""
        self._install(ctx.engine, ctx.step)
        output = ctx.run()
        if ctx.step >= len(self._segment) - 1:
            self._install(ctx.engine, 0)
        return output

    def deactivate(self, engine: FusionEngine) -> None:
        """Forget the tables; the engine restores pristine weights."""
        super().deactivate(engine)
        self._per_step = None
        self._segment = []
        self._installed = None
