"""Layer groups for block weights: which A1111 "LoRA Block Weight" block each adapted module belongs to.

Block-weight vectors (``<lora:name:1:lbw=1,0,0,...>``) scale an adapter per block of the denoiser. The block
names follow the original LDM numbering that sd-webui-lora-block-weight uses; diffusers names modules
differently, so this file derives the LDM number of every diffusers module **from the model's own structure**
(its module names), never from a hard-coded table. That is what makes the tiny test UNets work.

UNets (SD 1.x/2.x, SDXL)
    ``conv_in`` is ``IN00``; down block *b* contributes one input block per resnet (its attention of the same
    index rides along) and one more for its downsampler, numbered consecutively from ``IN01``; ``mid_block`` is
    ``M00``; up block *b* contributes one output block per resnet, numbered from ``OUT00``, its upsampler
    belonging to the block of its last resnet. Text encoders are ``BASE``. Everything outside the numbered blocks
    (time/add embeddings, ``conv_norm_out``, ``conv_out``) is ``OTHER``.

    Two vector forms are accepted, as in A1111:

    * **short** — ``BASE``, every input block that holds attention, ``M00``, every output block that holds
      attention. On SD 1.x this is exactly A1111's 17 (BASE, IN01, IN02, IN04, IN05, IN07, IN08, MID,
      OUT03…OUT11), on SDXL its 12 (BASE, IN04, IN05, IN07, IN08, MID, OUT00…OUT05). A smaller UNet (the tiny
      presets: fewer down blocks, fewer layers per block) gets a shorter vector by the same rule — e.g. a
      2-level UNet with attention only in its second level has 7 entries.
    * **full** — ``BASE``, every input block, ``M00``, every output block (SD 1.x: A1111's 26, SDXL: 20).

    As in A1111 (its ``to26`` expansion), numbered blocks a short vector does not list (``conv_in``,
    downsamplers, resnet-only blocks — they only matter for LoCon/conv adapters) get weight 0, while ``OTHER``
    modules are never scaled by a vector (weight 1; A1111 leaves modules it cannot place at 1 as well).

FLUX (and Kontext)
    ``transformer_blocks.i`` is ``Dii``, ``single_transformer_blocks.i`` is ``Sii``; the input embedders are
    ``IN`` and ``norm_out``/``proj_out`` are ``OUT``; ``text_encoder`` (CLIP) is ``CLIP`` and ``text_encoder_2``
    (T5) is ``T5``. Short form: ``BASE`` (both text encoders), then every double block, then every single block
    (58 on FLUX.1-dev); ``IN``/``OUT`` keep weight 1. Full form: A1111's 61 order — CLIP, T5, IN, D00…, S00…, OUT.

The engine builds a :class:`BlockLayout` once per attach (a module walk) and keeps each layer's group index;
nothing here runs per step.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import torch

from fusion.errors import CompositionError

BASE = "BASE"
MID = "M00"
OTHER = "OTHER"
FLUX_IN = "IN"
FLUX_OUT = "OUT"
CLIP = "CLIP"
T5 = "T5"

UNET_FAMILIES = ("sd1", "sd2", "sdxl")
DIT_FAMILIES = ("flux",)

_UNET_BLOCK = re.compile(
    r"^(down_blocks|up_blocks)\.(\d+)\.(resnets|attentions|downsamplers|upsamplers)\.(\d+)(?:\.|$)"
)
_FLUX_BLOCK = re.compile(r"^(transformer_blocks|single_transformer_blocks)\.(\d+)(?:\.|$)")
_FLUX_INPUTS = ("x_embedder", "context_embedder", "time_text_embed", "pos_embed")
_FLUX_OUTPUTS = ("norm_out", "proj_out")


@dataclass(frozen=True)
class VectorForm:
    """One accepted length of block-weight vector: what each position sets, in order.

    ``slots`` are the position labels (A1111's block IDs); ``targets[i]`` are the groups position *i* sets
    (one group, except FLUX's short ``BASE`` which sets both text encoders). ``zeroed`` are the groups this form
    leaves at 0 when it does not list them; every other unlisted group keeps weight 1.
    """

    name: str
    slots: tuple[str, ...]
    targets: tuple[tuple[str, ...], ...]
    zeroed: frozenset[str] = frozenset()

    def __len__(self) -> int:
        return len(self.slots)


@dataclass(frozen=True)
class BlockLayout:
    """The layer groups of one denoiser (plus its text encoders) and the block-weight vector forms it accepts.

    Build it with :meth:`from_module_names` or :meth:`from_denoiser`; map canonical layer keys to groups with
    :meth:`group_of`; turn a vector into per-group weights with :meth:`vector_weights`.
    """

    family: str
    kind: str
    groups: tuple[str, ...]
    short: VectorForm
    full: VectorForm
    input_attention: tuple[str, ...] = ()
    output_attention: tuple[str, ...] = ()
    _unet_inputs: dict[tuple[int, str, int], str] = field(default_factory=dict, repr=False)
    _unet_outputs: dict[tuple[int, str, int], str] = field(default_factory=dict, repr=False)

    @property
    def is_unet(self) -> bool:
        """True for UNet layouts (SD 1.x/2.x, SDXL), False for FLUX-style DiTs."""
        return self.kind == "unet"

    @classmethod
    def from_denoiser(cls, family: str, denoiser: torch.nn.Module) -> BlockLayout:
        """Layout of a live denoiser (UNet2DConditionModel or FluxTransformer2DModel)."""
        return cls.from_module_names(family, (name for name, _ in denoiser.named_modules()))

    @classmethod
    def from_module_names(cls, family: str, names: Iterable[str]) -> BlockLayout:
        """Layout from the denoiser's module (or parameter) names; the family picks UNet or DiT numbering.

        ``family="unknown"`` is resolved from the names (``down_blocks`` → UNet, ``transformer_blocks`` → DiT).
        """
        names = list(names)
        kind = _kind_of(family, names)
        if kind == "unet":
            return _unet_layout(family, names)
        return _flux_layout(family, names)

    def group_of(self, key: str) -> str:
        """The group of a canonical layer key (denoiser path, or ``text_encoder[_2].<path>``).

        Module-path prefixes work too (``down_blocks.1.attentions.0``, ``text_encoder``, ``transformer_blocks.3``).
        """
        if (key + ".").startswith("text_encoder_2."):
            return BASE if self.is_unet else T5
        if (key + ".").startswith("text_encoder."):
            return BASE if self.is_unet else CLIP
        if self.is_unet:
            return self._unet_group(key)
        return _flux_group(key)

    def group_index(self, key: str) -> int:
        """Position of :meth:`group_of` in :attr:`groups` (what a weight table is indexed by)."""
        return self.groups.index(self.group_of(key))

    def vector_weights(self, values: Sequence[float]) -> dict[str, float]:
        """Per-group weights for a block-weight vector of either accepted length.

        Raises :class:`CompositionError` naming both accepted lengths when ``values`` fits neither.
        """
        form = self.form_for_length(len(values))
        weights = {group: (0.0 if group in form.zeroed else 1.0) for group in self.groups}
        for targets, value in zip(form.targets, values):
            for group in targets:
                weights[group] = float(value)
        return weights

    def form_for_length(self, length: int) -> VectorForm:
        """The vector form with ``length`` entries, or a :class:`CompositionError` listing the valid lengths."""
        for form in (self.short, self.full):
            if len(form) == length:
                return form
        raise CompositionError(
            f"a block-weight vector for this {self.family} denoiser needs {len(self.short)} values "
            f"({','.join(self.short.slots)}) or {len(self.full)} ({','.join(self.full.slots)}), got {length}",
            hint="use one value per block in that order, or a preset name such as ALL or OUTALL",
        )

    def _unet_group(self, key: str) -> str:
        if (key + ".").startswith("mid_block."):
            return MID
        if (key + ".").startswith("conv_in."):
            return "IN00"
        match = _UNET_BLOCK.match(key)
        if match is None:
            return OTHER
        side, block, part, index = match.group(1), int(match.group(2)), match.group(3), int(match.group(4))
        if side == "down_blocks":
            return self._unet_inputs.get((block, part, index), OTHER)
        return self._unet_outputs.get((block, part, index), OTHER)


def _kind_of(family: str, names: Sequence[str]) -> str:
    if family in UNET_FAMILIES:
        return "unet"
    if family in DIT_FAMILIES:
        return "dit"
    if any(n.startswith("down_blocks.") for n in names):
        return "unet"
    if any(n.startswith(("transformer_blocks.", "single_transformer_blocks.")) for n in names):
        return "dit"
    raise CompositionError(
        f"cannot place block weights on a {family!r} denoiser: it has neither UNet down_blocks nor DiT "
        "transformer_blocks",
        hint="block weights work on SD 1.x/2.x, SDXL and FLUX denoisers",
    )


def _unet_layout(family: str, names: Sequence[str]) -> BlockLayout:
    parts: dict[tuple[str, int, str], set[int]] = {}
    for name in names:
        match = _UNET_BLOCK.match(name)
        if match:
            parts.setdefault((match.group(1), int(match.group(2)), match.group(3)), set()).add(int(match.group(4)))
    num_down = 1 + max((b for side, b, _ in parts if side == "down_blocks"), default=-1)
    num_up = 1 + max((b for side, b, _ in parts if side == "up_blocks"), default=-1)
    if num_down == 0 or num_up == 0:
        raise CompositionError(f"this {family} denoiser has no diffusers UNet down_blocks/up_blocks to number")

    inputs, all_inputs, attn_inputs = _number_side(parts, "down_blocks", num_down, "IN", first=1)
    outputs, all_outputs, attn_outputs = _number_side(parts, "up_blocks", num_up, "OUT", first=0)
    all_inputs.insert(0, "IN00")

    short_slots = (BASE, *attn_inputs, MID, *attn_outputs)
    full_slots = (BASE, *all_inputs, MID, *all_outputs)
    listed = set(short_slots)
    return BlockLayout(
        family=family,
        kind="unet",
        groups=(*full_slots, OTHER),
        short=VectorForm(
            "short",
            short_slots,
            tuple((s,) for s in short_slots),
            zeroed=frozenset(g for g in full_slots if g not in listed),
        ),
        full=VectorForm("full", full_slots, tuple((s,) for s in full_slots)),
        input_attention=tuple(attn_inputs),
        output_attention=tuple(attn_outputs),
        _unet_inputs=inputs,
        _unet_outputs=outputs,
    )


def _number_side(
    parts: dict[tuple[str, int, str], set[int]], side: str, blocks: int, prefix: str, *, first: int
) -> tuple[dict[tuple[int, str, int], str], list[str], list[str]]:
    """Label one side of a UNet (``side`` is ``"down_blocks"`` or ``"up_blocks"``) the way A1111 numbers it:
    ``{prefix}{n:02d}`` from ``first``, one label per resnet shared with the attention after it; a downsampler
    takes the next label of its own, an upsampler shares its block's last. Returns the label of every
    ``(block, part, index)``, every label in order, and the labels that hold an attention."""
    labels: dict[tuple[int, str, int], str] = {}
    every: list[str] = []
    attention: list[str] = []
    position = first
    for block in range(blocks):
        resnets = len(parts.get((side, block, "resnets"), ()))
        attentions = parts.get((side, block, "attentions"), set())
        for j in range(resnets):
            label = f"{prefix}{position:02d}"
            labels[(block, "resnets", j)] = labels[(block, "attentions", j)] = label
            every.append(label)
            if j in attentions:
                attention.append(label)
            if side == "up_blocks" and j == resnets - 1:
                labels[(block, "upsamplers", 0)] = label
            position += 1
        if side == "down_blocks" and parts.get((side, block, "downsamplers")):
            label = f"{prefix}{position:02d}"
            labels[(block, "downsamplers", 0)] = label
            every.append(label)
            position += 1
    return labels, every, attention


def _flux_layout(family: str, names: Sequence[str]) -> BlockLayout:
    doubles: set[int] = set()
    singles: set[int] = set()
    for name in names:
        match = _FLUX_BLOCK.match(name)
        if match:
            (doubles if match.group(1) == "transformer_blocks" else singles).add(int(match.group(2)))
    double_labels = tuple(f"D{i:02d}" for i in sorted(doubles))
    single_labels = tuple(f"S{i:02d}" for i in sorted(singles))
    short_slots = (BASE, *double_labels, *single_labels)
    full_slots = (CLIP, T5, FLUX_IN, *double_labels, *single_labels, FLUX_OUT)
    return BlockLayout(
        family=family,
        kind="dit",
        groups=(*full_slots, OTHER),
        short=VectorForm("short", short_slots, ((CLIP, T5), *((s,) for s in double_labels + single_labels))),
        full=VectorForm("full", full_slots, tuple((s,) for s in full_slots)),
    )


def _flux_group(key: str) -> str:
    match = _FLUX_BLOCK.match(key)
    if match:
        prefix = "D" if match.group(1) == "transformer_blocks" else "S"
        return f"{prefix}{int(match.group(2)):02d}"
    if key.startswith(_FLUX_INPUTS):
        return FLUX_IN
    if key.startswith(_FLUX_OUTPUTS):
        return FLUX_OUT
    return OTHER
