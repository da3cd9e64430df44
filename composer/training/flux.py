"""What the two FLUX.1 flow-matching trainers (gates on FLUX.1, restoration LoRAs on Kontext) share: the prompts
encoded once by the pipeline's own ``encode_prompt``, and the transformer's velocity prediction for a batch."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn


@dataclass
class FluxPrompts:
    """Prompt embeddings (one row per prompt, fp32), pooled embeddings and the shared text position ids."""

    embeds: torch.Tensor
    pooled: torch.Tensor
    text_ids: torch.Tensor


@torch.no_grad()
def encode_flux_prompts(
    pipe: Any, prompts: Sequence[str], *, device: torch.device, max_sequence_length: int
) -> FluxPrompts:
    """Encode ``prompts`` with the pipeline's CLIP and T5 encoders, as the pipeline does at inference."""
    embeds, pooled, text_ids = [], [], None
    for prompt in prompts:
        prompt_embeds, pooled_embeds, text_ids = pipe.encode_prompt(
            prompt=prompt,
            prompt_2=None,
            device=device,
            num_images_per_prompt=1,
            max_sequence_length=max_sequence_length,
        )
        embeds.append(prompt_embeds.float())
        pooled.append(pooled_embeds.float())
    return FluxPrompts(torch.cat(embeds), torch.cat(pooled), text_ids)


def flux_velocity(
    transformer: nn.Module,
    hidden_states: torch.Tensor,
    sigma: torch.Tensor,
    *,
    guidance: float | None,
    prompts: FluxPrompts,
    rows: torch.Tensor,
    img_ids: torch.Tensor,
) -> torch.Tensor:
    """The transformer's prediction for packed ``hidden_states`` at noise levels ``sigma`` (one per sample), with the
    prompts of ``rows`` and ``guidance`` as the guidance embedding (``None`` for models without one), in the
    transformer's dtype."""
    dtype = next(transformer.parameters()).dtype
    batch = hidden_states.shape[0]
    device = hidden_states.device
    return transformer(
        hidden_states=hidden_states.to(dtype),
        timestep=sigma.to(dtype),
        guidance=None if guidance is None else torch.full((batch,), guidance, device=device),
        pooled_projections=prompts.pooled[rows].to(dtype),
        encoder_hidden_states=prompts.embeds[rows].to(dtype),
        txt_ids=prompts.text_ids,
        img_ids=img_ids,
        return_dict=False,
    )[0]
