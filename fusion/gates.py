"""AutoLoRA gates (docs/methods.md#gated-fusion): one small gate module per composed linear layer, per layer AND
per timestep.

At a composed layer with base output b = W·x and per-adapter outputs lₖ = wₖ·ΔWₖ·x (from
:meth:`fusion.layers.ComposedLayer.adapter_outputs`, one batched op for all adapters):

    gₖ = sigmoid( LN_b(b)⊙u_b + LN_l(lₖ)⊙u_l + LN_b(b)⊙LN_l(lₖ)⊙u_c + β + τ(t) )
    y  = b + Σₖ u_out ⊙ gₖ ⊙ lₖ

u_b, u_l, u_c, β, u_out ∈ R^out, two LayerNorms; reference initialisation (DiffSynth-Studio's LoRA patcher): randn
for u_b/u_l/u_c/β, ones for u_out. The parameters are shared by every adapter at the layer, so one gate module serves
any number of adapters. Ours adds τ(t) = a linear projection of a sinusoidal embedding of the timestep (t in [0, 1]),
zero-initialised so a fresh gate equals the reference one and the timestep dependence is learned.

:class:`GateBank` holds the gates of a whole denoiser keyed by layer path, converts to and from a flat tensor dict
(checkpoints are written by the composer layer), carries the current timestep embedding, and optionally a
:class:`GateRecorder` that keeps the mean gate per (step, layer, adapter) for inspection (heatmaps).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
from diffusers.models.embeddings import get_timestep_embedding
from torch import nn

from fusion.errors import CompositionError, ShapeMismatchError

TIME_DIM = 32
"""Width of the sinusoidal timestep embedding fed to every gate's τ projection."""

TIME_SCALE = 1000.0
"""Timestep fractions are scaled to the scheduler's 0–1000 range before they are embedded."""

_SEPARATOR = ":"
"""Joins a layer path and a parameter name in flat tensor dicts (layer paths never contain it)."""


def timestep_embedding(t: torch.Tensor, dim: int = TIME_DIM) -> torch.Tensor:
    """Sinusoidal embedding (N, dim) of timesteps ``t`` (N,) given as fractions in [0, 1] (0 = clean): diffusers'
    embedding of ``1000·t`` with the sines first and frequencies 10000^(−i/(dim/2)) (the layout the shipped gates
    were trained with)."""
    return get_timestep_embedding(TIME_SCALE * t.float(), dim, flip_sin_to_cos=False, downscale_freq_shift=0)


class LayerGate(nn.Module):
    """The gate of one layer with ``features`` outputs (see the module docstring)."""

    def __init__(self, features: int, time_dim: int = TIME_DIM, generator: torch.Generator | None = None) -> None:
        super().__init__()
        self.u_b = nn.Parameter(torch.randn(features, generator=generator))
        self.u_l = nn.Parameter(torch.randn(features, generator=generator))
        self.u_c = nn.Parameter(torch.randn(features, generator=generator))
        self.beta = nn.Parameter(torch.randn(features, generator=generator))
        self.u_out = nn.Parameter(torch.ones(features))
        self.norm_b = nn.LayerNorm(features)
        self.norm_l = nn.LayerNorm(features)
        self.time = nn.Linear(time_dim, features)
        nn.init.zeros_(self.time.weight)
        nn.init.zeros_(self.time.bias)

    def gates(self, b: torch.Tensor, lora: torch.Tensor, temb: torch.Tensor | None) -> torch.Tensor:
        """g (K, …, out) for base output ``b`` (…, out), adapter outputs ``lora`` (K, …, out) and the timestep
        embedding ``temb`` (N, time_dim) of the N samples of the batch (or 1 for all), or None for no τ."""
        nb = self.norm_b(b)
        shared = torch.addcmul(self.beta, nb, self.u_b)
        if temb is not None:
            shared = shared + _per_sample(self.time(temb), b)
        mix = torch.addcmul(self.u_l, nb, self.u_c)
        logits = torch.addcmul(shared, self.norm_l(lora), mix)
        return logits.sigmoid_() if not torch.is_grad_enabled() else torch.sigmoid(logits)

    def forward(
        self, b: torch.Tensor, lora: torch.Tensor, temb: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(y, g): the gated layer output y = b + Σₖ u_out⊙gₖ⊙lₖ and the gates g, in ``b``'s dtype."""
        dtype = self.u_b.dtype
        b32, l32 = b.to(dtype), lora.to(dtype)
        g = self.gates(b32, l32, temb)
        total = g[0] * l32[0]
        for k in range(1, g.shape[0]):  # K fused multiply-adds: half the memory traffic of (g * l).sum(0)
            total.addcmul_(g[k], l32[k])
        return torch.addcmul(b32, total, self.u_out).to(b.dtype), g


def _per_sample(tau: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Shape (N, out) per-sample terms to add to ``b`` (N, …, out); one row broadcasts over the batch."""
    if tau.shape[0] != 1 and (b.dim() < 2 or tau.shape[0] != b.shape[0]):
        raise CompositionError(
            f"the gate's timestep input has {tau.shape[0]} rows but the layer's batch is {tuple(b.shape)}",
            hint="pass one timestep per sample of the batch, or a single one",
        )
    return tau.reshape(tau.shape[0], *([1] * (b.dim() - 2)), tau.shape[1]) if b.dim() >= 2 else tau[0]


class GateRecorder:
    """Mean gate per (step, layer, adapter) over a generation: ``values`` (S, L, A), NaN where nothing was seen.

    Every denoiser call of a step counts (CFG's halves run apart under shares, true-CFG pipelines call twice), so
    the record does not depend on how a pipeline batches its guidance. Values stay on the model's device while
    recording (no synchronisation per layer); :meth:`result` copies them to the CPU.
    """

    def __init__(
        self, layer_keys: Sequence[str], adapter_names: Sequence[str], num_steps: int, device: torch.device
    ) -> None:
        self.layer_keys = list(layer_keys)
        self.adapter_names = list(adapter_names)
        self.rows = {key: i for i, key in enumerate(self.layer_keys)}
        self.values = torch.full((num_steps, len(self.layer_keys), len(self.adapter_names)), math.nan, device=device)
        self._sums = torch.zeros_like(self.values)
        self._counts = torch.zeros_like(self.values)
        self.step = 0

    @torch.no_grad()
    def record(self, key: str, owners: torch.Tensor, gates: torch.Tensor) -> None:
        """Store the mean of ``gates`` (K, …) per adapter (``owners``: engine adapter index per row) at this step."""
        means = gates.detach().float().reshape(gates.shape[0], -1).mean(1)
        step, row = min(self.step, self.values.shape[0] - 1), self.rows[key]
        self._sums[step, row].index_add_(0, owners, means)
        self._counts[step, row].index_add_(0, owners, torch.ones_like(means))
        self.values[step, row] = self._sums[step, row] / self._counts[step, row]

    def result(self) -> torch.Tensor:
        """The recorded (S, L, A) values on the CPU."""
        return self.values.cpu()


class GateBank(nn.Module):
    """The gates of one denoiser, keyed by composed-layer path; ``features[key]`` is the layer's output width."""

    def __init__(self, features: Mapping[str, int], *, time_dim: int = TIME_DIM, seed: int = 0) -> None:
        super().__init__()
        if not features:
            raise CompositionError("a gate bank needs at least one layer", hint="attach adapters to linear layers")
        generator = torch.Generator().manual_seed(seed)
        self.keys = list(features)
        self.time_dim = time_dim
        self.gates = nn.ModuleList([LayerGate(int(features[k]), time_dim, generator) for k in self.keys])
        self.index = {key: i for i, key in enumerate(self.keys)}
        self.temb: torch.Tensor | None = None
        self.recorder: GateRecorder | None = None

    def features(self, key: str) -> int:
        """Output width of the gate for layer ``key``."""
        return int(self.gates[self.index[key]].u_b.shape[0])

    def set_time(self, t: torch.Tensor | None) -> None:
        """Install the timestep (fractions in [0, 1], one per sample or one for all) the next forward sees."""
        if t is None:
            self.temb = None
            return
        param = self.gates[0].u_b
        self.temb = timestep_embedding(t.reshape(-1).to(param.device), self.time_dim).to(param.dtype)

    def mix(self, layer: nn.Module, b: torch.Tensor, lora: torch.Tensor) -> torch.Tensor:
        """The :data:`fusion.layers.Mixer` for composed layers: gate ``layer``'s adapter outputs (and record)."""
        key = layer.key  # type: ignore[attr-defined]
        y, g = self.gates[self.index[key]](b, lora, self.temb)
        if self.recorder is not None:
            self.recorder.record(key, layer.output_owners, g)  # type: ignore[attr-defined]
        return y

    def to_tensors(self) -> dict[str, torch.Tensor]:
        """Every parameter as ``"<layer path>:<name>"`` → tensor (CPU, contiguous): a checkpoint's contents."""
        out: dict[str, torch.Tensor] = {}
        for key, gate in zip(self.keys, self.gates):
            for name, value in gate.state_dict().items():
                out[f"{key}{_SEPARATOR}{name}"] = value.detach().cpu().contiguous()
        return out

    @classmethod
    def from_tensors(cls, tensors: Mapping[str, torch.Tensor], *, time_dim: int = TIME_DIM) -> GateBank:
        """Rebuild a bank from :meth:`to_tensors` output (raises :class:`ShapeMismatchError` on a malformed dict)."""
        grouped: dict[str, dict[str, torch.Tensor]] = {}
        for name, value in tensors.items():
            key, sep, param = name.rpartition(_SEPARATOR)
            if not sep:
                raise ShapeMismatchError(f"gate tensor {name!r} is not named '<layer>{_SEPARATOR}<parameter>'")
            grouped.setdefault(key, {})[param] = value
        try:
            bank = cls({key: int(params["u_b"].shape[0]) for key, params in grouped.items()}, time_dim=time_dim)
            for key, params in grouped.items():
                bank.gates[bank.index[key]].load_state_dict(params)
        except (KeyError, RuntimeError) as error:
            raise ShapeMismatchError(f"gate tensors do not form gate modules: {error}") from error
        return bank
