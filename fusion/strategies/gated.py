"""Gated fusion (AutoLoRA, Li et al. 2025; docs/methods.md#gated-fusion): per-layer, per-timestep gates decide
each adapter's share.

Two modes (``mode=None`` picks ``"learned"`` when ``gates=`` is given, else ``"table"``):

- ``"learned"``: every composed linear layer of the denoiser gets a :class:`fusion.gates.LayerGate` from ``gates=``,
  a :class:`fusion.gates.GateBank` trained with ``compose train-gates`` (loaded by name in the composer layer). The
  layer computes b = W·x and every adapter's lₖ = wₖ·ΔWₖ·x, and the gate returns y = b + Σₖ u_out⊙gₖ⊙lₖ with gₖ
  depending on b, lₖ and the timestep. Layers without a gate in the bank, conv layers and text-encoder layers keep
  the plain weighted sum Σ wₖΔWₖ. Learned mode without a bank is refused: untrained gates are random attenuation.
  :func:`initial_gates` builds the reference-initialised bank that training starts from.
- ``"table"`` (training-free): the gate of adapter k at layer ℓ and step s is the weight table entry
  weight[k, group(ℓ), s] — from block-weight vectors, keyframes, callables (:mod:`fusion.schedules`) and optional
  retrieval ``scores`` that scale each adapter's row. Runs as an unfused weighted sum: one table lookup per step.

The adapter weights wₖ are the composition's weight specs in both modes (scheduled specs are looked up per step).
With ``record=True`` the mean gate per (step, layer, adapter) of each generation is kept in ``recorder``
(:class:`fusion.gates.GateRecorder`; the composer layer draws it as a heatmap). Never fused: the gates depend on
the input.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch

from fusion.errors import CompositionError, ShapeMismatchError
from fusion.gates import TIME_DIM, GateBank, GateRecorder
from fusion.layers import ComposedLayer, ComposedLinear
from fusion.strategies import register
from fusion.strategies.base import StepContext, Strategy, check_in_composition

if TYPE_CHECKING:
    from fusion.engine import FusionEngine

MODES = ("learned", "table")
_TEXT_PREFIXES = ("text_encoder.", "text_encoder_2.")


def _denoiser_layers(engine: FusionEngine) -> dict[str, ComposedLayer]:
    """The engine's composed layers inside the denoiser (not the text encoders)."""
    return {key: layer for key, layer in engine.layers.items() if not key.startswith(_TEXT_PREFIXES)}


def _gateable_layers(engine: FusionEngine) -> dict[str, ComposedLinear]:
    """The denoiser's composed linear layers that carry at least one low-rank adapter."""
    return {
        key: layer
        for key, layer in _denoiser_layers(engine).items()
        if isinstance(layer, ComposedLinear) and layer.rank > 0
    }


def initial_gates(engine: FusionEngine, *, seed: int = 0, time_dim: int = TIME_DIM) -> GateBank:
    """A reference-initialised, untrained bank for every gateable layer of the engine's attached adapters: the
    starting point of gate training (``compose train-gates``), never a stand-in for trained gates."""
    candidates = _gateable_layers(engine)
    if not candidates:
        raise CompositionError("no attached adapter adapts a linear layer of the denoiser: nothing to gate")
    features = {key: int(layer.base.weight.shape[0]) for key, layer in candidates.items()}
    return GateBank(features, time_dim=time_dim, seed=seed)


@register("gated")
class Gated(Strategy):
    """Gated fusion. Options: ``mode`` (``"learned"`` / ``"table"``; default: learned with ``gates``, else table),
    ``gates`` (a trained GateBank; learned mode), ``scores`` (adapter name → retrieval score scaling its weights),
    ``record`` (keep mean gates per step/layer/adapter)."""

    def __init__(
        self,
        weights: dict[str, Any],
        *,
        fuse: bool | None = None,
        mode: str | None = None,
        gates: GateBank | None = None,
        scores: Mapping[str, float] | None = None,
        record: bool = False,
        **options: Any,
    ) -> None:
        if options:
            raise CompositionError(
                f"gated got unknown options {sorted(options)}", hint="use mode, gates, scores, record"
            )
        if mode is None:
            mode = "table" if gates is None else "learned"
        if not weights:
            raise CompositionError("gated fusion needs at least one adapter")
        if fuse:
            raise CompositionError("gated fusion cannot run fused: the gates depend on each layer's input")
        if mode not in MODES:
            raise CompositionError(f"gated mode must be one of {MODES}, got {mode!r}")
        if gates is not None and not isinstance(gates, GateBank):
            raise CompositionError(
                f"gates must be a GateBank, got {type(gates).__name__}",
                hint="load a checkpoint by name through the pipeline (set_composition(..., gates='name'))",
            )
        if gates is not None and mode == "table":
            raise CompositionError("table mode takes no gates", hint="drop gates= or use mode='learned'")
        if gates is None and mode == "learned":
            raise CompositionError(
                "learned gated fusion needs trained gates; untrained ones would attenuate adapters at random",
                hint="train them with `compose train-gates` and pass gates=NAME (CLI: --gates NAME), "
                "or use the training-free mode='table'",
            )
        scores = dict(scores or {})
        check_in_composition("gated scores", scores, weights)
        super().__init__(weights, fuse=False)
        self.mode = mode
        self.gates = gates
        self.scores = {name: float(value) for name, value in scores.items()}
        self.record = bool(record)
        self.recorder: GateRecorder | None = None
        self.gated_layers: list[str] = []
        self._table: torch.Tensor | None = None
        self._installed_step = -1
        self._unet_time = True

    # ----- setup -----------------------------------------------------------------------------------------------

    def activate(self, engine: FusionEngine) -> None:
        """Install the step-0 weights; in learned mode give every covered denoiser linear layer its gate."""
        self._unet_time = engine.layout.is_unet
        self._build(engine, 1)
        if self.mode == "learned":
            self._attach_gates(engine)

    def _attach_gates(self, engine: FusionEngine) -> None:
        candidates = _gateable_layers(engine)
        if not candidates:
            raise CompositionError(
                "no adapter of the composition adapts a linear layer of the denoiser: nothing to gate"
            )
        bank = self.gates
        assert bank is not None  # learned mode always has a bank (checked in __init__)
        covered = [key for key in candidates if key in bank.index]
        if not covered:
            raise CompositionError(
                "the gate checkpoint has no gate for any layer these adapters adapt",
                hint="train gates for this model and these adapters with `compose train-gates`",
            )
        for key in covered:
            width = int(candidates[key].base.weight.shape[0])
            if bank.features(key) != width:
                raise ShapeMismatchError(f"gate for {key!r} has {bank.features(key)} features, the layer has {width}")
        bank.to(engine.state.device)
        for key in covered:
            candidates[key].mixer = bank.mix
        self.gated_layers = covered

    def _build(self, engine: FusionEngine, num_steps: int) -> None:
        """This generation's (A, G, S) weight table (scores folded in); installs its step-0 weights."""
        table = engine.weight_table(self.weights, num_steps)
        if self.scores:
            scale = torch.ones(table.shape[0], device=table.device)
            for name, score in self.scores.items():
                scale[engine.adapter_names.index(name)] = score
            table = table * scale[:, None, None]
        self._table = table
        self._installed_step = 0
        engine.set_weights(table[:, :, 0])

    def start_generation(self, engine: FusionEngine, num_steps: int) -> None:
        """Build the weight table for ``num_steps`` and, when recording, a fresh recorder."""
        self._build(engine, num_steps)
        if not self.record:
            return
        if self.mode == "learned":
            assert self.gates is not None
            self.recorder = GateRecorder(self.gated_layers, engine.adapter_names, num_steps, engine.state.device)
            self.gates.recorder = self.recorder
        else:
            self.recorder = self._table_record(engine, num_steps)

    def _table_record(self, engine: FusionEngine, num_steps: int) -> GateRecorder:
        """Table mode's gates are the table itself: weight[adapter, group(layer), step] where the adapter acts."""
        assert self._table is not None
        layers = _denoiser_layers(engine)
        recorder = GateRecorder(list(layers), engine.adapter_names, num_steps, torch.device("cpu"))
        table = self._table.cpu()
        for row, layer in enumerate(layers.values()):
            owners = sorted({engine.adapter_names.index(name) for name in layer.names})
            recorder.values[:, row, owners] = table[owners, layer.group, :].T
        return recorder

    # ----- per step --------------------------------------------------------------------------------------------

    def _time_fraction(self, timestep: Any) -> torch.Tensor | None:
        """The denoiser's timestep argument as fractions in [0, 1]: UNets take 0…1000, Flux-style DiTs t/1000."""
        if timestep is None:
            return None
        t = torch.as_tensor(timestep, dtype=torch.float32).reshape(-1)
        return t / 1000.0 if self._unet_time else t

    def step(self, ctx: StepContext) -> Any:
        """Install this step's weights (scheduled specs), hand the gates the timestep, run the denoiser once."""
        table = self._table
        if table is not None and table.shape[2] > 1 and ctx.step != self._installed_step:
            ctx.engine.set_weights(table[:, :, min(ctx.step, table.shape[2] - 1)])
            self._installed_step = ctx.step
        if self.mode == "learned" and self.gates is not None:
            self.gates.set_time(self._time_fraction(ctx.timestep))
        if self.recorder is not None:
            self.recorder.step = ctx.step
        return ctx.run()

    def deactivate(self, engine: FusionEngine) -> None:
        """Take the gates off every layer, stop recording, restore the plain zero weights."""
        for layer in engine.layers.values():
            layer.mixer = None
        if self.gates is not None:
            self.gates.recorder = None
            self.gates.set_time(None)
        self.gated_layers = []
        self._table = None
        super().deactivate(engine)
