"""The composable layers of a model, and adapters checked against them — without changing the model.

A :class:`LayerIndex` walks a denoiser once, with its text encoders: every ``nn.Linear`` / ``nn.Conv2d`` / affine norm
layer of the denoiser (keyed by its module path) and of the text encoders (keyed ``text_encoder.<path>`` /
``text_encoder_2.<path>``) is indexed with its weight shape and its layer group
(:class:`fusion.layer_groups.BlockLayout`). Quantised weights (bitsandbytes, GGUF, torchao: anything not a plain
floating tensor) and weights offloaded to the meta device are refused with :class:`fusion.errors.UnsupportedModelError`.
Indexing installs no hook and replaces no module: it is what readers ask for a model's shapes and what an adapter is
validated against before it is registered.

:meth:`LayerIndex.validate` checks every key and shape of every adapter (and a SHiRA adapter's base fingerprint
against the pristine weights), normalises keys and factor layouts to the model's and resolves weight-relative updates
(IA3, OFT, DoRA, GLoRA) to ΔW = f(W₀) − W₀ against the pristine weights; :meth:`LayerIndex.on_targets` puts every
tensor on its target's device and dtype. :class:`fusion.attachment.AttachedAdapters` does both before it touches the
first module.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Collection, Iterable, Mapping

import torch
from torch import nn

from fusion.adapters import Adapter, AdapterKind, Dense, LowRank, Relative, Sparse, validate_shapes
from fusion.errors import CompositionError, ShapeMismatchError, UnsupportedModelError
from fusion.layer_groups import BlockLayout
from fusion.layers import ComposedLayer, is_composable
from fusion.sparse import check_base_fingerprint

_PLAIN_FLOATS = (torch.float64, torch.float32, torch.float16, torch.bfloat16)

Pristine = Callable[[str], torch.Tensor]
"""``pristine(key)``: the base weight of layer ``key`` as it was before any adapter was fused into it."""


class LayerTarget:
    """One composable layer: where it lives (parent, attribute), the base module itself and its layer group."""

    __slots__ = ("attr", "base", "group", "parent")

    def __init__(self, parent: nn.Module, attr: str, base: nn.Module, group: int) -> None:
        self.parent = parent
        self.attr = attr
        self.base = base
        self.group = group


class LayerIndex:
    """Every composable layer of ``denoiser`` (UNet2DConditionModel or FluxTransformer2DModel) and of the
    ``text_encoders`` (``"text_encoder"`` / ``"text_encoder_2"`` → module; None entries are skipped), by key.

    Layers already wrapped by a composed layer are indexed by their base module.
    """

    def __init__(
        self,
        denoiser: nn.Module,
        *,
        text_encoders: Mapping[str, nn.Module | None] | None = None,
        family: str = "unknown",
    ) -> None:
        self.layout = BlockLayout.from_denoiser(family, denoiser)
        self.targets: dict[str, LayerTarget] = {}
        roots = [("", denoiser)] + [(f"{k}.", m) for k, m in (text_encoders or {}).items() if m is not None]
        for prefix, root in roots:
            for key, (parent, attr, module) in _composable_modules(root, prefix).items():
                _check_plain(key, module)
                self.targets[key] = LayerTarget(parent, attr, module, self.layout.group_index(key))
        self.shapes = {key: tuple(t.base.weight.shape) for key, t in self.targets.items()}
        """Weight shape of every composable layer, by key (what readers take to shape flattened conv updates)."""

    def base_weight(self, key: str) -> torch.Tensor:
        """The weight of layer ``key``'s base module as it is now."""
        return self.targets[key].base.weight

    def validate(
        self, adapters: Iterable[Adapter], *, taken: Collection[str] = (), pristine: Pristine | None = None
    ) -> list[Adapter]:
        """Check names (none in ``taken``, none twice) and every key/shape against the model; return the adapters
        with keys and factor layouts normalised to the model's (1×1-conv factors, ``text_model.`` prefixes) and
        weight-relative updates resolved to ΔW = f(W₀) − W₀ (:mod:`fusion.relative`) against ``pristine(key)`` (the
        base weights as they are, by default). Touches no model tensor."""
        pristine = pristine or self.base_weight
        prepared: list[Adapter] = []
        seen = set(taken)
        for adapter in adapters:
            if adapter.name in seen:
                raise CompositionError(
                    f"an adapter named {adapter.name!r} is already attached",
                    path=adapter.source,
                    hint="give it another name or remove the attached one first",
                )
            seen.add(adapter.name)
            normalised = dataclasses.replace(
                adapter,
                layers={key: self._normalise(key, kind) for key, kind in adapter.layers.items()},
                text_encoder_layers={
                    self.text_key(key): self._normalise(self.text_key(key), kind)
                    for key, kind in adapter.text_encoder_layers.items()
                },
            )
            validate_shapes(normalised, self.shapes)
            check_base_fingerprint(normalised, _fingerprinted_weights(normalised, pristine))
            normalised = _resolve_relative(normalised, pristine)
            for key, kind in normalised.all_layers():
                self._check_fits(normalised, key, kind)
            prepared.append(normalised)
        return prepared

    def on_targets(self, adapter: Adapter) -> Adapter:
        """A copy of ``adapter`` whose every update sits on its target weight's device and dtype (sparse positions
        as int64: one widening pass per attach, cheaper scatters and gathers on every switch)."""

        def move(key: str, kind: AdapterKind) -> AdapterKind:
            weight = self.base_weight(key)
            if isinstance(kind, Sparse):  # int64 positions: the faster index_copy_/take (fusion.sparse_switching)
                return kind.to(weight.device, weight.dtype, index_dtype=torch.int64)
            return kind.to(weight.device, weight.dtype)

        return dataclasses.replace(
            adapter,
            layers={k: move(k, v) for k, v in adapter.layers.items()},
            text_encoder_layers={k: move(k, v) for k, v in adapter.text_encoder_layers.items()},
        )

    def text_key(self, key: str) -> str:
        """Files name CLIP layers ``text_encoder.text_model.encoder…``; newer transformers drop ``text_model``."""
        component, _, path = key.partition(".")
        if key not in self.targets and path.startswith("text_model."):
            bare = f"{component}.{path.removeprefix('text_model.')}"
            if bare in self.targets:
                return bare
        return key

    def _normalise(self, key: str, kind: AdapterKind) -> AdapterKind:
        """Reshape 2-D LoRA factors aimed at a 1×1 conv into conv factors (files store both ways)."""
        target = self.targets.get(key)
        if target is None or not isinstance(kind, LowRank) or kind.is_conv:
            return kind
        module = target.base
        if isinstance(module, nn.Conv2d) and tuple(module.weight.shape[2:]) == (1, 1):
            return LowRank(kind.down[:, :, None, None], kind.up[:, :, None, None], kind.alpha)
        return kind

    def _check_fits(self, adapter: Adapter, key: str, kind: AdapterKind) -> None:
        """Refuse updates the layer's own form cannot take: a bias update where it has no bias, LoCon on a
        grouped conv."""
        base = self.targets[key].base
        if isinstance(kind, Dense) and kind.bias is not None and base.bias is None:
            raise ShapeMismatchError(
                f"adapter {adapter.name!r} updates the bias of {key!r}, which has no bias in this model",
                path=adapter.source,
                hint="the adapter was made for a different base model",
            )
        if isinstance(kind, LowRank) and kind.is_conv and getattr(base, "groups", 1) != 1:
            raise ShapeMismatchError(
                f"adapter {adapter.name!r} puts a LoCon update on grouped conv {key!r}",
                path=adapter.source,
            )


def _composable_modules(root: nn.Module, prefix: str) -> dict[str, tuple[nn.Module, str, nn.Module]]:
    """Every composable module under ``root`` as key → (parent, attribute name, module)."""
    found: dict[str, tuple[nn.Module, str, nn.Module]] = {}
    for parent_name, parent in root.named_modules():
        for attr, child in parent.named_children():
            module = child.base if isinstance(child, ComposedLayer) else child
            if is_composable(module):
                path = f"{parent_name}.{attr}" if parent_name else attr
                found[prefix + path] = (parent, attr, module)
    return found


def _check_plain(key: str, module: nn.Module) -> None:
    """Refuse weights the engine cannot restore bit-exactly or add to: quantised or offloaded to meta."""
    weight = module.weight
    if type(weight) not in (torch.Tensor, nn.Parameter) or weight.dtype not in _PLAIN_FLOATS:
        raise UnsupportedModelError(
            f"{key!r} holds a {type(weight).__name__} of {weight.dtype} (a quantised weight); LoRA Composer composes "
            "plain floating-point weights only",
            hint="load the base model unquantised (fp16/bf16/fp32), or use diffusers' load_lora_weights for "
            "quantised bases",
        )
    if weight.is_meta:
        raise UnsupportedModelError(
            f"{key!r} is on the meta device (sequential cpu offload or an unloaded model)",
            hint="compose before enable_sequential_cpu_offload is not possible; use enable_model_cpu_offload",
        )


def _fingerprinted_weights(adapter: Adapter, pristine: Pristine) -> dict[str, torch.Tensor]:
    """The pristine base weights of the layers ``adapter`` adapts, when it carries a base fingerprint (SHiRA)."""
    meta = adapter.meta.get("safetensors_metadata", adapter.meta)
    if not isinstance(meta, Mapping) or not meta.get("base_fingerprint"):
        return {}
    return {key: pristine(key) for key, _ in adapter.all_layers()}


def _resolve_relative(adapter: Adapter, pristine: Pristine) -> Adapter:
    """Turn weight-relative updates (IA3, OFT, DoRA, GLoRA) into ΔW = f(W₀) − W₀ against the pristine weights
    (:mod:`fusion.relative`); other updates pass through untouched."""
    if not any(isinstance(kind, Relative) for _, kind in adapter.all_layers()):
        return adapter

    def resolved(key: str, kind: AdapterKind) -> AdapterKind:
        return kind.resolve(pristine(key)) if isinstance(kind, Relative) else kind

    return dataclasses.replace(
        adapter,
        layers={k: resolved(k, v) for k, v in adapter.layers.items()},
        text_encoder_layers={k: resolved(k, v) for k, v in adapter.text_encoder_layers.items()},
    )
