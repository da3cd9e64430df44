"""What a single-file base-model checkpoint holds: its family, variant and which parts are baked in, under which prefix.

Read from the safetensors header only (no tensor is loaded, no torch import). The family comes from the codebase's
one family detector (:func:`weights_index.families.checkpoint_family`); the parts from the original layouts' key
prefixes: LDM/SGM files (A1111, Civitai) keep the UNet under ``model.diffusion_model.``, the autoencoder under
``first_stage_model.`` and the text encoders under ``cond_stage_model.`` (SD 1.x CLIP-L, SD 2.x OpenCLIP-H) or
``conditioner.embedders.0/1.`` (SDXL); FLUX files keep the transformer bare (BFL) or under ``model.diffusion_model.``
(ComfyUI), with ComfyUI's baked autoencoder under ``vae.`` or ``first_stage_model.`` and text encoders under
``text_encoders.clip_l.`` / ``text_encoders.t5xxl.``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any

from fusion.errors import PresetError
from weights_index.families import checkpoint_family
from weights_index.safetensors_file import PICKLE_SUFFIXES, SafetensorsHeader, read_header, refuse_pickle

CHECKPOINT_SUFFIXES = (".safetensors",)
"""Suffixes read as single-file checkpoints (pickled ``.ckpt``/``.pt``/``.bin`` are refused with a convert hint)."""

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIXES = ("first_stage_model.", "vae.")

TEXT_PREFIXES: dict[str, dict[str, str]] = {
    "sd1": {"text_encoder": "cond_stage_model.transformer."},
    "sd2": {"text_encoder": "cond_stage_model.model."},
    "sdxl": {
        "text_encoder": "conditioner.embedders.0.transformer.",
        "text_encoder_2": "conditioner.embedders.1.model.",
    },
    "flux": {"text_encoder": "text_encoders.clip_l.transformer.", "text_encoder_2": "text_encoders.t5xxl.transformer."},
}
"""Per family: the pipeline's text-encoder components and the prefix each has when baked into a checkpoint."""

_NOT_FLUX_TRANSFORMER = ("text_encoders.", "vae.", "first_stage_model.", "cond_stage_model.", "conditioner.")


@cache
def architecture_config(family: str) -> dict[str, Any]:
    """The shipped architecture configs of ``family`` (``composer/checkpoints/configs/<family>.json``), a fresh copy
    is returned by :func:`family_config`."""
    text = resources.files("composer.checkpoints").joinpath("configs", f"{family}.json").read_text()
    return json.loads(text)


def family_config(family: str) -> dict[str, Any]:
    """A mutable copy of the shipped configs of ``family`` (component name → diffusers/transformers config)."""
    return json.loads(json.dumps(architecture_config(family)))


@dataclass(frozen=True)
class CheckpointLayout:
    """The parts of one checkpoint file: ``denoiser`` keys by prefix, the baked VAE and text encoders (if any).

    ``variant`` is "dev", "schnell" or "kontext" for FLUX (Kontext by its name or metadata: its keys equal dev's) and
    "" otherwise; ``prediction_type`` is what the scheduler is told (SD 2.x 768 models predict v).
    """

    path: Path
    header: SafetensorsHeader
    family: str
    reason: str
    variant: str
    prediction_type: str
    denoiser_prefix: str
    vae_prefix: str | None
    text_prefixes: dict[str, str] = field(default_factory=dict)

    @property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Every tensor's shape, by its name in the file."""
        return {name: info.shape for name, info in self.header.tensors.items()}

    def keys_under(self, prefix: str) -> list[str]:
        """The tensor names that start with ``prefix``."""
        return [k for k in self.header.tensors if k.startswith(prefix)]

    def denoiser_keys(self) -> list[str]:
        """The denoiser's tensor names (a bare BFL FLUX file: every key outside the other parts' prefixes)."""
        if self.denoiser_prefix:
            return self.keys_under(self.denoiser_prefix)
        return [k for k in self.header.tensors if not k.startswith(_NOT_FLUX_TRANSFORMER)]


def _prediction_type(family: str, path: Path, metadata: dict[str, str]) -> str:
    """``modelspec.prediction_type`` when the file names one; SD 2.x otherwise predicts v unless its name says it is
    a 512 / base model (as the 2.0/2.1 releases are named); every other family predicts epsilon (or flow)."""
    named = metadata.get("modelspec.prediction_type", "").strip().lower()
    if named in ("v", "v_prediction", "v-prediction"):
        return "v_prediction"
    if named in ("epsilon", "eps"):
        return "epsilon"
    if family == "sd2":
        stem = path.stem.lower()
        return "epsilon" if "512" in stem or "base" in stem else "v_prediction"
    return "epsilon"


SUPPORTED = "SD 1.x, SD 2.x, SDXL and FLUX.1 (dev, schnell, Kontext) text-to-image"
"""What :func:`describe_checkpoint` accepts, as its errors say it."""

_DENOISER_CHANNELS = {
    "unet": ("input_blocks.0.0.weight", 1, "out.2.weight", 0),
    "flux": ("img_in.weight", 1, "final_layer.linear.weight", 0),
}
"""Per denoiser: (input layer, its input-width axis, output layer, its output-width axis) in the original layout."""


def _conditioned_variant(family: str, inputs: int, outputs: int) -> str:
    """What a denoiser that reads more channels than it writes is (the extra channels carry an image or mask)."""
    if family == "flux":
        if inputs == 6 * outputs:
            return "a FLUX.1 Fill (inpainting) transformer"
        if inputs == 2 * outputs:
            return "a FLUX.1 Depth or Canny (control-image) transformer"
        return "a FLUX transformer conditioned on extra image channels"
    if inputs == outputs + 5:
        return "an inpainting model"
    if inputs == 2 * outputs:
        return "an instruct-pix2pix (image-editing) model"
    return "a UNet conditioned on extra image channels"


def _refuse_conditioned_variant(path: Path, family: str, shapes: dict[str, tuple[int, ...]], prefix: str) -> None:
    """A PresetError for inpainting / pix2pix / FLUX Fill, Depth and Canny files: their denoiser reads the latents
    plus image or mask channels, which text-to-image generation does not feed (read from the header only)."""
    first, in_axis, last, out_axis = _DENOISER_CHANNELS["flux" if family == "flux" else "unet"]
    first_shape, last_shape = shapes.get(prefix + first), shapes.get(prefix + last)
    if first_shape is None or last_shape is None or len(first_shape) <= in_axis:
        return  # an incomplete denoiser is reported when it is built
    inputs, outputs = first_shape[in_axis], last_shape[out_axis]
    if inputs == outputs:
        return
    raise PresetError(
        f"{path.name} is {_conditioned_variant(family, inputs, outputs)}: its denoiser reads {inputs} input channels"
        f" and writes {outputs}, and such variants are not supported",
        path=path,
        hint=f"use a {SUPPORTED} checkpoint",
    )


def describe_checkpoint(path: str | Path) -> CheckpointLayout:
    """Read ``path``'s header and say what it holds; a typed error for pickles, broken files and unknown layouts."""
    path = Path(path).expanduser()
    refuse_pickle(path)
    if not path.exists():
        raise PresetError(f"no checkpoint file at {path}", path=path, hint="check the path given to --model")
    header = read_header(path)
    shapes = {name: info.shape for name, info in header.tensors.items()}
    evidence = checkpoint_family(shapes)
    if evidence.family == "unknown" and evidence.reason.startswith(("a ", "an ")):
        raise PresetError(
            f"{path.name} is {evidence.reason}",
            path=path,
            hint=f"supported are {SUPPORTED} checkpoints in their original single-file layouts",
        )
    if evidence.family == "unknown":
        raise PresetError(
            f"{path.name} is not an SD 1.x, SD 2.x, SDXL or FLUX.1 checkpoint in an original layout"
            f" ({evidence.reason})",
            path=path,
            hint="pass a single-file checkpoint (model.diffusion_model.… or FLUX double_blocks.… keys), a diffusers "
            "folder or a preset name",
        )
    family = evidence.family
    keys = list(shapes)
    vae_prefix = next((p for p in VAE_PREFIXES if any(k.startswith(p) for k in keys)), None)
    text = {part: prefix for part, prefix in TEXT_PREFIXES[family].items() if any(k.startswith(prefix) for k in keys)}
    denoiser_prefix = UNET_PREFIX if any(k.startswith(UNET_PREFIX) for k in keys) else ""
    _refuse_conditioned_variant(path, family, shapes, denoiser_prefix)
    variant = ""
    if family == "flux":
        named = " ".join([path.name, *header.metadata.values()]).lower()
        if "kontext" in named:
            variant = "kontext"
        else:
            variant = "dev" if any(k.endswith("guidance_in.in_layer.weight") for k in keys) else "schnell"
    return CheckpointLayout(
        path=path,
        header=header,
        family=family,
        reason=evidence.reason,
        variant=variant,
        prediction_type=_prediction_type(family, path, header.metadata),
        denoiser_prefix=denoiser_prefix,
        vae_prefix=vae_prefix,
        text_prefixes=text,
    )


def is_checkpoint_path(name: str | Path) -> bool:
    """Whether ``name`` names a file that should be read as a single-file checkpoint (or refused as a pickle)."""
    return Path(name).suffix.lower() in (*CHECKPOINT_SUFFIXES, *PICKLE_SUFFIXES)
