"""Per-layer building blocks of the methods that decide layer by layer (K-LoRA, TIES): each adapter's own update of
one composed layer, and fused weights written one layer at a time.

:func:`adapter_deltas` forms every adapter's ΔWᵢ of a layer densely in fp32 exactly as Merge forms its sum — through
:meth:`fusion.layers.ComposedLayer.delta` with weight 1 for that adapter alone: α/r·B·A for LoRA factors (a 1×1 up
conv for LoCon), the dense or scattered sparse update, the resolved ΔW = f(W₀) − W₀ of a weight-relative one.

:func:`enter_fused` puts the engine in fused mode (every composed layer fused at the pristine weights, with its
pristine copy kept), so that :meth:`fusion.engine.FusionEngine.unfuse` — and any later strategy's
:meth:`~fusion.engine.FusionEngine.fuse` — restores every layer bit-exactly whatever was written into it since:
``layer.fuse(weights)`` (per-layer adapter weights) or :func:`fuse_layer_delta` (any per-layer update).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from fusion.adapters import Dense
from fusion.layers import ComposedLayer
from fusion.strategies.base import Engine

TEXT_ENCODER_PREFIXES = ("text_encoder.", "text_encoder_2.")
"""Key prefixes of composed layers inside the text encoders (they run before the first denoiser call)."""


def is_text_encoder_layer(key: str) -> bool:
    """True for a composed layer of a text encoder (it never sees a denoising step)."""
    return key.startswith(TEXT_ENCODER_PREFIXES)


def one_hot(engine: Engine, name: str, weight: float = 1.0) -> torch.Tensor:
    """(A,) engine weights with ``weight`` for adapter ``name`` and 0 for every other attached adapter."""
    row = torch.zeros(len(engine.adapter_names), device=engine.state.device)
    row[engine.adapter_names.index(name)] = weight
    return row


def adapter_deltas(engine: Engine, layer: ComposedLayer, names: Sequence[str]) -> dict[str, torch.Tensor]:
    """ΔWᵢ of ``layer`` (fp32, shaped like its weight) for each adapter of ``names`` that updates it."""
    return {name: layer.delta(one_hot(engine, name)) for name in names if name in layer.names}


def updates_bias(layer: ComposedLayer, name: str) -> bool:
    """True when adapter ``name`` also updates ``layer``'s bias (a dense LyCORIS update with ``diff_b``)."""
    return any(
        slot.name == name and isinstance(slot.kind, Dense) and slot.kind.bias is not None for slot in layer.slots
    )


def enter_fused(engine: Engine) -> None:
    """Put every composed layer in fused mode at its pristine weights, unless the engine is fused already."""
    if not engine.fused:
        engine.fuse(torch.zeros(len(engine.adapter_names), device=engine.state.device))


@torch.no_grad()
def fuse_layer_delta(layer: ComposedLayer, delta: torch.Tensor) -> None:
    """Write pristine W + ``delta`` into ``layer``'s weight (its bias stays the pristine one), keeping the pristine
    copy so that unfusing — or fusing any other weights — restores it bit-exactly."""
    layer.unfuse()
    param = layer.base.weight.detach()
    layer.pristine = param.clone()
    param.copy_((param.float() + delta.to(param.device)).to(param.dtype))
