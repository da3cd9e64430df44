"""Header-only recognition of adapter file layouts: which producer wrote a file, and which modules it adapts.

Works from tensor names and shapes alone (no tensor data), so the catalog scanner can classify a large library
quickly. Each layout is recognised by the suffixes its producer gives the tensors of one adapted module:

===================  ============================================================================================
format               tensor names of one module
===================  ============================================================================================
diffusers            ``unet.<path>.lora_A.weight`` / ``lora_B`` (also ``transformer.``, ``text_encoder[_2].``),
                     or the older ``<path>.lora.down.weight`` / ``processor.to_q_lora.down.weight`` styles
peft                 ``base_model.model.<path>.lora_A.weight`` or bare ``<path>.lora_A.weight``
kohya / kohya-ldm    ``lora_unet_<path_with_underscores>.lora_down.weight`` / ``lora_up`` / ``alpha``, ``lora_te[12]_``;
                     ``kohya-ldm`` when the UNet path uses ``input_blocks/middle_block/output_blocks``
flux-kohya           ``lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight`` (or ``lora_transformer_…``)
flux-xlabs           ``double_blocks.0.processor.proj_lora1.down.weight``
flux-bfl             ``diffusion_model.double_blocks.0.img_attn.qkv.lora_A.weight``
flux-ai-toolkit      diffusers keys under ``transformer.``, written by ai-toolkit (its ``software`` metadata)
lycoris-loha         ``<name>.hada_w1_a`` / ``hada_w1_b`` / ``hada_w2_a`` / ``hada_w2_b`` / ``alpha`` (``hada_t1/t2``)
lycoris-lokr         ``<name>.lokr_w1`` or ``lokr_w1_a/b``, ``lokr_w2`` or ``lokr_w2_a/b``, ``lokr_t2``, ``alpha``
lycoris              other LyCORIS algorithms: ``lora_mid`` (Tucker LoCon), ``dora_scale``, ``diff``/``diff_b``,
                     IA3 ``weight``/``on_input``, ``oft_blocks``, GLoRA ``a1/a2/b1/b2.weight``, ``w_norm/b_norm``,
                     or LyCORIS's standalone ``lycoris_<path>`` names
shira                ``<component>.<path>.shira_index`` / ``shira_values`` / ``shira_shape`` (ours)
peft-shira           ``<path>.shira_indices`` (2×K rows/cols) / ``<path>.shira_weight`` (PEFT)
===================  ============================================================================================
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

from fusion.errors import UnknownLayoutError

DOWN_SUFFIXES = (
    ".lora_A.weight",
    ".lora_down.weight",
    ".lora.down.weight",
    "_lora.down.weight",
    ".lora_linear_layer.down.weight",
    ".down.weight",
)
"""Suffixes of the tensor that names a LoRA module and carries its rank (its first dimension)."""

AUX_SUFFIXES = (
    ".lora_B.weight",
    ".lora_B.bias",
    ".lora_up.weight",
    ".lora.up.weight",
    "_lora.up.weight",
    ".lora_linear_layer.up.weight",
    ".up.weight",
    ".alpha",
    ".dora_scale",
    ".lora_magnitude_vector",
    ".lora_mid.weight",
    ".hada_w1_b",
    ".hada_w2_a",
    ".hada_w2_b",
    ".hada_t1",
    ".hada_t2",
    ".lokr_w1_b",
    ".lokr_w2",
    ".lokr_w2_a",
    ".lokr_w2_b",
    ".lokr_t2",
    ".shira_values",
    ".shira_shape",
    ".shira_weight",
    ".diff_b",
    ".rescale",
    ".a2.weight",
    ".b1.weight",
    ".b2.weight",
    ".bm.weight",
    ".b_norm",
)
"""Suffixes of the other tensors a module owns (they never name a module by themselves)."""

LYCORIS_HEADS = (".diff", ".on_input", ".oft_blocks", ".a1.weight", ".w_norm")
"""Tensors that name a module of the LyCORIS algorithms other than LoCon/LoHa/LoKr."""

HEAD_SUFFIXES = (
    *DOWN_SUFFIXES,
    ".hada_w1_a",
    ".lokr_w1_a",
    ".lokr_w1",
    ".shira_index",
    ".shira_indices",
    *LYCORIS_HEADS,
)

TEXT_PREFIXES = ("lora_te_", "lora_te1_", "lora_te2_", "text_encoder.", "text_encoder_2.", "te_", "te1_", "te2_")

_LDM_BLOCKS = re.compile(r"^lora_unet_(input_blocks|middle_block|output_blocks|out_\d|time_embed_\d|label_emb)")
_LYCORIS_ONLY = (*LYCORIS_HEADS, ".lora_mid.weight", ".diff_b", ".b_norm")
_FLUX_KOHYA = re.compile(r"^lora_(unet_(double_blocks|single_blocks|final_layer|img_in|txt_in)|transformer_)")


@dataclass(frozen=True)
class Layout:
    """What the header says about an adapter: its format and, per adapted module, its rank (None if not LoRA-like)."""

    format: str
    modules: dict[str, int | None]
    text_modules: frozenset[str]
    unrecognised: tuple[str, ...]

    @property
    def ranks(self) -> tuple[int, ...]:
        """Sorted distinct ranks of the LoRA-like modules."""
        return tuple(sorted({r for r in self.modules.values() if r is not None}))


def _module_stem(key: str) -> tuple[str, str] | None:
    """(module stem, head suffix) for a tensor that names a module, else None."""
    if key.endswith(".shira_indices") or ".shira_indices." in key:
        return key.split(".shira_indices")[0], ".shira_indices"
    for suffix in HEAD_SUFFIXES:
        if key.endswith(suffix):
            return key[: -len(suffix)], suffix
    return None


def _is_aux(key: str) -> bool:
    return key.endswith(AUX_SUFFIXES) or ".shira_weight" in key


def _rank(suffix: str, shape: tuple[int, ...]) -> int | None:
    if suffix in DOWN_SUFFIXES and shape:
        return int(shape[0])
    if suffix in (".hada_w1_a", ".lokr_w1_a") and len(shape) >= 2:
        return int(shape[1])
    return None


def classify_format(keys: list[str], metadata: Mapping[str, str]) -> str:
    """Name the producer layout of a file from its tensor names (see the module table)."""
    if any(k.endswith(".shira_index") for k in keys):
        return "shira"
    if any(".shira_indices" in k or ".shira_weight" in k for k in keys):
        return "peft-shira"
    if any(k.endswith(".hada_w1_a") for k in keys):
        return "lycoris-loha"
    if any(k.endswith((".lokr_w1", ".lokr_w1_a")) for k in keys):
        return "lycoris-lokr"
    kohya_dora = any(k.endswith(".dora_scale") for k in keys) and not any(".lora_A." in k for k in keys)
    if kohya_dora or any(k.endswith(_LYCORIS_ONLY) or k.startswith("lycoris_") for k in keys):
        return "lycoris"
    if any(_FLUX_KOHYA.search(k) for k in keys):
        return "flux-kohya"
    if any(".processor.proj_lora" in k or ".processor.qkv_lora" in k for k in keys):
        return "flux-xlabs"
    if any(k.startswith(("diffusion_model.double_blocks", "diffusion_model.single_blocks")) for k in keys):
        return "flux-bfl"
    if any(k.startswith("lora_unet_") for k in keys) or all(k.startswith(TEXT_PREFIXES[:3]) for k in keys):
        return "kohya-ldm" if any(_LDM_BLOCKS.search(k) for k in keys) else "kohya"
    if any(k.startswith("transformer.") for k in keys):
        software = " ".join(v.lower() for k, v in metadata.items() if k in ("software", "ss_training_comment", "name"))
        return "flux-ai-toolkit" if "ai-toolkit" in software or "ai_toolkit" in software else "diffusers"
    if any(k.startswith(("unet.", "text_encoder.", "text_encoder_2.")) for k in keys):
        return "diffusers"
    if any(k.endswith((".lora_A.weight", ".lora.down.weight")) for k in keys):
        return "peft"
    return "unknown"


def read_layout(shapes: Mapping[str, tuple[int, ...]], metadata: Mapping[str, str], path: object = None) -> Layout:
    """Classify a header's tensors into modules; raise :class:`UnknownLayoutError` when no layout fits."""
    keys = list(shapes)
    fmt = classify_format(keys, metadata)
    if fmt == "unknown" or not keys:
        sample = ", ".join(repr(k) for k in keys[:5]) or "(no tensors)"
        raise UnknownLayoutError(
            f"no known adapter layout matches these tensor names: {sample}",
            path=path,
            hint="supported: diffusers/PEFT, kohya/A1111 (SD1, SDXL, Flux), xlabs, LyCORIS LoHa/LoKr, SHiRA",
        )
    modules: dict[str, int | None] = {}
    unrecognised: list[str] = []
    for key in keys:
        stem = _module_stem(key)
        if stem is not None:
            name, suffix = stem
            modules[name] = modules.get(name) or _rank(suffix, shapes[key])
        elif not _is_aux(key) and not (key.endswith(".weight") and key[: -len(".weight")] + ".on_input" in shapes):
            unrecognised.append(key)
    text = frozenset(m for m in modules if _strip_container(m).startswith(TEXT_PREFIXES))
    if not modules:
        sample = ", ".join(repr(k) for k in keys[:5])
        raise UnknownLayoutError(f"{fmt} layout recognised but no adapted module found: {sample}", path=path)
    return Layout(format=fmt, modules=modules, text_modules=text, unrecognised=tuple(unrecognised))


def _strip_container(name: str) -> str:
    return name.removeprefix("base_model.model.")
