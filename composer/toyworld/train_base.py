"""Train the ``toy-sd`` base model from scratch on the toy world: autoencoder first, then UNet + text encoder.

Stage 1 fits the two-level ``AutoencoderKL`` on rendered scenes of the whole vocabulary (a codec, like SD's VAE,
which saw far more than its UNet's captions) and sets its scaling factor from the latents' spread. Stage 2 trains
the UNet and the CLIP text encoder jointly on base-vocabulary scenes with v-prediction under a zero-terminal-SNR
schedule, caption dropout for classifier-free guidance, and an EMA of both; the EMA weights are what ships.
Everything is resumable: a safetensors checkpoint is written every ``checkpoint_every`` steps and at the end, and
a rerun with the same output folder continues from it.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from composer.toyworld.checkpoint import load_checkpoint, save_checkpoint
from composer.toyworld.data import CaptionTokens, WorldRandom, draw_batch
from composer.toyworld.model import MAX_TOKENS, SCHEDULER_CONFIG, assemble_pipeline, build_components
from composer.toyworld.objective import v_prediction_loss
from composer.toyworld.world import HELD_OUT

logger = logging.getLogger(__name__)


@dataclass
class BaseTrainingConfig:
    """Every knob of base training; recorded with the weights so a run can be reproduced."""

    steps: int = 20000
    vae_steps: int = 1500
    batch: int = 128
    vae_batch: int = 64
    lr: float = 3e-4
    vae_lr: float = 1e-3
    warmup: int = 500
    seed: int = 0
    ema_decay: float = 0.9995
    caption_dropout: float = 0.1
    checkpoint_every: int = 1000
    max_minutes: float | None = None


def _autocast(device: torch.device) -> torch.autocast:
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


def train_vae(vae: torch.nn.Module, config: BaseTrainingConfig, rng: WorldRandom, device: torch.device) -> float:
    """Fit the autoencoder (L1 + MSE reconstruction, a tiny KL) and return the latent scaling factor (1/std)."""
    vae.train().requires_grad_(True)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=config.vae_lr, weight_decay=0.0)
    progress = tqdm(range(config.vae_steps), desc="autoencoder", mininterval=5)
    for step in progress:
        half = config.vae_batch // 2
        concept = HELD_OUT[step % len(HELD_OUT)]
        images = torch.cat(
            [
                draw_batch(half, rng, device).images,
                draw_batch(config.vae_batch - half, rng, device, concepts=(concept,)).images,
            ]
        )
        for group in optimizer.param_groups:
            group["lr"] = config.vae_lr * 0.5 * (1 + math.cos(math.pi * step / max(config.vae_steps, 1)))
        with _autocast(device):
            posterior = vae.encode(images).latent_dist
            recon = vae.decode(posterior.sample()).sample
        recon = recon.float()
        loss = F.l1_loss(recon, images) + F.mse_loss(recon, images) + 1e-6 * posterior.kl().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step % 50 == 0:
            progress.set_postfix(loss=f"{loss.item():.4f}")
    vae.eval().requires_grad_(False)
    with torch.no_grad():
        latents = torch.cat([vae.encode(draw_batch(64, rng, device).images).latent_dist.sample() for _ in range(8)])
    return float(1.0 / latents.std())


def train_base(out_dir: Path, config: BaseTrainingConfig, device: str | torch.device | None = None) -> Path:
    """Train (or resume) the base model into ``out_dir``; returns the exported pipeline folder ``out_dir/toy-sd``."""
    from diffusers import DDPMScheduler

    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(config.seed)
    rng = WorldRandom(config.seed)
    components = build_components()
    vae, unet, text_encoder = components["vae"].to(device), components["unet"].to(device), components["text_encoder"]
    text_encoder.to(device)
    trainable = [*unet.parameters(), *text_encoder.parameters()]
    optimizer = torch.optim.AdamW(trainable, lr=config.lr, weight_decay=1e-2)
    ema = {f"unet.{k}": v.detach().clone() for k, v in unet.state_dict().items()}
    ema |= {f"text_encoder.{k}": v.detach().clone() for k, v in text_encoder.state_dict().items()}
    checkpoint = out_dir / "checkpoint.safetensors"
    start = 0
    if checkpoint.is_file():
        meta = load_checkpoint(
            checkpoint,
            {"vae": vae, "unet": unet, "text_encoder": text_encoder, "ema": ema},
            {"diffusion": optimizer},
            rng,
        )
        start, scaling = meta["step"], meta["scaling_factor"]
        logger.info("resuming from step %d (%s)", start, checkpoint)
    else:
        scaling = train_vae(vae, config, rng, device)
    vae.register_to_config(scaling_factor=scaling)
    vae.eval().requires_grad_(False)

    tokens = CaptionTokens(components["tokenizer"], MAX_TOKENS)
    noise_schedule = DDPMScheduler(
        **{k: v for k, v in SCHEDULER_CONFIG.items() if k not in ("set_alpha_to_one", "steps_offset")}
    )
    alphas = noise_schedule.alphas_cumprod.to(device)
    ema_params = [ema[f"unet.{k}"] for k, _ in unet.named_parameters()]
    ema_params += [ema[f"text_encoder.{k}"] for k, _ in text_encoder.named_parameters()]
    live_params = [p for _, p in unet.named_parameters()] + [p for _, p in text_encoder.named_parameters()]
    began = time.monotonic()
    unet.train()
    text_encoder.train()
    step = start
    progress = tqdm(range(start, config.steps), desc="base model", initial=start, total=config.steps, mininterval=5)

    def save(step: int) -> None:
        save_checkpoint(
            checkpoint,
            {"vae": vae, "unet": unet, "text_encoder": text_encoder, "ema": ema},
            {"diffusion": optimizer},
            rng,
            {"step": step, "scaling_factor": scaling, "config": asdict(config)},
        )

    total = config.steps
    for step in progress:
        if step >= total:
            break
        if config.max_minutes is not None and step == start + 200:
            # Fit the run into the time budget: measure the rate, then shorten the schedule (recorded on export).
            rate = 200 / (time.monotonic() - began)
            total = min(config.steps, int(step + rate * (config.max_minutes * 60 - (time.monotonic() - began))))
            progress.total = total
            logger.info("%.1f steps/s: training %d steps to fit %s min", rate, total, config.max_minutes)
        batch = draw_batch(config.batch, rng, device)
        captions = ["" if rng.content.random() < config.caption_dropout else text for text in batch.captions]
        ids = tokens(captions, device)
        with torch.no_grad():
            latents = vae.encode(batch.images).latent_dist.sample() * scaling
        for group in optimizer.param_groups:
            warm = min(1.0, (step + 1) / config.warmup)
            group["lr"] = config.lr * warm * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / total)))
        loss = v_prediction_loss(unet, text_encoder, ids, latents, alphas, rng.layout)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        decay = min(config.ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            torch._foreach_lerp_(ema_params, [p.detach() for p in live_params], 1 - decay)
        if step % 50 == 0:
            progress.set_postfix(loss=f"{loss.item():.4f}")
        if (step + 1) % config.checkpoint_every == 0:
            save(step + 1)
    else:
        step = total
    save(step)
    return export_pipeline(out_dir, components, ema, scaling, config, step)


def export_pipeline(
    out_dir: Path,
    components: dict,
    ema: dict[str, torch.Tensor],
    scaling: float,
    config: BaseTrainingConfig,
    step: int,
) -> Path:
    """Write the EMA weights as a diffusers pipeline folder (fp16 safetensors) plus a training record."""
    unet, text_encoder = components["unet"], components["text_encoder"]
    unet.load_state_dict({k[5:]: v for k, v in ema.items() if k.startswith("unet.")})
    text_encoder.load_state_dict({k[13:]: v for k, v in ema.items() if k.startswith("text_encoder.")})
    components["vae"].register_to_config(scaling_factor=scaling)
    pipe = assemble_pipeline(components).to("cpu", torch.float16)
    target = out_dir / "toy-sd"
    pipe.save_pretrained(target, safe_serialization=True)
    record = {"steps": step, "scaling_factor": scaling, "config": asdict(config), "torch": torch.__version__}
    (target / "training.json").write_text(json.dumps(record, indent=2) + "\n")
    return target
