"""LoRA Composite (Zhong et al. 2024; docs/methods.md#lora-composite): every adapter every step, never merged,
predictions averaged.

    ẽ = (1/k) · Σᵢ mᵢ · [ eᵢ(z) + g·(eᵢ(z,c) − eᵢ(z)) ]

where eᵢ is the denoiser with only adapter i active (at its own weight spec — a number, block weights or
keyframes, see :mod:`fusion.schedules`) and mᵢ the mixing weight (option ``mix``, default 1 for all). The
unconditional branch carries adapter i too. CFG is linear, so averaging the k predictions of the CFG batch the
pipeline hands the denoiser and letting the pipeline apply CFG once gives exactly ẽ; this strategy therefore returns
(1/k)·Σᵢ mᵢ·denoiser_i(batch) and touches nothing else of the pipeline. Composed on the conditional branch only
(:mod:`fusion.cfg_branches`), eᵢ(z) is the base model's; with per-adapter shares the engine hands it each half
in turn, eᵢ(z) then carrying adapter i at its share of the weight.

Two modes:

- ``"sequential"`` — the reference: k denoiser calls per step, each with only adapter i's weights installed;
- ``"batched"`` (default) — ONE denoiser call on the batch repeated k times; per-sample gates in the composed
  layers give sample block i only adapter i. ``max_batch`` caps the samples of one call: the k copies are split
  into chunks of ⌊max_batch / B⌋ adapters (at least one), trading speed for activation memory.

Both run unfused (``fuse=True`` is refused). Prompts are encoded once per generation, before the first denoiser
call, so text-encoder layers see all adapters at once (Merge-style, each at its step-0 weight); the reference had
the same limitation.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch

from fusion.errors import CompositionError
from fusion.strategies import register
from fusion.strategies.base import StepContext, Strategy, check_in_composition, output_tensor

if TYPE_CHECKING:
    from fusion.engine import FusionEngine

MODES = ("batched", "sequential")


@register("composite")
class Composite(Strategy):
    """LoRA Composite. Options: ``mode`` (``"batched"`` or ``"sequential"``), ``max_batch`` (samples per batched
    call, ``None`` = all k copies at once), ``mix`` (adapter name → mixing weight mᵢ, default 1)."""

    def __init__(
        self,
        weights: dict[str, Any],
        *,
        fuse: bool | None = None,
        mode: str = "batched",
        max_batch: int | None = None,
        mix: Mapping[str, float] | None = None,
        **options: Any,
    ) -> None:
        if options:
            raise CompositionError(f"composite got unknown options {sorted(options)}", hint="use mode, max_batch, mix")
        if not weights:
            raise CompositionError("composite needs at least one adapter")
        if fuse:
            raise CompositionError(
                "composite cannot run fused: every step needs each adapter separately",
                hint="leave fuse unset (or False)",
            )
        if mode not in MODES:
            raise CompositionError(f"composite mode must be one of {MODES}, got {mode!r}")
        if max_batch is not None and (isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < 1):
            raise CompositionError(f"composite max_batch must be a whole number ≥ 1, got {max_batch!r}")
        mix = dict(mix or {})
        check_in_composition("composite mix", mix, weights)
        super().__init__(weights, fuse=False)
        self.mode = mode
        self.max_batch = max_batch
        self.mix = {name: float(mix.get(name, 1.0)) for name in weights}
        self._rows: list[int] = []
        self._mix: torch.Tensor | None = None
        self._per_adapter: torch.Tensor | None = None
        self._encode_weights: torch.Tensor | None = None

    def activate(self, engine: FusionEngine) -> None:
        """Install the text-encoder weights (all adapters) and a one-step table."""
        self._rows = [engine.adapter_names.index(name) for name in self.weights]
        self._build(engine, 1)

    def start_generation(self, engine: FusionEngine, num_steps: int) -> None:
        """Precompute, per step, each adapter's solo weights: (S, k, A, G)."""
        self._build(engine, num_steps)

    def _build(self, engine: FusionEngine, num_steps: int) -> None:
        table = engine.weight_table(self.weights, num_steps)  # (A, G, S)
        k, rows = len(self._rows), self._rows
        solo = torch.zeros(num_steps, k, *table.shape[:2], dtype=table.dtype, device=table.device)
        for i, row in enumerate(rows):
            solo[:, i, row, :] = table[row].T
        self._per_adapter = solo
        self._mix = torch.tensor([self.mix[name] for name in self.weights], device=table.device)
        self._encode_weights = table[:, :, 0].contiguous()
        engine.set_weights(self._encode_weights)

    def _chunks(self, batch: int) -> list[range]:
        k = len(self._rows)
        size = k if self.max_batch is None else max(1, self.max_batch // batch)
        return [range(start, min(start + size, k)) for start in range(0, k, size)]

    def step(self, ctx: StepContext) -> Any:
        """Run the k adapter passes (batched or one by one) and return their weighted average."""
        assert self._per_adapter is not None
        assert self._mix is not None
        engine = ctx.engine
        solo = self._per_adapter[min(ctx.step, self._per_adapter.shape[0] - 1)]  # (k, A, G)
        mix = self._mix
        total: torch.Tensor | None = None
        if self.mode == "sequential":
            for i in range(len(self._rows)):
                engine.set_weights(solo[i])
                prediction = output_tensor(ctx.run())
                term = prediction * mix[i].to(prediction.dtype)
                total = term if total is None else total + term
        else:
            for chunk in self._chunks(ctx.batch_size):
                engine.set_sample_weights(solo[chunk.start : chunk.stop].repeat_interleave(ctx.batch_size, dim=0))
                predictions = ctx.run_tiled(len(chunk))  # (kc, B, ...)
                weights = mix[chunk.start : chunk.stop].to(dtype=predictions.dtype, device=predictions.device)
                term = (predictions * weights.view(-1, *([1] * (predictions.dim() - 1)))).sum(0)
                total = term if total is None else total + term
            engine.set_sample_weights(None)
        engine.set_weights(self._encode_weights)
        assert total is not None
        return ctx.wrap(total / len(self._rows))

    def deactivate(self, engine: FusionEngine) -> None:
        """Switch per-sample gating off and forget the tables."""
        super().deactivate(engine)
        engine.set_sample_weights(None)
        self._per_adapter = None
        self._mix = None
        self._encode_weights = None
