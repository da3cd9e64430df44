"""LyCORIS algorithms beyond LoHa/LoKr, one module at a time: LoCon (Tucker), full/diff, IA3, (B)OFT, GLoRA, DoRA.

Each function turns the tensors of one module (``parts``: name suffix → tensor, as LyCORIS 4.x and kohya write them)
into a canonical update, checked against the shape of the weight it adapts where the file alone cannot say it:

=============  ===============================  =============================================================
algorithm      tensors                          update
=============  ===============================  =============================================================
LoCon          ``lora_down/up.weight``,         :class:`LowRank`; with a Tucker core (conv) the core is folded
               ``lora_mid.weight``, ``alpha``   into the down factor: down'[a,i,h,w] = Σ_b mid[a,b,h,w]·down[b,i]
full / diff    ``diff``, ``diff_b``             :class:`Dense` ΔW = diff with bias update Δb = diff_b
IA3            ``weight``, ``on_input``         :class:`~fusion.relative.ChannelScale`
diag-OFT/BOFT  ``oft_blocks`` (3-D / 4-D),      :class:`~fusion.relative.Orthogonal`, constraint = alpha·out
               ``alpha``, ``rescale``
GLoRA          ``a1/a2/b1/b2.weight``, alpha    :class:`~fusion.relative.WeightProduct`, scale = alpha / rank
DoRA           ``dora_scale`` beside any of     :class:`~fusion.relative.WeightDecomposed` (eps = fp32 epsilon)
               LoCon/LoHa/LoKr
norm layers    ``w_norm``, ``b_norm``           :class:`Dense` Δw = w_norm, Δb = b_norm on the affine norm
=============  ===============================  =============================================================
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch

from fusion.adapters import AdapterKind, Dense, LowRank
from fusion.errors import AdapterFormatError, ShapeMismatchError, UnknownLayoutError
from fusion.relative import ChannelScale, Orthogonal, WeightDecomposed, WeightProduct
from weights_index.formats.module_errors import naming_module

LYCORIS_FIX = "convert it to LoRA with LyCORIS's extract/merge tools, or retrain the adapter without that option"


def alpha_of(parts: Mapping[str, torch.Tensor]) -> float | None:
    """The module's stored alpha, or None when absent or 0 (LyCORIS: alpha = rank then)."""
    alpha = parts.get("alpha")
    if alpha is None:
        return None
    value = float(alpha.float().reshape(-1)[0])
    return None if value == 0.0 else value


def require(parts: Mapping[str, torch.Tensor], names: tuple[str, ...], module: str, path: Path) -> None:
    """Raise :class:`AdapterFormatError` naming the tensors a module lacks."""
    missing = [n for n in names if n not in parts]
    if missing:
        raise AdapterFormatError(f"module {module!r} lacks {missing}", path=path)


def _need_shape(target: tuple[int, ...] | None, algorithm: str, module: str, path: Path) -> tuple[int, ...]:
    if target is None:
        raise ShapeMismatchError(
            f"{algorithm} module {module!r} is a function of the base weight, whose shape the file does not store",
            path=path,
            hint="read it for a model: pipe.add_adapter_file(...), or read_adapter(path, shapes=model weight shapes)",
        )
    return target


def locon_update(parts: Mapping[str, torch.Tensor], module: str, path: Path) -> LowRank:
    """LoCon / LoRA factors; a Tucker ``lora_mid`` core is folded into an exact conv down factor."""
    require(parts, ("lora_down.weight", "lora_up.weight"), module, path)
    down, up = parts["lora_down.weight"], parts["lora_up.weight"]
    mid = parts.get("lora_mid.weight")
    if mid is not None:
        if mid.dim() != 4 or down.dim() != 4 or mid.shape[1] != down.shape[0] or mid.shape[0] != up.shape[1]:
            raise ShapeMismatchError(
                f"module {module!r}: Tucker core {tuple(mid.shape)} does not chain down {tuple(down.shape)} "
                f"and up {tuple(up.shape)}",
                path=path,
            )
        down = torch.einsum("abhw,bi->aihw", mid.float(), down.flatten(1).float())
        up = up.float()
    if up.dim() == 2 and down.dim() == 4:
        up = up[:, :, None, None]
    with naming_module(module, path):
        return LowRank(down=down, up=up, alpha=alpha_of(parts))


def full_update(parts: Mapping[str, torch.Tensor], module: str, path: Path) -> Dense:
    """A full-weight difference ``diff`` and, if stored, the bias difference ``diff_b``."""
    bias = parts.get("diff_b")
    with naming_module(module, path):
        return Dense(weight=parts["diff"].float(), bias=None if bias is None else bias.float().reshape(-1))


def ia3_update(
    parts: Mapping[str, torch.Tensor], module: str, path: Path, target: tuple[int, ...] | None
) -> ChannelScale:
    """IA3: a per-channel scale of the output (or, with ``on_input`` set, the input) channels."""
    shape = _need_shape(target, "IA3", module, path)
    on_input = bool(int(parts["on_input"].reshape(-1)[0])) if "on_input" in parts else False
    with naming_module(module, path):
        return ChannelScale(vector=parts["weight"].reshape(-1), shape=shape, on_input=on_input)


def oft_update(
    parts: Mapping[str, torch.Tensor], module: str, path: Path, target: tuple[int, ...] | None
) -> Orthogonal:
    """diag-OFT (3-D blocks) or BOFT (4-D butterfly blocks); alpha is the COFT constraint per output row."""
    shape = _need_shape(target, "OFT", module, path)
    alpha = alpha_of(parts) or 0.0
    rescale = parts.get("rescale")
    with naming_module(module, path):
        return Orthogonal(blocks=parts["oft_blocks"], shape=shape, constraint=alpha * shape[0], rescale=rescale)


def glora_update(parts: Mapping[str, torch.Tensor], module: str, path: Path) -> WeightProduct:
    """GLoRA: ΔW = alpha/rank · (W·a1·a2 + b1·b2)."""
    require(parts, ("a1.weight", "a2.weight", "b1.weight", "b2.weight"), module, path)
    if "bm.weight" in parts:
        raise UnknownLayoutError(
            f"GLoRA module {module!r} uses a Tucker core (bm.weight), which is not supported",
            path=path,
            hint=LYCORIS_FIX,
        )
    a1, a2, b1, b2 = (parts[k] for k in ("a1.weight", "a2.weight", "b1.weight", "b2.weight"))
    rank = int(a2.shape[0])
    alpha = alpha_of(parts)
    if b1.dim() == 4 and b2.dim() == 2:
        b2 = b2[:, :, None, None]
    with naming_module(module, path):
        additive = LowRank(down=b2, up=b1)
        return WeightProduct(a1=a1, a2=a2, additive=additive, scale=1.0 if alpha is None else alpha / rank)


def with_dora(update: AdapterKind, magnitude: torch.Tensor, module: str, path: Path, eps: float) -> WeightDecomposed:
    """Wrap a directional update with DoRA magnitudes (stored (out, 1, …) on outputs or (1, in, …) on inputs)."""
    if not isinstance(update, (LowRank, Dense)):
        raise UnknownLayoutError(f"module {module!r}: DoRA on a {type(update).__name__} update", path=path)
    shape = tuple(update.shape)
    on_output = magnitude.dim() <= 1 or (magnitude.shape[0] == shape[0] and magnitude.numel() == shape[0])
    with naming_module(module, path):
        return WeightDecomposed(update=update, magnitude=magnitude.reshape(-1), on_output=on_output, eps=eps)


def norm_update(parts: Mapping[str, torch.Tensor], module: str, path: Path) -> Dense:
    """Norm-layer training: additive updates ``w_norm`` / ``b_norm`` of a LayerNorm/GroupNorm's weight and bias."""
    require(parts, ("w_norm",), module, path)
    bias = parts.get("b_norm")
    with naming_module(module, path):
        return Dense(weight=parts["w_norm"].float(), bias=None if bias is None else bias.float().reshape(-1))
