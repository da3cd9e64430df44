"""LyCORIS LoHa and LoKr files (also LoCon layers mixed into them), read into exact canonical updates.

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
/ PEFT paths; kohya names are mapped to diffusers module paths by diffusers' own renaming.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path

import torch

from fusion.adapters import AdapterKind, Dense, LowRank
from fusion.errors import AdapterFormatError, ShapeMismatchError, UnknownLayoutError
from weights_index.formats.lora import kohya_module_paths

LOHA_KEYS = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2")
LOKR_KEYS = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")
LORA_KEYS = ("lora_down.weight", "lora_up.weight")
OTHER_KEYS = ("alpha",)


def _group(tensors: Mapping[str, torch.Tensor], path: Path) -> dict[str, dict[str, torch.Tensor]]:
    """Module name → {part: tensor}; unknown tensor names raise UnknownLayoutError listing a few."""
    modules: dict[str, dict[str, torch.Tensor]] = {}
    unknown: list[str] = []
    for key, value in tensors.items():
        for part in (*LOHA_KEYS, *LOKR_KEYS, *LORA_KEYS, *OTHER_KEYS):
            if key.endswith("." + part):
                modules.setdefault(key[: -len(part) - 1], {})[part] = value
                break
        else:
            unknown.append(key)
    if unknown:
        raise UnknownLayoutError(
            f"unrecognised LyCORIS tensors: {', '.join(repr(k) for k in unknown[:5])}",
            path=path,
            hint="only LoHa, LoKr and LoCon modules are supported (no DoRA, IA3, OFT, GLoRA, …)",
        )
    return modules


def _alpha(parts: Mapping[str, torch.Tensor]) -> float | None:
    alpha = parts.get("alpha")
    if alpha is None:
        return None
    value = float(alpha.float().reshape(-1)[0])
    return None if value == 0.0 else value


def _require(parts: Mapping[str, torch.Tensor], names: tuple[str, ...], module: str, path: Path) -> None:
    missing = [n for n in names if n not in parts]
    if missing:
        raise AdapterFormatError(f"module {module!r} lacks {missing}", path=path)


def _tucker(core: torch.Tensor, left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
    """Rebuild W[p, q, …] = Σ_ij core[i, j, …] · left[i, p] · right[j, q]."""
    return torch.einsum("ij...,ip,jq->pq...", core.float(), left.float(), right.float())


def loha_update(parts: Mapping[str, torch.Tensor], module: str, path: Path) -> AdapterKind:
    """Exact update of one LoHa module (LowRank via Khatri-Rao when cheaper, else Dense)."""
    _require(parts, ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"), module, path)
    w1a, w1b, w2a, w2b = (parts[k] for k in ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"))
    rank = int(w1b.shape[0])
    alpha = _alpha(parts)
    scale = 1.0 if alpha is None else alpha / rank
    if "hada_t1" in parts or "hada_t2" in parts:
        _require(parts, ("hada_t1", "hada_t2"), module, path)
        try:
            delta = _tucker(parts["hada_t1"], w1a, w1b) * _tucker(parts["hada_t2"], w2a, w2b)
        except RuntimeError as exc:
            raise ShapeMismatchError(f"module {module!r}: inconsistent LoHa Tucker factors ({exc})", path=path) from exc
        return Dense(weight=delta.to(w1a.dtype), scale=scale)
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
        dtype = w1a.dtype
        if conv_shape is not None:
            return LowRank(
                down=down.reshape(r1 * r2, *conv_shape).to(dtype),
                up=up[:, :, None, None].to(dtype),
                alpha=scale * r1 * r2,
            )
        return LowRank(down=down.to(dtype), up=up.to(dtype), alpha=scale * r1 * r2)
    delta = up @ down
    if conv_shape is not None:
        delta = delta.reshape(out, *conv_shape)
    return Dense(weight=delta.to(w1a.dtype), scale=scale)


def _conv_shape(rest: tuple[int, ...], module: str, path: Path) -> tuple[int, ...] | None:
    """(in, kh, kw) for conv factors stored 4-D; flattened conv factors are read as linear (no kernel info)."""
    if len(rest) == 1:
        return None
    if len(rest) == 3:
        return rest
    raise ShapeMismatchError(f"module {module!r}: unsupported factor rank {len(rest) + 1}", path=path)


def lokr_update(parts: Mapping[str, torch.Tensor], module: str, path: Path) -> AdapterKind:
    """Exact update of one LoKr module (LowRank for linear layers with a low-rank W2 when cheaper, else Dense)."""
    if "lokr_w1" in parts:
        w1 = parts["lokr_w1"].float()
    else:
        _require(parts, ("lokr_w1_a", "lokr_w1_b"), module, path)
        w1 = _matmul(parts["lokr_w1_a"], parts["lokr_w1_b"], module, path)
    rank: int | None = None
    if "lokr_w1_b" in parts:
        rank = int(parts["lokr_w1_b"].shape[0])
    if "lokr_w2_b" in parts:
        rank = int(parts["lokr_w2_b"].shape[0])
    alpha = _alpha(parts)
    scale = 1.0 if alpha is None or rank is None else alpha / rank
    dtype = next(iter(parts.values())).dtype
    if "lokr_w2" in parts:
        w2 = parts["lokr_w2"].float()
    else:
        _require(parts, ("lokr_w2_a", "lokr_w2_b"), module, path)
        w2a, w2b = parts["lokr_w2_a"].float(), parts["lokr_w2_b"].float()
        if "lokr_t2" in parts:
            w2 = _tucker(parts["lokr_t2"], w2a, w2b)
        elif w2b.dim() == 2 and w1.dim() == 2 and w2a.dim() == 2:
            return _lokr_low_rank(w1, w2a, w2b, scale, dtype, module, path)
        else:
            w2 = _matmul(w2a, w2b, module, path)
    if w2.dim() == 4 and w1.dim() == 2:
        w1 = w1[:, :, None, None]
    if w1.dim() != w2.dim():
        raise ShapeMismatchError(f"module {module!r}: LoKr factors of different ranks", path=path)
    return Dense(weight=torch.kron(w1, w2).to(dtype), scale=scale)


def _matmul(a: torch.Tensor, b: torch.Tensor, module: str, path: Path) -> torch.Tensor:
    if a.dim() != 2 or b.dim() != 2 or a.shape[1] != b.shape[0]:
        raise ShapeMismatchError(
            f"module {module!r}: factors {tuple(a.shape)} and {tuple(b.shape)} do not multiply", path=path
        )
    return a.float() @ b.float()


def _lokr_low_rank(
    w1: torch.Tensor, w2a: torch.Tensor, w2b: torch.Tensor, scale: float, dtype: torch.dtype, module: str, path: Path
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
        return LowRank(down=down.to(dtype), up=up.to(dtype), alpha=scale * m * r)
    return Dense(weight=torch.kron(w1, w2a @ w2b).to(dtype), scale=scale)


def _canonical_names(names: list[str], path: Path, layers_per_block: int) -> dict[str, str]:
    """Map file module names onto canonical keys (kohya names via diffusers, dotted paths by prefix)."""
    kohya = {n: "lora_unet_" + n.removeprefix("lycoris_") if n.startswith("lycoris_") else n for n in names}
    underscored = [n for n in names if "." not in n]
    mapped = kohya_module_paths([kohya[n] for n in underscored], path, layers_per_block=layers_per_block)
    result = {n: mapped[kohya[n]] for n in underscored}
    for name in names:
        if "." in name:
            bare = name.removeprefix("base_model.model.")
            for prefix in ("unet.", "transformer."):
                bare = bare.removeprefix(prefix)
            result[name] = bare
    return result


def _to_conv(update: AdapterKind, shape: tuple[int, ...]) -> AdapterKind:
    """Give a flattened (out, in·kh·kw) update the conv shape it targets (LyCORIS stores conv LoHa factors flat)."""
    if isinstance(update, LowRank) and not update.is_conv:
        down = update.down.reshape(update.rank, *shape[1:])
        return LowRank(down=down, up=update.up[:, :, None, None], alpha=update.alpha)
    if isinstance(update, Dense):
        return Dense(weight=update.weight.reshape(shape), scale=update.scale)
    return update


def read_lycoris(
    tensors: Mapping[str, torch.Tensor],
    path: Path,
    *,
    layers_per_block: int = 2,
    shapes: Mapping[str, tuple[int, ...]] | None = None,
) -> tuple[dict[str, AdapterKind], dict[str, AdapterKind]]:
    """Read a LyCORIS file into (denoiser layers, text-encoder layers).

    LyCORIS stores non-Tucker conv factors flattened to (r, in·kh·kw); give ``shapes`` (canonical key → weight
    shape) to get such updates in their conv shape, otherwise they stay 2-D (out, in·kh·kw).
    """
    modules = _group(tensors, path)
    names = _canonical_names(list(modules), path, layers_per_block)
    denoiser: dict[str, AdapterKind] = {}
    text: dict[str, AdapterKind] = {}
    for name, parts in modules.items():
        if "hada_w1_a" in parts or "hada_w1_b" in parts:
            update = loha_update(parts, name, path)
        elif any(k.startswith("lokr_") for k in parts):
            update = lokr_update(parts, name, path)
        elif "lora_down.weight" in parts:
            update = _locon_update(parts, name, path)
        else:
            raise AdapterFormatError(f"module {name!r} has an alpha but no factors", path=path)
        key = names[name]
        target = None if shapes is None else shapes.get(key)
        if target is not None and len(target) == 4 and tuple(update.shape) != tuple(target):
            if math.prod(update.shape) != math.prod(target):
                raise ShapeMismatchError(f"module {name!r} does not fit the weight shape {tuple(target)}", path=path)
            update = _to_conv(update, tuple(target))
        (text if key.startswith("text_encoder") else denoiser)[key] = update
    return denoiser, text


def _locon_update(parts: Mapping[str, torch.Tensor], module: str, path: Path) -> LowRank:
    _require(parts, LORA_KEYS, module, path)
    try:
        return LowRank(down=parts["lora_down.weight"], up=parts["lora_up.weight"], alpha=_alpha(parts))
    except ShapeMismatchError as exc:
        raise ShapeMismatchError(f"module {module!r}: {exc.reason}", path=path) from exc
