"""Base-model family of an adapter file: from its metadata first, then from the structure of its keys and shapes.

Metadata names the family when the trainer wrote it (kohya's ``ss_base_model_version`` and ``ss_v2``, the SAI model
spec's ``modelspec.architecture``, our own ``base_family``). Structure narrows the candidates independently: Flux
transformers have double/single blocks, SDXL has a second text encoder, transformer depth above one and an
``add_embedding``; SD1 and SD2 differ by the cross-attention width (768 vs 1024) only at real sizes. Tiny test
models (cross-attention width 32) are decided by structure alone.

The two sources are checked against each other: metadata that names a family the structure rules out is an error,
because one of them is wrong and silently trusting either gives broken images.

This module is the codebase's one family detector: :func:`family_from_text` reads any base-model string (headers,
Civitai's ``baseModel``, A1111's ``sd version``), :func:`detect_family` an adapter file, :func:`checkpoint_family` a
single-file base-model checkpoint, and :func:`pipeline_family` a loaded diffusers pipeline (by its components'
configs, without importing diffusers), so adapters, checkpoints and pipelines are matched by the same names.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

UNET_FAMILIES = frozenset({"sd1", "sd2", "sdxl"})
ALL_FAMILIES = frozenset({"sd1", "sd2", "sdxl", "flux"})

CROSS_ATTENTION_WIDTHS = {768: "sd1", 1024: "sd2", 2048: "sdxl", 4096: "flux"}
"""Real-size width of the text features keys/values project from (attn2.to_k input) → family."""

_TEXT_HIDDEN_WIDTHS = {768: "sd1", 1024: "sd2"}
"""Real-size hidden width of the only text encoder of an SD1 (CLIP-L) or SD2 (OpenCLIP-H) model."""

_FLUX_MARKERS = re.compile(
    r"(^|[._])(double_blocks|single_blocks|single_transformer_blocks)[._]\d"
    r"|^(transformer\.)?transformer_blocks\.\d+\.(attn|ff|ff_context|norm1)"
    r"|^lora_transformer_"
    r"|(^|\.)(context_embedder|x_embedder)\."
)
_UNET_MARKERS = re.compile(
    r"(^|[._])(down_blocks|up_blocks|mid_block|input_blocks|output_blocks|middle_block)[._]\d?"
    r"|^(lora_unet_|unet\.)"
)
_SDXL_MARKERS = re.compile(
    r"^(lora_te2_|lora_te1_|text_encoder_2\.)"
    r"|(^|[._])add_embedding[._]"
    r"|(attentions|input_blocks[._]\d+|output_blocks[._]\d+|middle_block)[._]\d[._]transformer_blocks[._][1-9]"
    r"|mid_block[._]attentions[._]0[._]transformer_blocks[._][1-9]"
)
_SHALLOW_ATTENTION = re.compile(r"input_blocks[._][12][._]1[._]|down_blocks[._]0[._]attentions[._]")
"""SD1/SD2 have attention in their first down block (LDM input_blocks 1 and 2); SDXL's first down block has none."""

_CROSS_KEY = re.compile(r"attn2[._](to_k|to_v)([._]|$)")
_TEXT_KEY = re.compile(r"^(lora_te_|text_encoder\.).*(q_proj|k_proj|v_proj)([._]|$)")
_FAMILY_PATTERNS = (
    ("flux", re.compile(r"flux", re.IGNORECASE)),
    ("sdxl", re.compile(r"sdxl|\bsd[-_ ]?xl|stable-diffusion-xl|pony|illustrious|noobai", re.IGNORECASE)),
    ("sd2", re.compile(r"\bsd[-_ ]?v?2(?!\d)|stable-diffusion-v2", re.IGNORECASE)),
    ("sd1", re.compile(r"\bsd[-_ ]?v?1(?!\d)|stable-diffusion-v1", re.IGNORECASE)),
)
SD2_CROSS_ATTENTION_WIDTH = 1024
"""OpenCLIP-H's hidden width: what an SD 2.x UNet's cross-attention reads (SD 1.x reads CLIP-L's 768)."""
_TEXT_LAYER = re.compile(r"^(lora_te_|text_encoder\.)(text_model[._])?encoder[._]layers[._](\d+)[._]")


@dataclass(frozen=True)
class FamilyEvidence:
    """What the metadata and the key structure say about an adapter's base family.

    ``candidates`` are the families the structure allows (empty when the keys are not recognisable);
    ``from_metadata`` is the family the metadata names, if any; ``family`` is the conclusion.
    """

    family: str
    candidates: frozenset[str]
    from_metadata: str | None
    reason: str


def family_from_metadata(metadata: Mapping[str, str]) -> str | None:
    """The family a file's metadata names, or None when it names none we know."""
    own = metadata.get("base_family", "").strip().lower()
    if own in ALL_FAMILIES:
        return own
    for key in ("modelspec.architecture", "ss_base_model_version"):
        found = family_from_text(metadata.get(key))
        if found:
            return found
    if metadata.get("ss_v2", "").strip().lower() == "true":
        return "sd2"
    return None


def family_from_text(text: str | None) -> str | None:
    """Map a base-model string from any source ("SD 1.5", "sdxl_base_v1-0", "Flux.1 D", "stable-diffusion-v1/lora",
    "SDXL", "Pony") to a family, or None when it names none we know (e.g. SD3)."""
    if not text:
        return None
    for family, pattern in _FAMILY_PATTERNS:
        if pattern.search(text):
            return family
    return None


def pipeline_family(pipe: Any) -> str:
    """The base family of a loaded diffusers pipeline: "flux", "sdxl", "sd2", "sd1" or "unknown".

    Decided from its components (duck-typed, so subclasses and pipelines from any source work): a transformer with
    a ``context_embedder`` is Flux; a UNet with SDXL's ``text_time`` added embedding and a second text encoder is
    SDXL; otherwise a UNet reading 1024-wide text states is SD 2.x and any other UNet SD 1.x.
    """
    transformer = getattr(pipe, "transformer", None)
    if transformer is not None and hasattr(transformer, "context_embedder"):
        return "flux"
    config = getattr(getattr(pipe, "unet", None), "config", None)
    if config is None or getattr(pipe, "text_encoder", None) is None:
        return "unknown"
    if (
        getattr(config, "addition_embed_type", None) == "text_time"
        and getattr(pipe, "text_encoder_2", None) is not None
    ):
        return "sdxl"
    return "sd2" if getattr(config, "cross_attention_dim", None) == SD2_CROSS_ATTENTION_WIDTH else "sd1"


def structural_candidates(shapes: Mapping[str, tuple[int, ...]]) -> tuple[frozenset[str], str]:
    """Families the key names and shapes allow, with a short reason (header-only: names and shapes suffice).

    ``shapes`` maps raw tensor names (as stored in the file) to their shapes.
    """
    keys = list(shapes)
    denoiser_keys = [k for k in keys if not _is_text_key(k)]
    if any(_FLUX_MARKERS.search(k) for k in denoiser_keys):
        return frozenset({"flux"}), "Flux transformer blocks"
    unet = any(_UNET_MARKERS.search(k) for k in denoiser_keys) or any(
        k.startswith(("lora_te_", "lora_te1_", "lora_te2_", "text_encoder")) for k in keys
    )
    if not unet:
        return frozenset(), "no recognisable denoiser structure"
    if any(_SDXL_MARKERS.search(k) for k in keys):
        return frozenset({"sdxl"}), "second text encoder / deep transformer blocks / add_embedding (SDXL)"
    width = _cross_attention_width(shapes)
    if width in CROSS_ATTENTION_WIDTHS:
        family = CROSS_ATTENTION_WIDTHS[width]
        return frozenset({family}), f"cross-attention width {width}"
    text_width = _text_hidden_width(shapes)
    if text_width in _TEXT_HIDDEN_WIDTHS:
        family = _TEXT_HIDDEN_WIDTHS[text_width]
        return frozenset({family}), f"text-encoder width {text_width}"
    if any(k.startswith("lora_te_") for k in keys) or any(_SHALLOW_ATTENTION.search(k) for k in keys):
        return frozenset({"sd1", "sd2"}), "single text encoder / attention in the first input blocks (SD1/SD2)"
    if _max_text_layer(keys) >= 12:
        return frozenset({"sd2"}), "more than 12 text-encoder layers with one text encoder (SD2)"
    return UNET_FAMILIES, "UNet structure"


def _is_text_key(key: str) -> bool:
    return key.startswith(("lora_te", "text_encoder", "te_", "te1_", "te2_"))


def _in_features(shape: tuple[int, ...], key: str) -> int | None:
    """Input width of the layer a factor belongs to, for factors whose shape reveals it."""
    if key.endswith(("lora_down.weight", "lora_A.weight", "lora.down.weight", "down.weight", "hada_w1_b", "hada_w2_b")):
        return int(shape[1]) if len(shape) >= 2 else None
    return None


def _cross_attention_width(shapes: Mapping[str, tuple[int, ...]]) -> int | None:
    for key, shape in shapes.items():
        if not _is_text_key(key) and _CROSS_KEY.search(key):
            width = _in_features(shape, key)
            if width is not None:
                return width
    return None


def _text_hidden_width(shapes: Mapping[str, tuple[int, ...]]) -> int | None:
    for key, shape in shapes.items():
        if _TEXT_KEY.search(key):
            width = _in_features(shape, key)
            if width is not None:
                return width
    return None


def _max_text_layer(keys: list[str]) -> int:
    best = -1
    for key in keys:
        match = _TEXT_LAYER.search(key)
        if match:
            best = max(best, int(match.group(3)))
    return best


def detect_family(shapes: Mapping[str, tuple[int, ...]], metadata: Mapping[str, str]) -> FamilyEvidence:
    """Combine metadata and structure into one family ("unknown" when neither decides).

    Metadata wins among the structurally possible families; a lone structural candidate wins otherwise;
    an undecided UNet defaults to ``sd1`` (by far the most common UNet adapter).
    """
    candidates, reason = structural_candidates(shapes)
    named = family_from_metadata(metadata)
    if named is not None and (not candidates or named in candidates):
        return FamilyEvidence(named, candidates, named, f"metadata names {named}")
    if len(candidates) == 1:
        (only,) = candidates
        return FamilyEvidence(only, candidates, named, reason)
    if candidates and candidates <= UNET_FAMILIES:
        return FamilyEvidence("sd1", candidates, named, f"{reason}; SD1 assumed")
    return FamilyEvidence("unknown", candidates, named, reason)


_CHECKPOINT_UNET = "model.diffusion_model."
_OPEN_CLIP_SD2 = "cond_stage_model.model."
_SDXL_SECOND_TEXT = "conditioner.embedders.1."
_CHECKPOINT_TEXT = ("cond_stage_model.", "conditioner.", "text_encoders.", "first_stage_model.", "vae.")


_BFL_BLOCKS = re.compile(r"^(double_blocks|single_blocks)\.\d+\.")
_SD3_BLOCKS = re.compile(r"^joint_blocks\.\d+\.")
_DIFFUSERS_TRANSFORMER = re.compile(
    r"^(transformer_blocks|single_transformer_blocks)\.\d+\.|^(x_embedder|context_embedder)\."
)


def checkpoint_family(shapes: Mapping[str, tuple[int, ...]]) -> FamilyEvidence:
    """The family of a base-model checkpoint in an original single-file layout, from its key names and shapes.

    FLUX transformers have BFL's double/single blocks and ``img_in`` (bare or under ``model.diffusion_model.``);
    an LDM UNet (``model.diffusion_model.input_blocks…``) is SDXL when it has the second text encoder, the
    ``label_emb`` size conditioning or transformer depth above one, SD 2.x when its text encoder is OpenCLIP
    (``cond_stage_model.model.``), its cross-attention reads 1024-wide states or its transformers project with linear
    layers, and SD 1.x otherwise. ``family`` is "unknown" when the keys hold no denoiser of these; the reason then
    says what the file holds when it is a known other model (an SD 3.x MMDiT, a transformer in diffusers' layout).
    """
    denoiser = [k for k in shapes if not k.startswith(_CHECKPOINT_TEXT)]
    bare = [k.removeprefix(_CHECKPOINT_UNET) for k in denoiser]
    if any(_BFL_BLOCKS.match(k) for k in bare) and "img_in.weight" in bare:
        return FamilyEvidence("flux", frozenset({"flux"}), None, "FLUX double/single-stream blocks")
    if any(_SD3_BLOCKS.match(k) for k in bare):
        return FamilyEvidence(
            "unknown", frozenset(), None, "a Stable Diffusion 3 / 3.5 model (MMDiT joint_blocks), not supported"
        )
    if any(_DIFFUSERS_TRANSFORMER.match(k) for k in bare):
        which = "a FLUX" if any(k.startswith("single_transformer_blocks.") for k in bare) else "an SD3"
        return FamilyEvidence(
            "unknown",
            frozenset(),
            None,
            f"{which} transformer in diffusers' layout (transformer_blocks…), which needs its config.json",
        )
    unet = [k for k in denoiser if k.startswith(_CHECKPOINT_UNET)]
    if not any(_UNET_MARKERS.search(k) for k in unet):
        return FamilyEvidence(
            "unknown", frozenset(), None, "no FLUX transformer and no LDM UNet (model.diffusion_model.)"
        )
    if (
        any(k.startswith(_SDXL_SECOND_TEXT) for k in shapes)
        or any(k.startswith(f"{_CHECKPOINT_UNET}label_emb.") for k in unet)
        or any(_SDXL_MARKERS.search(k) for k in unet)
    ):
        return FamilyEvidence("sdxl", frozenset({"sdxl"}), None, "second text encoder / size conditioning (SDXL)")
    widths = {shapes[k][1] for k in unet if _CROSS_KEY.search(k) and len(shapes[k]) == 2}
    linear_proj = any(k.endswith(".proj_in.weight") and len(shapes[k]) == 2 for k in unet)
    if any(k.startswith(_OPEN_CLIP_SD2) for k in shapes) or SD2_CROSS_ATTENTION_WIDTH in widths or linear_proj:
        return FamilyEvidence("sd2", frozenset({"sd2"}), None, "OpenCLIP text encoder / linear projections (SD 2.x)")
    return FamilyEvidence("sd1", frozenset({"sd1"}), None, "LDM UNet with a CLIP-L text encoder (SD 1.x)")
