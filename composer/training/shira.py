"""SHiRA training on a diffusion denoiser: PEFT ``ShiraConfig`` masks (all five types), calibration, the loop, saving.

DreamBooth-style: a folder of images with a prompt (or ``.txt`` captions) teaches the denoiser's attention
projections (``to_q``/``to_k``/``to_v``/``to_out.0``) the subject or style, with the usual noise-prediction loss
(ε or v target, following the scheduler's ``prediction_type``). Only the K = r·(out+in) masked entries of each
adapted weight train (PEFT ``ShiraModel``); the result is saved in our SHiRA layout with the base family, mask type,
r and a fingerprint of the base weights (:func:`fusion.sparse.base_fingerprint`).

Masks are PEFT ``mask_fn(base_layer, r, **kwargs)`` callables built by :func:`make_mask_fn`: ``random`` is PEFT's
own; ``wm`` / ``grad`` / ``snip`` / ``struct`` come from :mod:`fusion.sparse`, the gradient-based ones reading the
accumulated |∇W| that :func:`calibrate_gradients` measures on a few batches before training.

Supports SD 1.x/2.x and SDXL pipelines (UNet denoisers). Training runs through ``accelerate`` (CPU in tests, a GPU
with mixed precision in production) with a tqdm progress bar and periodic checkpoints.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from diffusers import DDPMScheduler, UNet2DConditionModel
from peft import ShiraConfig, inject_adapter_in_model
from peft.tuners.shira.layer import ShiraLayer
from torch import nn

from composer.presets import preset_family
from composer.training.data import ImageCaptionFolder, index_batches
from composer.training.loop import LoopSettings, Objective, TrainResult, frozen_accelerator, optimise_with
from fusion.adapters import Adapter, Sparse
from fusion.errors import TrainingError
from fusion.mask_types import MASK_TYPES
from fusion.sparse import base_fingerprint, grad_mask, shira_budget, snip_mask, struct_mask, wm_mask
from weights_index.formats.shira import save_shira

ATTENTION_PROJECTIONS = ("to_q", "to_k", "to_v", "to_out.0")
"""Module-name endings of the attention projections SHiRA adapts in a UNet."""

ADAPTER_NAME = "default"


MaskFn = Callable[..., torch.Tensor]


def attention_targets(denoiser: nn.Module) -> list[str]:
    """Module paths of the denoiser's attention projection Linear layers (what SHiRA adapts)."""
    return [
        name
        for name, module in denoiser.named_modules()
        if isinstance(module, nn.Linear) and ".attn" in f".{name}" and name.endswith(ATTENTION_PROJECTIONS)
    ]


def make_mask_fn(
    mask_type: str,
    modules: Mapping[str, nn.Module],
    *,
    gradients: Mapping[str, torch.Tensor] | None = None,
) -> MaskFn | None:
    """A PEFT ``mask_fn(base_layer, r, **kwargs)`` for ``mask_type`` (None for ``random``: PEFT's own is used).

    ``modules`` maps module paths to the base Linear layers (PEFT hands the layer, not its name, to the mask
    function); ``gradients`` (path → accumulated |∇W|) is required by ``grad`` and ``snip``.
    """
    if mask_type not in MASK_TYPES:
        raise TrainingError(f"unknown SHiRA mask {mask_type!r}", hint=f"use one of {', '.join(MASK_TYPES)}")
    if mask_type == "random":
        return None
    if mask_type in ("grad", "snip") and gradients is None:
        raise TrainingError(f"the {mask_type} mask needs calibration gradients", hint="run calibrate_gradients first")
    names = {id(module): name for name, module in modules.items()}

    def mask_fn(base_layer: nn.Module, r: int, **_: Any) -> torch.Tensor:
        weight = base_layer.weight.detach()
        k = shira_budget(weight.shape, r)
        if mask_type == "wm":
            mask = wm_mask(weight, k)
        elif mask_type == "struct":
            mask = struct_mask(weight.shape, k)
        else:
            assert gradients is not None
            grad = gradients[names[id(base_layer)]].to(weight.device)
            mask = grad_mask(grad, k) if mask_type == "grad" else snip_mask(weight, grad, k)
        return mask.to(device=weight.device, dtype=weight.dtype)

    return mask_fn


def shira_config(targets: list[str], r: int, mask_type: str, mask_fn: MaskFn | None, *, seed: int = 0) -> ShiraConfig:
    """PEFT ``ShiraConfig`` for the given module paths; a custom ``mask_fn`` replaces PEFT's random mask."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*mask_type.*not recognized.*")
        config = ShiraConfig(r=r, mask_type=mask_type, random_seed=seed, target_modules=targets)
    if mask_fn is not None:
        config.mask_fn = mask_fn
    return config


# ----- the denoising objective -------------------------------------------------------------------------------------


class DenoisingObjective(Objective):
    """The diffusion training loss on a fixed image set: latents and prompt embeddings are encoded once.

    Each :meth:`loss` call draws images, VAE latent samples, noise and timesteps from ``generator`` and returns the
    MSE between the denoiser's prediction and the scheduler's target (ε, or v for v-prediction models).
    """

    def __init__(self, pipe: Any, dataset: ImageCaptionFolder, *, device: torch.device) -> None:
        family = preset_family(pipe)
        if family not in ("sd1", "sd2", "sdxl") or not isinstance(getattr(pipe, "unet", None), UNet2DConditionModel):
            raise TrainingError(
                f"SHiRA training supports SD 1.x/2.x and SDXL pipelines, not {family!r}",
                hint="use an SD or SDXL base model",
            )
        self.family = family
        self.device = device
        self.scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
        self.prediction_type = self.scheduler.config.prediction_type
        vae = pipe.vae
        scale = float(vae.config.scaling_factor)
        with torch.no_grad():
            pixels = torch.stack(dataset.images).to(device=device, dtype=vae.dtype)
            dist = vae.encode(pixels).latent_dist
            self.latent_mean = dist.mean.float() * scale
            self.latent_std = dist.std.float() * scale
            self.conditions = [self._encode(pipe, caption, dataset.size) for caption in dataset.captions]

    def _encode(self, pipe: Any, caption: str, size: int) -> dict[str, torch.Tensor]:
        if self.family == "sdxl":
            embeds, _, pooled, _ = pipe.encode_prompt(
                caption, device=self.device, num_images_per_prompt=1, do_classifier_free_guidance=False
            )
            time_ids = torch.tensor([[size, size, 0, 0, size, size]], dtype=embeds.dtype, device=self.device)
            return {"encoder_hidden_states": embeds, "text_embeds": pooled, "time_ids": time_ids}
        embeds, _ = pipe.encode_prompt(caption, self.device, 1, False)
        return {"encoder_hidden_states": embeds}

    def __len__(self) -> int:
        return int(self.latent_mean.shape[0])

    def loss(self, denoiser: nn.Module, indices: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Noise-prediction MSE on the images ``indices`` with latents, noise and timesteps drawn from ``generator``."""
        mean, std = self.latent_mean[indices], self.latent_std[indices]
        latents = mean + std * torch.randn(mean.shape, generator=generator).to(mean.device)
        noise = torch.randn(latents.shape, generator=generator).to(latents.device)
        steps = self.scheduler.config.num_train_timesteps
        timesteps = torch.randint(0, steps, (latents.shape[0],), generator=generator).to(latents.device)
        noisy = self.scheduler.add_noise(latents, noise, timesteps)
        target = (
            self.scheduler.get_velocity(latents, noise, timesteps) if self.prediction_type == "v_prediction" else noise
        )
        conditions = [self.conditions[int(i)] for i in indices]
        hidden = torch.cat([c["encoder_hidden_states"] for c in conditions])
        kwargs: dict[str, Any] = {}
        if self.family == "sdxl":
            kwargs["added_cond_kwargs"] = {
                "text_embeds": torch.cat([c["text_embeds"] for c in conditions]),
                "time_ids": torch.cat([c["time_ids"] for c in conditions]),
            }
        dtype = next(denoiser.parameters()).dtype
        prediction = denoiser(
            noisy.to(dtype), timesteps, encoder_hidden_states=hidden.to(dtype), return_dict=False, **kwargs
        )[0]
        return torch.nn.functional.mse_loss(prediction.float(), target.float())


def calibrate_gradients(
    objective: DenoisingObjective,
    denoiser: nn.Module,
    modules: Mapping[str, nn.Module],
    *,
    batches: int = 8,
    batch_size: int = 1,
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """Accumulated |∇W| (summed over ``batches`` calibration batches) for each module's weight, in fp32.

    Gradients flow only into the listed weights; every parameter's ``requires_grad`` is restored afterwards.
    """
    flags = {p: p.requires_grad for p in denoiser.parameters()}
    for p in denoiser.parameters():
        p.requires_grad_(False)
    weights = {name: module.weight for name, module in modules.items()}
    totals = {name: torch.zeros(w.shape, dtype=torch.float32, device=w.device) for name, w in weights.items()}
    generator = torch.Generator().manual_seed(seed)
    order = index_batches(len(objective), batch_size, generator)
    try:
        for w in weights.values():
            w.requires_grad_(True)
        for _ in range(batches):
            grads = torch.autograd.grad(objective.loss(denoiser, next(order), generator), list(weights.values()))
            for name, grad in zip(weights, grads):
                totals[name] += grad.float().abs()
    finally:
        for p, flag in flags.items():
            p.requires_grad_(flag)
    return totals


# ----- the training run --------------------------------------------------------------------------------------------


@dataclass
class ShiraTrainConfig(LoopSettings):
    """Options of one SHiRA training run (the ``compose train-shira`` flags)."""

    images: Path
    prompt: str
    out: Path
    mask: str = "snip"
    r: int = 32
    resolution: int | None = None
    calibration_batches: int = 8
    checkpoint_every: int = 0
    steps: int = field(default=500, kw_only=True)
    learning_rate: float = field(default=1e-4, kw_only=True)


@dataclass
class ShiraTrainResult(TrainResult):
    """What a run produced: the adapter, where it was saved, the losses and the checkpoints written."""

    adapter: Adapter


def extract_sparse(denoiser: nn.Module, adapter_name: str = ADAPTER_NAME) -> dict[str, Sparse]:
    """The trained SHiRA updates of a PEFT-injected denoiser as canonical :class:`Sparse` updates (scaling folded)."""
    out: dict[str, Sparse] = {}
    for name, module in denoiser.named_modules():
        if isinstance(module, ShiraLayer) and adapter_name in module.shira_weight:
            rows, cols = module.shira_indices[adapter_name].long()
            base = module.get_base_layer().weight
            values = module.shira_weight[adapter_name].detach().float() * float(module.scaling[adapter_name])
            flat = rows.to(values.device) * int(base.shape[1]) + cols.to(values.device)
            out[name] = Sparse.from_unsorted(flat.cpu(), values.cpu(), tuple(base.shape))
    return out


def remove_shira_layers(denoiser: nn.Module, previous_config: Any = None) -> None:
    """Put every PEFT SHiRA layer's base Linear back in its parent (the base weights were never modified) and
    restore the ``peft_config`` attribute PEFT set (``previous_config``: what was there before injection)."""
    if previous_config is None:
        denoiser.__dict__.pop("peft_config", None)
    else:
        denoiser.peft_config = previous_config
    for name, module in list(denoiser.named_modules()):
        if isinstance(module, ShiraLayer):
            parent_name, _, attr = name.rpartition(".")
            parent = denoiser.get_submodule(parent_name) if parent_name else denoiser
            setattr(parent, attr, module.get_base_layer())


def _save(
    layers: Mapping[str, Sparse], path: Path, family: str, config: ShiraTrainConfig, fingerprint: str, step: int
) -> Path:
    metadata = {
        "base_family": family,
        "mask_type": config.mask,
        "r": str(config.r),
        "base_fingerprint": fingerprint,
        "instance_prompt": config.prompt,
        "train_steps": str(step),
        "learning_rate": str(config.learning_rate),
    }
    adapter = Adapter(name=path.stem, family=family, layers=dict(layers))
    return save_shira(adapter, path, metadata)


def train_shira(pipe: Any, config: ShiraTrainConfig) -> ShiraTrainResult:
    """Train a SHiRA adapter on ``pipe``'s denoiser (see the module docstring) and save it to ``config.out``.

    The pipeline's modules are left as they were (PEFT layers removed; base weights untouched).
    """
    if config.steps < 1 or config.r < 1 or config.batch_size < 1:
        raise TrainingError("steps, r and batch size must be positive")
    accelerator = frozen_accelerator(pipe, config.mixed_precision)
    torch.manual_seed(config.seed)
    denoiser: nn.Module = pipe.unet
    size = config.resolution or int(denoiser.config.sample_size) * int(pipe.vae_scale_factor)
    dataset = ImageCaptionFolder(config.images, prompt=config.prompt, size=size, seed=config.seed)
    objective = DenoisingObjective(pipe, dataset, device=accelerator.device)
    targets = attention_targets(denoiser)
    if not targets:
        raise TrainingError("the denoiser has no attention projection layers to adapt")
    modules = {name: denoiser.get_submodule(name) for name in targets}
    fingerprint = base_fingerprint({name: module.weight for name, module in modules.items()})
    gradients = None
    if config.mask in ("grad", "snip"):
        gradients = calibrate_gradients(
            objective,
            denoiser,
            modules,
            batches=config.calibration_batches,
            batch_size=config.batch_size,
            seed=config.seed,
        )
    mask_fn = make_mask_fn(config.mask, modules, gradients=gradients)
    denoiser.eval()
    initial_loss = objective.evaluate(denoiser)
    previous_config = denoiser.__dict__.get("peft_config")
    inject_adapter_in_model(shira_config(targets, config.r, config.mask, mask_fn, seed=config.seed), denoiser)
    family = objective.family
    try:
        result = optimise_with(
            config,
            accelerator,
            denoiser,
            [p for n, p in denoiser.named_parameters() if "shira_weight" in n],
            objective,
            desc="train-shira",
            checkpoint_every=config.checkpoint_every,
            save_checkpoint=lambda model, path, step: _save(
                extract_sparse(model), path, family, config, fingerprint, step
            ),
            final_path=config.out,
        )
        layers = extract_sparse(result.model)
        final_loss = objective.evaluate(result.model)
    finally:
        remove_shira_layers(pipe.unet, previous_config)
    path = _save(layers, config.out, family, config, fingerprint, config.steps)
    adapter = Adapter(name=path.stem, family=family, layers=layers, source=str(path))
    return result.report(ShiraTrainResult, adapter, path=path, initial_loss=initial_loss, final_loss=final_loss)
