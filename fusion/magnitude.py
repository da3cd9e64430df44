"""How large an update can get: a cheap upper bound on every entry of ΔW, and the checks built on it.

Finite but extreme numbers (a factor of 1e300 stored as F64, an alpha of 1e300, factors of 1e30 whose product
overflows) pass a NaN/Inf scan yet compose into an all-NaN image. Two checks stop them before a weight is
touched: :func:`check_adapter_numbers` when a file is read (every value must be a float that survives the cast to
float32, and ΔW must be representable in float32), and :func:`check_composed_magnitude` when a composition is set
(Σ |wᵢ|·bound(ΔWᵢ) per layer must be representable in the layer's dtype, fp16's 65,504 on most GPUs).

The bound for a low-rank update is |alpha/r| · r · max|up| · max|down| (each ΔW entry sums r products), exact
when the factors are constant; a sparse update's is max|values|; a dense one's max|ΔW|.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch

from fusion.adapters import Adapter, AdapterKind, Dense, LowRank, Sparse
from fusion.errors import AdapterFormatError, CompositionError

FLOAT32_MAX = float(torch.finfo(torch.float32).max)


def _max_abs(tensor: torch.Tensor) -> float:
    if tensor.numel() == 0:
        return 0.0
    return float(tensor.detach().abs().max().double())


def delta_bound(kind: AdapterKind) -> float:
    """An upper bound on max|ΔW| of ``kind`` (float64 arithmetic; ``inf`` when it overflows even that)."""
    if isinstance(kind, LowRank):
        return abs(kind.scale) * kind.rank * _max_abs(kind.up) * _max_abs(kind.down)
    if isinstance(kind, Sparse):
        return _max_abs(kind.values)
    if isinstance(kind, Dense):
        bias = 0.0 if kind.bias is None else _max_abs(kind.bias)
        return abs(kind.scale) * max(_max_abs(kind.weight), bias)
    return max((_max_abs(t) for t in kind.tensors() if t.is_floating_point()), default=0.0)


def check_adapter_numbers(adapter: Adapter) -> None:
    """Raise :class:`AdapterFormatError` (naming the module) when a value of ``adapter`` is not floating point, does
    not fit float32, or its ΔW bound does not; integer tensors are allowed only as sparse positions."""
    for key, kind in adapter.all_layers():
        values = kind.tensors()
        if isinstance(kind, Sparse):
            values = (kind.values,)
        for tensor in values:
            if not tensor.is_floating_point():
                raise AdapterFormatError(
                    f"module {key!r} stores its values as {str(tensor.dtype).removeprefix('torch.')}; adapter values "
                    "must be floating point",
                    path=adapter.source,
                    hint="the file is broken or not an adapter",
                )
            if _max_abs(tensor) > FLOAT32_MAX:
                raise AdapterFormatError(
                    f"module {key!r} holds values beyond float32's range",
                    path=adapter.source,
                    hint="the file is broken",
                )
        bound = delta_bound(kind)
        if not bound <= FLOAT32_MAX:
            raise AdapterFormatError(
                f"module {key!r}: its update can reach {bound:.3g}, beyond float32's range (scale or factors are "
                "extreme)",
                path=adapter.source,
                hint="the file is broken",
            )


def check_composed_magnitude(
    bounds: Mapping[str, Mapping[str, float]],
    weights: Mapping[str, Mapping[str, float]],
    dtypes: Mapping[str, torch.dtype],
) -> None:
    """Raise :class:`CompositionError` naming the adapter that contributes most where Σ |wᵢ|·boundᵢ of a layer
    would overflow its dtype.

    ``bounds[adapter][layer]`` are :func:`delta_bound` values, ``weights[adapter][layer]`` the largest |weight| the
    composition gives that adapter on that layer over all steps, ``dtypes[layer]`` the layer's weight dtype.
    """
    totals: dict[str, float] = {}
    largest: dict[str, tuple[float, str]] = {}
    for name, per_layer in bounds.items():
        for key, bound in per_layer.items():
            weight = weights.get(name, {}).get(key, 0.0)
            if weight == 0.0:
                continue
            term = abs(weight) * bound
            totals[key] = totals.get(key, 0.0) + term
            if term > largest.get(key, (-1.0, ""))[0]:
                largest[key] = (term, name)
    for key, total in totals.items():
        limit = float(torch.finfo(dtypes[key]).max)
        if not (math.isfinite(total) and total < limit):
            name = largest[key][1]
            raise CompositionError(
                f"adapter {name!r} at weight {weights[name][key]:g} makes the update of {key!r} reach {total:.3g}, "
                f"beyond what {str(dtypes[key]).removeprefix('torch.')} holds ({limit:.3g})",
                hint="lower its weight, or run the model in float32 / bfloat16",
            )
