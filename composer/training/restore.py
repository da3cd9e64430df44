"""Edit2Restore training: a LoRA on FLUX.1 Kontext that turns a degraded image into its clean version on a task prompt.

Restoration is editing (docs/methods.md#restoration-adapters): the degraded image is Kontext's conditioning image —
VAE-encoded, packed into 2×2 patches and concatenated after the noisy latents on the sequence axis, with position ids
whose first coordinate is 1 — and the clean image is the target. The loss is rectified-flow matching as Kontext was
trained: for clean latents x₀, noise ε and σ ~ logit-normal(0, 1), the transformer sees x_σ = (1−σ)·x₀ + σ·ε at timestep
σ and is trained to predict the velocity ε − x₀ on the generated tokens (the conditioning tokens' outputs are dropped,
exactly as :class:`diffusers.FluxKontextPipeline` drops them at inference). Latents, ids and prompt embeddings are
prepared with the pipeline's own helpers, so training and inference see identical inputs.

The adapter is a PEFT LoRA (default rank 64, lora_alpha 4 ⇒ scale 1/16) on Edit2Restore's target modules
(:data:`EDIT2RESTORE_TARGETS`). Several (pairs folder, task prompt) sets train one multi-task adapter that is steered
by its prompt. The result is saved by ``FluxKontextPipeline.save_lora_weights`` — a standard diffusers LoRA file any
diffusers pipeline loads — with ``task_prompt`` (the first task's prompt), ``task_prompts`` (JSON list) and
``needs_input_image`` added to its safetensors metadata, which :func:`weights_index.reader.read_adapter` reads back.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from diffusers import FluxKontextPipeline, FluxTransformer2DModel
from diffusers.training_utils import compute_density_for_timestep_sampling
from peft import LoraConfig, get_peft_model_state_dict
from safetensors.torch import save_file
from torch import nn

from composer.training.data import DatasetError, list_images, load_image
from composer.training.flux import encode_flux_prompts, flux_velocity
from composer.training.loop import LoopSettings, Objective, TrainResult, frozen_accelerator, optimise_with
from fusion.adapters import Adapter
from fusion.errors import TrainingError
from weights_index.reader import read_adapter
from weights_index.safetensors_file import load_tensors, read_header

EDIT2RESTORE_TARGETS = (
    "attn.to_q",
    "attn.to_k",
    "attn.to_v",
    "attn.to_out.0",
    "attn.add_q_proj",
    "attn.add_k_proj",
    "attn.add_v_proj",
    "attn.to_add_out",
    "ff.net.0.proj",
    "ff.net.2",
    "ff_context.net.0.proj",
    "ff_context.net.2",
    "proj_mlp",
)
"""Module-name endings Edit2Restore adapts in the Flux transformer (double- and single-stream blocks)."""

TASK_PROMPTS = {
    "noise": "remove the noise from the image",
    "rain": "remove the rain from the image",
    "haze": "remove the haze from the image",
    "jpeg": "remove the compression artifacts from the image",
    "lowlight": "brighten the dark image",
}
"""Task prompts by degradation (the first three are Edit2Restore's own)."""

ADAPTER_NAME = "default"


@dataclass(frozen=True)
class TaskPairs:
    """One task: a pairs folder (``clean/`` and ``degraded/`` with matching names) and its prompt."""

    folder: Path
    prompt: str


def find_pairs(folder: str | Path) -> list[tuple[Path, Path]]:
    """(clean, degraded) image paths of a pairs folder, matched by file stem; every image needs its partner."""
    root = Path(folder)
    clean = {path.stem: path for path in list_images(root / "clean")}
    degraded = {path.stem: path for path in list_images(root / "degraded")}
    unmatched = sorted(set(clean) ^ set(degraded))
    if unmatched:
        raise DatasetError(
            f"images without a partner in clean/ or degraded/: {unmatched[:5]}{' …' if len(unmatched) > 5 else ''}",
            path=root,
            hint="every clean/NAME needs a degraded/NAME with the same stem (compose make-pairs writes both)",
        )
    return [(clean[stem], degraded[stem]) for stem in sorted(clean)]


def _is_flux(pipe: Any) -> bool:
    return isinstance(getattr(pipe, "transformer", None), FluxTransformer2DModel)


class KontextRestoreObjective(Objective):
    """The flow-matching restoration loss on a fixed set of pairs; latents and prompt embeddings are encoded once."""

    def __init__(
        self,
        pipe: Any,
        tasks: Sequence[TaskPairs],
        *,
        size: int,
        device: torch.device | str,
        guidance_scale: float = 2.5,
        max_sequence_length: int = 512,
    ) -> None:
        if not _is_flux(pipe) or not hasattr(pipe, "vae"):
            raise TrainingError(
                f"restoration training needs a FLUX.1 Kontext pipeline, got {type(pipe).__name__}",
                hint="use --model tiny-flux-kontext, flux-kontext or another Kontext checkpoint",
            )
        multiple = pipe.vae_scale_factor * 2
        if size < multiple or size % multiple:
            raise TrainingError(f"the training resolution must be a positive multiple of {multiple}, got {size}")
        if not tasks:
            raise TrainingError("no pairs to train on", hint="pass --pairs DIR --task PROMPT at least once")
        self.device = torch.device(device)
        self.size = size
        self.prompts = [task.prompt for task in tasks]
        clean_paths: list[Path] = []
        degraded_paths: list[Path] = []
        task_of: list[int] = []
        for index, task in enumerate(tasks):
            for clean, degraded in find_pairs(task.folder):
                clean_paths.append(clean)
                degraded_paths.append(degraded)
                task_of.append(index)
        self.task_of = torch.tensor(task_of)
        self.guidance = float(guidance_scale) if pipe.transformer.config.guidance_embeds else None
        with torch.no_grad():
            self.clean, self.img_ids = self._encode(pipe, clean_paths)
            self.condition, _ = self._encode(pipe, degraded_paths)
        self.encoded = encode_flux_prompts(
            pipe, self.prompts, device=self.device, max_sequence_length=max_sequence_length
        )

    def _encode(self, pipe: Any, paths: Sequence[Path]) -> tuple[torch.Tensor, torch.Tensor]:
        """Packed latents (N, tokens, 4·C) of the images, encoded by the pipeline's own ``prepare_latents`` as Kontext
        encodes its conditioning image, and the position ids of the target and the conditioning tokens."""
        channels = pipe.transformer.config.in_channels // 4
        noise = torch.Generator().manual_seed(0)  # prepare_latents also draws a start; keep the global RNG untouched
        packed, ids = [], torch.empty(0)
        for path in paths:
            pixels = load_image(path, self.size).unsqueeze(0)
            _, latents, latent_ids, image_ids = pipe.prepare_latents(
                pixels, 1, channels, self.size, self.size, pipe.vae.dtype, self.device, generator=noise
            )
            packed.append(latents.float())
            ids = torch.cat([latent_ids, image_ids]).float()
        return torch.cat(packed), ids

    def __len__(self) -> int:
        return int(self.clean.shape[0])

    def loss(self, transformer: nn.Module, indices: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Velocity MSE on the pairs ``indices`` with noise and σ drawn from ``generator``."""
        clean = self.clean[indices]
        condition = self.condition[indices]
        tasks = self.task_of[indices]
        batch = clean.shape[0]
        noise = torch.randn(clean.shape, generator=generator).to(clean.device)
        sigma = compute_density_for_timestep_sampling(
            "logit_normal", batch, logit_mean=0.0, logit_std=1.0, generator=generator
        ).to(clean.device)
        noisy = (1 - sigma[:, None, None]) * clean + sigma[:, None, None] * noise
        target = noise - clean
        prediction = flux_velocity(
            transformer,
            torch.cat([noisy, condition], dim=1),
            sigma,
            guidance=self.guidance,
            prompts=self.encoded,
            rows=tasks,
            img_ids=self.img_ids,
        )
        prediction = prediction[:, : clean.shape[1]]
        return torch.nn.functional.mse_loss(prediction.float(), target.float())


@dataclass
class RestoreTrainConfig(LoopSettings):
    """Options of one restoration training run (the ``compose train-restore`` flags)."""

    tasks: list[TaskPairs]
    out: Path
    rank: int = 64
    alpha: float = 4.0
    resolution: int = 512
    guidance_scale: float = 2.5
    max_sequence_length: int = 512
    steps: int = field(default=1000, kw_only=True)
    learning_rate: float = field(default=1e-4, kw_only=True)


@dataclass
class RestoreTrainResult(TrainResult):
    """What a run produced: the adapter read back from its file, the path, and the losses."""

    adapter: Adapter
    pairs: int = 0
    metadata: dict[str, str] = field(default_factory=dict)


def lora_config(rank: int, alpha: float) -> LoraConfig:
    """PEFT ``LoraConfig`` on :data:`EDIT2RESTORE_TARGETS` (B starts at zero, so the untrained adapter is a no-op)."""
    return LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights=True, target_modules=list(EDIT2RESTORE_TARGETS))


def save_restoration_lora(
    state: dict[str, torch.Tensor],
    path: str | Path,
    config: LoraConfig,
    metadata: dict[str, str],
) -> Path:
    """Save a transformer LoRA state dict with ``FluxKontextPipeline.save_lora_weights`` (standard diffusers layout
    and ``lora_adapter_metadata``), then add ``metadata`` to the file's safetensors metadata; written atomically."""
    path = Path(path)
    if path.suffix != ".safetensors":
        path = path.with_suffix(".safetensors")
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=f".{path.stem}.") as work:
        FluxKontextPipeline.save_lora_weights(
            work,
            transformer_lora_layers={k: v.detach().cpu().contiguous() for k, v in state.items()},
            weight_name="lora.safetensors",
            transformer_lora_adapter_metadata=config.to_dict(),
        )
        written = Path(work) / "lora.safetensors"
        merged = {**read_header(written).metadata, **metadata}
        final = Path(work) / "final.safetensors"
        save_file(load_tensors(written), str(final), metadata=merged)
        os.replace(final, path)
    return path


def _restore_peft_state(transformer: nn.Module, had_config: bool, previous_config: Any, loaded_flag: Any) -> None:
    """Remove the PEFT layers and put back the attributes PEFT changed, leaving the module as it was."""
    transformer.unload_lora()
    if had_config:
        transformer.peft_config = previous_config
    transformer._hf_peft_config_loaded = loaded_flag


def train_restore(pipe: Any, config: RestoreTrainConfig) -> RestoreTrainResult:
    """Train a restoration LoRA on ``pipe``'s Kontext transformer (see the module docstring), save it to
    ``config.out`` and return it read back through :func:`read_adapter`. The pipeline is left as it was."""
    if config.steps < 1 or config.rank < 1 or config.batch_size < 1 or config.alpha <= 0:
        raise TrainingError("steps, rank, alpha and batch size must be positive")
    accelerator = frozen_accelerator(pipe, config.mixed_precision)
    objective = KontextRestoreObjective(
        pipe,
        config.tasks,
        size=config.resolution,
        device=accelerator.device,
        guidance_scale=config.guidance_scale,
        max_sequence_length=config.max_sequence_length,
    )
    transformer: nn.Module = pipe.transformer
    transformer.eval()
    initial_loss = objective.evaluate(transformer)
    had_config = "peft_config" in transformer.__dict__
    previous_config = transformer.__dict__.get("peft_config")
    loaded_flag = getattr(transformer, "_hf_peft_config_loaded", False)
    peft_config = lora_config(config.rank, config.alpha)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        transformer.add_adapter(peft_config, adapter_name=ADAPTER_NAME)
    try:
        result = optimise_with(
            config,
            accelerator,
            transformer,
            [p for n, p in transformer.named_parameters() if "lora_" in n],
            objective,
            desc="train-restore",
        )
        unwrapped, losses = result.model, result.losses
        final_loss = objective.evaluate(unwrapped)
        state = get_peft_model_state_dict(unwrapped, adapter_name=ADAPTER_NAME)
    finally:
        _restore_peft_state(transformer, had_config, previous_config, loaded_flag)
    metadata = {
        "task_prompt": config.tasks[0].prompt,
        "task_prompts": json.dumps([task.prompt for task in config.tasks]),
        "needs_input_image": "true",
        "base_family": "flux",
        "edit_pipeline": "FluxKontextPipeline",
        "rank": str(config.rank),
        "lora_alpha": f"{config.alpha:g}",
        "train_steps": str(config.steps),
        "learning_rate": f"{config.learning_rate:g}",
        "resolution": str(config.resolution),
        "train_pairs": str(len(objective)),
    }
    path = save_restoration_lora(state, config.out, peft_config, metadata)
    adapter = read_adapter(path, "flux")
    return RestoreTrainResult(
        adapter, len(objective), metadata, path=path, losses=losses, initial_loss=initial_loss, final_loss=final_loss
    )
