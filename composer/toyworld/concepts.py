"""Teach the base model one held-out concept with a PEFT adapter (LoRA, LoHa, LoKr or SHiRA), as users train them.

The adapter is trained on scenes of the base vocabulary with the concept applied to every one of them, captioned
with the concept's trigger phrase, on the ordinary v-prediction loss of the base model; the base stays frozen.
With ``prior_batch`` > 0 each step also draws that many scenes without the concept, captioned without its trigger
(kohya's regularisation images, DreamBooth's prior preservation), and adds their loss at ``prior_weight``, so the
adapter learns to change what the trigger names and to leave the rest of the model's world alone.
LoRA uses PEFT's default init (Kaiming-uniform down, zero up: what kohya's trainer does). The result is PEFT's own
state dict (``get_peft_model_state_dict``) plus the config that made it, which the library builder writes out in
the file formats users download.
"""

from __future__ import annotations

import copy
import math
import zlib
from dataclasses import dataclass
from typing import Any

import torch
from tqdm.auto import tqdm

from composer.toyworld.data import CaptionTokens, WorldBatch, WorldRandom, draw_batch
from composer.toyworld.model import MAX_TOKENS
from composer.toyworld.objective import v_prediction_loss
from composer.toyworld.world import Concept
from fusion.errors import TrainingError

UNET_TARGETS = [
    "to_q",
    "to_k",
    "to_v",
    "to_out.0",
    "proj_in",
    "proj_out",
    "ff.net.0.proj",
    "ff.net.2",
    "conv1",
    "conv2",
]
"""UNet modules every concept adapter trains: attention, feed-forward and the resnets' convolutions (LoCon-style)."""

TEXT_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]


@dataclass
class ConceptTraining:
    """How one concept's adapter is trained."""

    kind: str = "lora"
    rank: int = 8
    steps: int = 400
    batch: int = 32
    lr: float = 1e-3
    text_encoder: bool = False
    seed: int = 0
    prior_batch: int = 0
    prior_weight: float = 1.0
    optional: float = 0.5
    """How often each training scene carries clothing, a style and an object (each on its own): the world's rate by
    default; higher shows the concept more often beside them, as a dataset's repeats would."""


def training_batch(
    concept: Concept, setup: ConceptTraining, rng: WorldRandom, device: str | torch.device
) -> WorldBatch:
    """One step's scenes: ``setup.batch`` with the concept applied and its trigger in the caption, then
    ``setup.prior_batch`` regularisation scenes of the base vocabulary without either."""
    batch = draw_batch(setup.batch, rng, device, concepts=(concept,), optional=setup.optional)
    if setup.prior_batch == 0:
        return batch
    prior = draw_batch(setup.prior_batch, rng, device)
    return WorldBatch(
        torch.cat([batch.images, prior.images]), batch.captions + prior.captions, batch.scenes + prior.scenes
    )


def _peft_config(kind: str, rank: int, targets: list[str]) -> Any:
    from peft import LoHaConfig, LoKrConfig, LoraConfig, ShiraConfig

    if kind == "lora":
        return LoraConfig(r=rank, lora_alpha=rank, target_modules=targets, init_lora_weights=True)
    if kind == "loha":
        return LoHaConfig(r=rank, alpha=rank, target_modules=targets)
    if kind == "lokr":
        return LoKrConfig(r=rank, alpha=rank, target_modules=targets)
    if kind == "shira":
        linear = [t for t in targets if t.startswith(("to_", "ff."))]
        return ShiraConfig(r=rank, target_modules=linear)
    raise TrainingError(f"unknown adapter kind {kind!r}", hint="use lora, loha, lokr or shira")


def train_concept(
    pipe: Any, concept: Concept, setup: ConceptTraining, device: str | torch.device | None = None
) -> dict:
    """Train an adapter for ``concept`` on copies of ``pipe``'s UNet and text encoder (``pipe`` stays unchanged).

    Returns PEFT's state dicts and configs under ``unet``, ``text_encoder`` (or None), ``unet_config`` and
    ``text_config``.
    """
    from peft import get_peft_model_state_dict

    if setup.prior_batch < 0 or setup.prior_weight < 0:
        raise TrainingError(
            f"prior_batch {setup.prior_batch} and prior_weight {setup.prior_weight} must not be negative",
            hint="prior_batch 0 trains without prior preservation",
        )
    if not 0 <= setup.optional <= 1:
        raise TrainingError(
            f"optional {setup.optional} is not a rate between 0 and 1",
            hint="0.5, the world's own rate, is the default",
        )
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    rng = WorldRandom(setup.seed + zlib.crc32(concept.name.encode()))
    torch.manual_seed(setup.seed)
    unet = copy.deepcopy(pipe.unet).to(device)
    text_encoder = copy.deepcopy(pipe.text_encoder).to(device)
    vae = pipe.vae.to(device)
    for module in (unet, text_encoder, vae):
        module.requires_grad_(False)
    unet_config = _peft_config(setup.kind, setup.rank, UNET_TARGETS)
    unet.add_adapter(unet_config, adapter_name=concept.name)
    text_config = None
    if setup.text_encoder:
        text_config = _peft_config("lora", max(setup.rank // 2, 1), TEXT_TARGETS)
        text_encoder.add_adapter(text_config, adapter_name=concept.name)
    trainable = [p for m in (unet, text_encoder) for p in m.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=setup.lr, weight_decay=0.0)
    tokens = CaptionTokens(pipe.tokenizer, MAX_TOKENS)
    alphas = pipe.scheduler.alphas_cumprod.to(device)
    scaling = pipe.vae.config.scaling_factor
    weights = None
    if setup.prior_batch:
        weights = torch.cat(
            [
                torch.full((setup.batch,), 1 / setup.batch),
                torch.full((setup.prior_batch,), setup.prior_weight / setup.prior_batch),
            ]
        )
    unet.train()
    text_encoder.train()
    for step in tqdm(range(setup.steps), desc=concept.name, mininterval=5):
        batch = training_batch(concept, setup, rng, device)
        ids = tokens(batch.captions, device)
        with torch.no_grad():
            latents = vae.encode(batch.images).latent_dist.sample() * scaling
        for group in optimizer.param_groups:
            group["lr"] = setup.lr * 0.5 * (1 + math.cos(math.pi * step / setup.steps))
        loss = v_prediction_loss(unet, text_encoder, ids, latents, alphas, rng.layout, weights)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    unet.eval()
    text_encoder.eval()
    result = {
        "unet": {
            k: v.detach().cpu().contiguous()
            for k, v in get_peft_model_state_dict(unet, adapter_name=concept.name).items()
        },
        "unet_config": unet_config.to_dict(),
        "text_encoder": None,
        "text_config": None,
    }
    if text_config is not None:
        state = get_peft_model_state_dict(text_encoder, adapter_name=concept.name)
        result["text_encoder"] = {k: v.detach().cpu().contiguous() for k, v in state.items()}
        result["text_config"] = text_config.to_dict()
    return result
