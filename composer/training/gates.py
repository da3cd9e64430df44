"""Gate training for gated fusion (docs/methods.md#gated-fusion), gate checkpoints by name, and gate heatmaps.

Training: the base model and every adapter stay frozen; only the per-layer gates of :mod:`fusion.gates` learn, on
the ordinary denoising loss over images of the composed concepts — noise (or v) prediction on SD 1.x/2.x/SDXL
UNets (:class:`composer.training.shira.DenoisingObjective`), flow matching on FLUX.1 transformers
(:class:`FlowMatchingObjective`: x_σ = (1−σ)·x + σ·ε, target ε − x, σ logit-normal). The adapters are attached
through a :class:`fusion.engine.FusionEngine` with the ``gated`` strategy, so training runs exactly the layers and
gates inference uses, timestep input included. ``accelerate`` (CPU in tests, a GPU with mixed precision in
production), a tqdm progress bar and periodic checkpoints, like SHiRA training.

Checkpoints are safetensors (``<layer path>:<parameter>`` tensors) with JSON metadata (format, version, family,
adapters, weights, time_dim, steps). A bare name resolves to ``<gates dir>/<name>.safetensors`` where the gates
dir is ``$LORA_COMPOSER_GATES``, else ``$LORA_COMPOSER_CACHE/gates``, else ``~/.cache/lora-composer/gates``;
anything with a suffix or a path separator is a path.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from diffusers import FluxPipeline, FluxTransformer2DModel
from safetensors.torch import save_file
from torch import nn

from composer.presets import preset_family
from composer.settings import cache_root
from composer.training.data import ImageCaptionFolder
from composer.training.flux import encode_flux_prompts, flux_velocity
from composer.training.loop import LoopSettings, Objective, TrainResult, frozen_accelerator, optimise_with
from composer.training.shira import DenoisingObjective
from fusion.adapters import Adapter
from fusion.engine import FusionEngine
from fusion.errors import AdapterFormatError, ComposerError, TrainingError
from fusion.gates import TIME_DIM, GateBank, GateRecorder
from fusion.strategies.gated import Gated, initial_gates
from weights_index.reader import read_adapter
from weights_index.safetensors_file import load_tensors, read_header

GATES_ENV = "LORA_COMPOSER_GATES"
FORMAT = "lora-composer-gates"
FORMAT_VERSION = "1"
_TEXT_ENCODERS = ("text_encoder", "text_encoder_2")
DEFAULT_FLUX_RESOLUTION = 512
"""Training size on FLUX.1 when --resolution is not given (the UNets train at their native size)."""


# ----- checkpoints -------------------------------------------------------------------------------------------------


def gates_dir() -> Path:
    """Folder where gate checkpoints are saved and found by name (see the module docstring)."""
    explicit = os.environ.get(GATES_ENV)
    if explicit:
        return Path(explicit).expanduser()
    return cache_root() / "gates"


def gate_path(name_or_path: str | Path) -> Path:
    """The checkpoint file for a gate name (``style-mix``) or a path (``out/gates.safetensors``)."""
    text = str(name_or_path)
    if isinstance(name_or_path, Path) or os.sep in text or "/" in text or Path(text).suffix:
        return Path(text).expanduser()
    if not text or text.startswith("."):
        raise ComposerError(f"{text!r} is not a valid gate checkpoint name", hint="use letters, digits, - and _")
    return gates_dir() / f"{text}.safetensors"


def save_gates(bank: GateBank, name_or_path: str | Path, metadata: Mapping[str, Any] | None = None) -> Path:
    """Write ``bank`` as a checkpoint (atomic replace); ``metadata`` is stored as JSON. Returns the path."""
    path = gate_path(name_or_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    info = {"time_dim": bank.time_dim, "layers": len(bank.keys), **dict(metadata or {})}
    header = {"format": FORMAT, "format_version": FORMAT_VERSION, "gates": json.dumps(info, sort_keys=True)}
    temp = path.with_name(f".{path.name}.tmp")
    try:
        save_file(bank.to_tensors(), str(temp), metadata=header)
        os.replace(temp, path)
    finally:
        if temp.exists():
            temp.unlink()
    return path


def gate_metadata(name_or_path: str | Path) -> dict[str, Any]:
    """The JSON metadata of a gate checkpoint (reads the header only)."""
    path = gate_path(name_or_path)
    if not path.is_file():
        raise ComposerError("no gate checkpoint here", path=path, hint="train one with `compose train-gates`")
    header = read_header(path)
    if header.metadata.get("format") != FORMAT:
        raise AdapterFormatError("not a gate checkpoint (format metadata missing)", path=path)
    try:
        return dict(json.loads(header.metadata.get("gates", "{}")))
    except ValueError as error:
        raise AdapterFormatError(f"gate metadata is not JSON: {error}", path=path) from error


def load_gates(name_or_path: str | Path) -> GateBank:
    """Load a gate checkpoint by name or path into a :class:`fusion.gates.GateBank` (CPU, fp32)."""
    meta = gate_metadata(name_or_path)
    path = gate_path(name_or_path)
    tensors = {k: v.float() for k, v in load_tensors(path).items()}
    try:
        return GateBank.from_tensors(tensors, time_dim=int(meta.get("time_dim", TIME_DIM)))
    except ComposerError as error:
        raise AdapterFormatError(error.reason, path=path) from error


# ----- inspection --------------------------------------------------------------------------------------------------


def write_gate_heatmap(recorder: GateRecorder, path: str | Path, *, title: str = "mean gate") -> Path:
    """A PNG with one heatmap per adapter: layers (rows) × steps (columns), colour = mean gate (blank = unused)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    values = recorder.result().numpy()  # (S, L, A)
    steps, layers, adapters = values.shape
    figure, axes = plt.subplots(
        1, adapters, figsize=(2.0 + 2.4 * adapters, 1.5 + 0.12 * layers), squeeze=False, constrained_layout=True
    )
    finite = values[~(values != values)]
    low, high = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
    image = None
    for index, axis in enumerate(axes[0]):
        image = axis.imshow(values[:, :, index].T, aspect="auto", interpolation="nearest", vmin=low, vmax=high)
        axis.set_title(recorder.adapter_names[index], fontsize=9)
        axis.set_xlabel("step")
        axis.set_yticks(range(layers))
        axis.set_yticklabels(recorder.layer_keys if index == 0 else [""] * layers, fontsize=4)
        axis.set_xticks(range(steps))
    if image is not None:
        figure.colorbar(image, ax=list(axes[0]), label=title)
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(target, dpi=120)
    plt.close(figure)
    return target


# ----- objectives --------------------------------------------------------------------------------------------------


class FlowMatchingObjective(Objective):
    """Flow-matching loss of a FLUX.1 transformer on a fixed image set; latents and prompts are encoded once."""

    def __init__(self, pipe: Any, dataset: ImageCaptionFolder, *, device: torch.device) -> None:
        self.device = device
        vae = pipe.vae
        shift = float(getattr(vae.config, "shift_factor", 0.0) or 0.0)
        scale = float(vae.config.scaling_factor)
        self.guidance = 1.0 if pipe.transformer.config.guidance_embeds else None
        with torch.no_grad():
            pixels = torch.stack(dataset.images).to(device=device, dtype=vae.dtype)
            dist = vae.encode(pixels).latent_dist
            mean = (dist.mean.float() - shift) * scale
            self.latent_std = dist.std.float() * scale
            self.latent_mean = mean
            channels, height, width = mean.shape[1:]
            self.shape = (int(channels), int(height), int(width))
            self.img_ids = FluxPipeline._prepare_latent_image_ids(1, height // 2, width // 2, device, torch.float32)
        self.prompts = encode_flux_prompts(pipe, dataset.captions, device=device, max_sequence_length=64)

    def __len__(self) -> int:
        return int(self.latent_mean.shape[0])

    def loss(self, transformer: nn.Module, indices: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Velocity MSE on the images ``indices``: latents, noise and logit-normal σ drawn from ``generator``."""
        mean, std = self.latent_mean[indices], self.latent_std[indices]
        latents = mean + std * torch.randn(mean.shape, generator=generator).to(mean.device)
        batch = latents.shape[0]
        channels, height, width = self.shape
        clean = FluxPipeline._pack_latents(latents, batch, channels, height, width)
        noise = torch.randn(clean.shape, generator=generator).to(clean.device)
        sigma = torch.sigmoid(torch.randn(batch, generator=generator)).to(clean.device)
        noisy = (1 - sigma[:, None, None]) * clean + sigma[:, None, None] * noise
        prediction = flux_velocity(
            transformer, noisy, sigma, guidance=self.guidance, prompts=self.prompts, rows=indices, img_ids=self.img_ids
        )
        return torch.nn.functional.mse_loss(prediction.float(), (noise - clean).float())


# ----- the training run --------------------------------------------------------------------------------------------


@dataclass
class GateTrainConfig(LoopSettings):
    """Options of one gate training run (the ``compose train-gates`` flags)."""

    adapters: Sequence[Path]
    data: Path
    out: str | Path
    weights: Sequence[float] | None = None
    prompt: str = ""
    resolution: int | None = None
    checkpoint_every: int = 0
    time_dim: int = TIME_DIM
    steps: int = field(default=500, kw_only=True)
    learning_rate: float = field(default=1e-3, kw_only=True)


@dataclass
class GateTrainResult(TrainResult):
    """What a run produced: the trained gates, where they were saved, the losses and the checkpoints written."""

    gates: GateBank


def _read_adapters(paths: Sequence[Path], family: str, shapes: Mapping[str, tuple[int, ...]]) -> list[Adapter]:
    """Read the files as the mixin does: with the model's shapes (LyCORIS conv factors are stored flattened)."""
    adapters = [read_adapter(path, None if family == "unknown" else family, shapes=shapes) for path in paths]
    names = [adapter.name for adapter in adapters]
    if len(set(names)) != len(names):
        raise TrainingError(f"adapter names must differ, got {names}", hint="rename one of the files")
    return adapters


def train_gates(pipe: Any, config: GateTrainConfig) -> GateTrainResult:
    """Train gated-fusion gates for ``config.adapters`` on ``pipe`` (see the module docstring) and save them.

    The pipeline is left as it was: adapters are attached only for the run and detached bit-exactly after.
    """
    if config.steps < 1 or config.batch_size < 1:
        raise TrainingError("steps and batch size must be positive")
    if not config.adapters:
        raise TrainingError("no adapters to gate", hint="pass --adapters a.safetensors,b.safetensors")
    weights = list(config.weights) if config.weights is not None else [1.0]
    if len(weights) == 1:
        weights = weights * len(config.adapters)
    if len(weights) != len(config.adapters):
        raise TrainingError(f"{len(weights)} weights for {len(config.adapters)} adapters")
    family = preset_family(pipe)
    flux = isinstance(getattr(pipe, "transformer", None), FluxTransformer2DModel)
    denoiser: nn.Module = pipe.transformer if flux else pipe.unet
    accelerator = frozen_accelerator(pipe, config.mixed_precision)
    torch.manual_seed(config.seed)
    engine = FusionEngine(
        denoiser, text_encoders={name: getattr(pipe, name, None) for name in _TEXT_ENCODERS}, family=family
    )
    try:
        adapters = _read_adapters(config.adapters, family, engine.expected_shapes)
        engine.add_adapters(adapters)
        composition = {adapter.name: float(w) for adapter, w in zip(adapters, weights)}
        bank = initial_gates(engine, seed=config.seed, time_dim=config.time_dim)
        engine.set_strategy(Gated(composition, gates=bank))
        bank.float().requires_grad_(True)
        native = DEFAULT_FLUX_RESOLUTION if flux else int(denoiser.config.sample_size) * int(pipe.vae_scale_factor)
        size = config.resolution or native
        dataset = ImageCaptionFolder(config.data, prompt=config.prompt, size=size, seed=config.seed)
        objective: Any = (
            FlowMatchingObjective(pipe, dataset, device=accelerator.device)
            if flux
            else DenoisingObjective(pipe, dataset, device=accelerator.device)
        )
        denoiser.eval()
        initial_loss = objective.evaluate(denoiser)
        meta = {
            "family": family,
            "adapters": [a.name for a in adapters],
            "adapter_files": [str(p) for p in config.adapters],
            "weights": weights,
            "learning_rate": config.learning_rate,
        }
        result = optimise_with(
            config,
            accelerator,
            denoiser,
            bank.parameters(),
            objective,
            desc="train-gates",
            prepare_model=False,
            checkpoint_every=config.checkpoint_every,
            save_checkpoint=lambda _, path, step: save_gates(bank, path, {**meta, "steps": step}),
            final_path=gate_path(config.out),
        )
        final_loss = objective.evaluate(denoiser)
    finally:
        engine.clear()
    bank.requires_grad_(False)
    path = save_gates(bank, config.out, {**meta, "steps": config.steps, "final_loss": final_loss})
    return result.report(GateTrainResult, bank, path=path, initial_loss=initial_loss, final_loss=final_loss)
