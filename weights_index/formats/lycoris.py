"""LyCORIS files (every algorithm it writes) and PEFT LoHa/LoKr checkpoints, read into exact canonical updates.

This module groups a file's tensors by module, maps module names onto the model and dispatches each module to its
algorithm; LoHa and LoKr are rebuilt here (in fp32 whatever the file's dtype), the others in
:mod:`weights_index.formats.lycoris_algorithms`.

Semantics (as LyCORIS, A1111, ComfyUI and diffusers' LoKr conversion apply them):

- **LoHa** ΔW = (alpha / r) · (w1a @ w1b) ⊙ (w2a @ w2b), r = ``hada_w1_b.shape[0]``; with Tucker cores the factors
  are rebuilt first, W1[p, q, …] = Σ_ij t1[i, j, …] · w1a[i, p] · w1b[j, q] (w1a/w1b are then (r, out) / (r, in)).
  Without Tucker, the row-wise Khatri-Rao identity (A B) ⊙ (C D) = Σ_(k,l) (A_:k C_:l)(B_k: D_l:) makes it an exact
  :class:`LowRank` of rank r1·r2, used when that stores fewer numbers than ΔW; otherwise :class:`Dense`.
- **LoKr** ΔW = s · kron(W1, W2), W1 = ``lokr_w1`` or ``w1_a @ w1_b``, W2 = ``lokr_w2`` or ``w2_a @ w2_b`` (Tucker:
  rebuilt with ``lokr_t2``); s = alpha / r with r = ``lokr_w2_b.shape[0]`` (else ``lokr_w1_b``'s), and s = 1 when
  both factors are full matrices (LyCORIS' "full matrix" mode) or no alpha is stored. For linear layers with a
  low-rank W2, kron(W1, w2a @ w2b) = kron(W1, w2a) @ kron(I, w2b) is an exact :class:`LowRank` of rank m·r, used
  when cheaper; otherwise :class:`Dense`.

Module names are kohya's (``lora_unet_…``, ``lora_te1_…``; LyCORIS' standalone ``lycoris_…``) or dotted diffusers
/ PEFT paths. Given the model's weight shapes, kohya names are matched against the model's own module paths (this
covers SD, SDXL and diffusers-named Flux files, and CLIP paths with or without ``text_model``); otherwise, and for
LDM-named files, diffusers' own kohya renaming maps them. PEFT LoHa/LoKr checkpoints store no alpha: their scale
alpha / r (with rank/alpha patterns) comes from the ``adapter_config.json`` beside the file.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path

import torch

from fusion.adapters import AdapterKind, Dense, LowRank
from fusion.errors import AdapterFormatError, ShapeMismatchError, UnknownLayoutError
from weights_index.formats.lora import PEFT_CONFIG, ScaleConfig, kohya_module_paths, peft_folder_config
from weights_index.formats.lycoris_algorithms import (
    alpha_of,
    full_update,
    glora_update,
    ia3_update,
    locon_update,
    norm_update,
    oft_update,
    require,
    with_dora,
)

LOHA_KEYS = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2")
LOKR_KEYS = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")
LORA_KEYS = ("lora_down.weight", "lora_up.weight", "lora_mid.weight")
GLORA_KEYS = ("a1.weight", "a2.weight", "b1.weight", "b2.weight", "bm.weight")
OTHER_KEYS = ("alpha", "dora_scale", "diff_b", "diff", "on_input", "oft_blocks", "rescale", "w_norm", "b_norm")
PARTS = (*LOHA_KEYS, *LOKR_KEYS, *LORA_KEYS, *GLORA_KEYS, *OTHER_KEYS, "weight")
"""Tensor-name suffixes of one LyCORIS module (``weight`` last: IA3's vector, matched after every ``*.weight``)."""

PREFIXES = {
    "": ("lora_unet_", "lycoris_", "lora_transformer_"),
    "text_encoder.": ("lora_te_", "lora_te1_"),
    "text_encoder_2.": ("lora_te2_",),
}
"""Module-name prefixes LyCORIS/kohya give each component (canonical key prefix → file prefixes)."""


def _group(tensors: Mapping[str, torch.Tensor], path: Path) -> dict[str, dict[str, torch.Tensor]]:
    """Module name → {part: tensor}; unknown tensor names raise UnknownLayoutError listing a few."""
    modules: dict[str, dict[str, torch.Tensor]] = {}
    unknown: list[str] = []
    for key, value in tensors.items():
        for part in PARTS:
            if key.endswith("." + part):
                modules.setdefault(key[: -len(part) - 1], {})[part] = value
                break
        else:
            unknown.append(key)
    if unknown:
        raise UnknownLayoutError(
            f"unrecognised LyCORIS tensors: {', '.join(repr(k) for k in unknown[:5])}",
            path=path,
            hint="supported: LoCon (+Tucker), LoHa, LoKr, DoRA, IA3, full/diff, diag-OFT, BOFT, GLoRA",
        )
    return modules


def _tucker(core: torch.Tensor, left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
    """Rebuild W[p, q, …] = Σ_ij core[i, j, …] · left[i, p] · right[j, q]."""
    return torch.einsum("ij...,ip,jq->pq...", core.float(), left.float(), right.float())


def loha_update(parts: Mapping[str, torch.Tensor], module: str, path: Path, scale: float | None = None) -> AdapterKind:
    """Exact update of one LoHa module (LowRank via Khatri-Rao when cheaper, else Dense), rebuilt in fp32.

    ``scale`` overrides alpha / rank (PEFT files keep their scaling in ``adapter_config.json``)."""
    require(parts, ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"), module, path)
    w1a, w1b, w2a, w2b = (parts[k] for k in ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"))
    rank = int(w1b.shape[0])
    alpha = alpha_of(parts)
    if scale is None:
        scale = 1.0 if alpha is None else alpha / rank
    if "hada_t1" in parts or "hada_t2" in parts:
        require(parts, ("hada_t1", "hada_t2"), module, path)
        try:
            delta = _tucker(parts["hada_t1"], w1a, w1b) * _tucker(parts["hada_t2"], w2a, w2b)
        except RuntimeError as exc:
            raise ShapeMismatchError(f"module {module!r}: inconsistent LoHa Tucker factors ({exc})", path=path) from exc
        return Dense(weight=delta, scale=scale)
    if w1a.dim() != 2 or w2a.dim() != 2 or w1a.shape[1] != w1b.shape[0] or w2a.shape[1] != w2b.shape[0]:
        raise ShapeMismatchError(
            f"module {module!r}: LoHa factors do not chain: w1 {tuple(w1a.shape)}·{tuple(w1b.shape)}, "
            f"w2 {tuple(w2a.shape)}·{tuple(w2b.shape)}",
            path=path,
        )
    if w1a.shape[0] != w2a.shape[0] or w1b.shape[1:] != w2b.shape[1:]:
        raise ShapeMismatchError(f"module {module!r}: the two LoHa products have different shapes", path=path)
    out, r1, r2 = int(w1a.shape[0]), rank, int(w2b.shape[0])
    rest = tuple(int(s) for s in w1b.shape[1:])
    flat_in = math.prod(rest)
    up = (w1a.float()[:, :, None] * w2a.float()[:, None, :]).reshape(out, r1 * r2)
    down = (w1b.float().reshape(r1, 1, flat_in) * w2b.float().reshape(1, r2, flat_in)).reshape(r1 * r2, flat_in)
    conv_shape = _conv_shape(rest, module, path)
    if r1 * r2 * (out + flat_in) < out * flat_in:
        if conv_shape is not None:
            return LowRank(down=down.reshape(r1 * r2, *conv_shape), up=up[:, :, None, None], alpha=scale * r1 * r2)
        return LowRank(down=down, up=up, alpha=scale * r1 * r2)
    delta = up @ down
    if conv_shape is not None:
        delta = delta.reshape(out, *conv_shape)
    return Dense(weight=delta, scale=scale)


def _conv_shape(rest: tuple[int, ...], module: str, path: Path) -> tuple[int, ...] | None:
    """(in, kh, kw) for conv factors stored 4-D; flattened conv factors are read as linear (no kernel info)."""
    if len(rest) == 1:
        return None
    if len(rest) == 3:
        return rest
    raise ShapeMismatchError(f"module {module!r}: unsupported factor rank {len(rest) + 1}", path=path)


def lokr_update(parts: Mapping[str, torch.Tensor], module: str, path: Path, scale: float | None = None) -> AdapterKind:
    """Exact update of one LoKr module (LowRank for linear layers with a low-rank W2 when cheaper, else Dense),
    rebuilt in fp32; ``scale`` overrides alpha / rank as in :func:`loha_update`."""
    if "lokr_w1" in parts:
        w1 = parts["lokr_w1"].float()
    else:
        require(parts, ("lokr_w1_a", "lokr_w1_b"), module, path)
        w1 = _matmul(parts["lokr_w1_a"], parts["lokr_w1_b"], module, path)
    rank: int | None = None
    if "lokr_w1_b" in parts:
        rank = int(parts["lokr_w1_b"].shape[0])
    if "lokr_w2_b" in parts:
        rank = int(parts["lokr_w2_b"].shape[0])
    alpha = alpha_of(parts)
    if scale is None:
        scale = 1.0 if alpha is None or rank is None else alpha / rank
    if "lokr_w2" in parts:
        w2 = parts["lokr_w2"].float()
    else:
        require(parts, ("lokr_w2_a", "lokr_w2_b"), module, path)
        w2a, w2b = parts["lokr_w2_a"].float(), parts["lokr_w2_b"].float()
        if "lokr_t2" in parts:
            w2 = _tucker(parts["lokr_t2"], w2a, w2b)
        elif w2b.dim() == 2 and w1.dim() == 2 and w2a.dim() == 2:
            return _lokr_low_rank(w1, w2a, w2b, scale, module, path)
        else:
            w2 = _matmul(w2a, w2b, module, path)
    if w2.dim() == 4 and w1.dim() == 2:
        w1 = w1[:, :, None, None]
    if w1.dim() != w2.dim():
        raise ShapeMismatchError(f"module {module!r}: LoKr factors of different ranks", path=path)
    return Dense(weight=torch.kron(w1.contiguous(), w2.contiguous()), scale=scale)


def _matmul(a: torch.Tensor, b: torch.Tensor, module: str, path: Path) -> torch.Tensor:
    if a.dim() != 2 or b.dim() != 2 or a.shape[1] != b.shape[0]:
        raise ShapeMismatchError(
            f"module {module!r}: factors {tuple(a.shape)} and {tuple(b.shape)} do not multiply", path=path
        )
    return a.float() @ b.float()


def _lokr_low_rank(
    w1: torch.Tensor, w2a: torch.Tensor, w2b: torch.Tensor, scale: float, module: str, path: Path
) -> AdapterKind:
    if w2a.shape[1] != w2b.shape[0]:
        raise ShapeMismatchError(
            f"module {module!r}: factors {tuple(w2a.shape)} and {tuple(w2b.shape)} do not multiply", path=path
        )
    a, m = (int(s) for s in w1.shape)
    c, r = (int(s) for s in w2a.shape)
    d = int(w2b.shape[1])
    out, inp = a * c, m * d
    if m * r * (out + inp) < out * inp:
        up = torch.kron(w1, w2a)
        down = torch.kron(torch.eye(m), w2b)
        return LowRank(down=down, up=up, alpha=scale * m * r)
    return Dense(weight=torch.kron(w1, w2a @ w2b), scale=scale)


def _names_from_model(shapes: Mapping[str, tuple[int, ...]]) -> dict[str, str]:
    """kohya/LyCORIS module name → canonical key, for every weight of the model (``lora_unet_``/``lycoris_``/
    ``lora_te[12]_`` + the module path with dots as underscores; text encoders with and without ``text_model``)."""
    lookup: dict[str, str] = {}
    for key in shapes:
        component = next((c for c in ("text_encoder_2.", "text_encoder.") if key.startswith(c)), "")
        module = key[len(component) :]
        variants = {module, module.removeprefix("text_model."), f"text_model.{module}"} if component else {module}
        for prefix in PREFIXES[component]:
            for variant in variants:
                lookup.setdefault(prefix + variant.replace(".", "_"), key)
    return lookup


def _kohya_spelling(name: str) -> str:
    """The name as kohya spells it: ``lycoris_`` → ``lora_unet_``, CLIP paths with ``text_model_`` (LyCORIS on
    transformers ≥ 5 writes them without)."""
    if name.startswith("lycoris_"):
        return "lora_unet_" + name.removeprefix("lycoris_")
    for prefix in ("lora_te_", "lora_te1_", "lora_te2_"):
        if name.startswith(prefix) and not name.startswith(prefix + "text_model_"):
            return prefix + "text_model_" + name.removeprefix(prefix)
    return name


def _canonical_names(
    names: list[str], path: Path, layers_per_block: int, shapes: Mapping[str, tuple[int, ...]] | None
) -> dict[str, str]:
    """Map file module names onto canonical keys: through the model's own module names when ``shapes`` is given,
    else (and for names the model lacks, e.g. LDM ``input_blocks``) by diffusers' kohya renaming; dotted PEFT /
    diffusers paths by prefix."""
    from_model = _names_from_model(shapes) if shapes is not None else {}
    result = {n: from_model[n] for n in names if n in from_model}
    rest = [n for n in names if "." not in n and n not in result]
    if rest:
        kohya = {n: _kohya_spelling(n) for n in rest}
        mapped = kohya_module_paths(list(kohya.values()), path, layers_per_block=layers_per_block)
        result.update({n: mapped[kohya[n]] for n in rest})
    for name in names:
        if "." in name:
            bare = name.removeprefix("base_model.model.")
            for prefix in ("unet.", "transformer."):
                bare = bare.removeprefix(prefix)
            result[name] = bare
    return result


def _peft_scale_config(path: Path) -> ScaleConfig | None:
    """The scaling of a PEFT LoHa/LoKr checkpoint (its folder's ``adapter_config.json``: r, alpha, patterns)."""
    raw = peft_folder_config(path)
    if raw is None or str(raw.get("peft_type", "")).upper() not in ("LOHA", "LOKR"):
        return None
    return ScaleConfig.from_mapping(
        {**raw, "lora_alpha": raw.get("alpha", raw.get("r", 8))}, PEFT_CONFIG, path.with_name(PEFT_CONFIG)
    )


def _to_conv(update: AdapterKind, shape: tuple[int, ...]) -> AdapterKind:
    """Give a flattened (out, in·kh·kw) update the conv shape it targets (LyCORIS stores conv LoHa factors flat)."""
    if isinstance(update, LowRank) and not update.is_conv:
        down = update.down.reshape(update.rank, *shape[1:])
        return LowRank(down=down, up=update.up[:, :, None, None], alpha=update.alpha)
    if isinstance(update, Dense):
        return Dense(weight=update.weight.reshape(shape), scale=update.scale, bias=update.bias)
    return update


def _module_update(
    parts: Mapping[str, torch.Tensor], name: str, path: Path, target: tuple[int, ...] | None, scale: float | None
) -> AdapterKind:
    """Dispatch one module to its algorithm's reader; flattened conv factors get the target's conv shape."""
    if "w_norm" in parts or "b_norm" in parts:
        return norm_update(parts, name, path)
    if "oft_blocks" in parts:
        return oft_update(parts, name, path, target)
    if "on_input" in parts or (set(parts) <= {"weight", "alpha"} and "weight" in parts):
        return ia3_update(parts, name, path, target)
    if "a1.weight" in parts:
        return glora_update(parts, name, path)
    update: AdapterKind
    if "diff" in parts:
        update = full_update(parts, name, path)
    elif "hada_w1_a" in parts or "hada_w1_b" in parts:
        update = loha_update(parts, name, path, scale)
    elif any(k.startswith("lokr_") for k in parts):
        update = lokr_update(parts, name, path, scale)
    elif "lora_down.weight" in parts:
        update = locon_update(parts, name, path)
    else:
        raise AdapterFormatError(f"module {name!r} has no factors (only {sorted(parts)})", path=path)
    if target is not None and len(target) == 4 and tuple(update.shape) != tuple(target):
        if math.prod(update.shape) != math.prod(target):
            raise ShapeMismatchError(
                f"module {name!r} has shape {tuple(update.shape)}, the model's weight is {tuple(target)}",
                path=path,
                hint="the adapter was made for a different base model",
            )
        update = _to_conv(update, tuple(target))
    if "dora_scale" in parts:
        return with_dora(update, parts["dora_scale"], name, path, eps=float(torch.finfo(torch.float32).eps))
    return update


def read_lycoris(
    tensors: Mapping[str, torch.Tensor],
    path: Path,
    *,
    layers_per_block: int = 2,
    shapes: Mapping[str, tuple[int, ...]] | None = None,
) -> tuple[dict[str, AdapterKind], dict[str, AdapterKind]]:
    """Read a LyCORIS file (kohya ``lora_unet_…`` / ``lycoris_…`` names, or a PEFT LoHa/LoKr checkpoint) into
    (denoiser layers, text-encoder layers).

    ``shapes`` (canonical key → weight shape of the target model) maps module names through the model's own module
    paths, gives conv updates stored flattened (r, in·kh·kw) their conv shape, and is required for the kinds that
    are functions of the base weight (IA3, OFT/BOFT: :mod:`fusion.relative`). Without it conv updates stay 2-D.
    """
    modules = _group(tensors, path)
    names = _canonical_names(list(modules), path, layers_per_block, shapes)
    peft = _peft_scale_config(path)
    denoiser: dict[str, AdapterKind] = {}
    text: dict[str, AdapterKind] = {}
    for name, parts in modules.items():
        key = names[name]
        if shapes is not None and key not in shapes and key.replace(".text_model.", ".", 1) not in shapes:
            raise UnknownLayoutError(
                f"module {name!r} (read as {key!r}) is not a module of this model",
                path=path,
                hint="use the adapter with the base model it was made for (LyCORIS files with BFL Flux names such "
                "as double_blocks_0_img_attn_qkv are not supported: train on the diffusers Flux model, or convert "
                "the file to LoRA with LyCORIS)",
            )
        target = None if shapes is None else shapes.get(key)
        scale = None if peft is None or "." not in name else peft.alpha_for(key, 1)
        update = _module_update(parts, name, path, target, scale)
        (text if key.startswith("text_encoder") else denoiser)[key] = update
    return denoiser, text
