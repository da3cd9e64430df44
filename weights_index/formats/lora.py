"""LoRA files (diffusers/PEFT, kohya/A1111 SD1.x/SDXL incl. LDM naming and LoCon, Flux kohya/xlabs/BFL/ai-toolkit).

Key conversion is diffusers' own: ``StableDiffusionXLLoraLoaderMixin.lora_state_dict`` (SD1/SD2/SDXL; given a UNet
``layers_per_block`` it also remaps LDM ``input_blocks/middle_block/output_blocks`` names, for SD1 too) and
``FluxLoraLoaderMixin.lora_state_dict`` (Flux kohya/xlabs/BFL/fal, splitting fused qkv projections), then
diffusers' PEFT renaming. What diffusers lacks is added here:

- **per-module alpha**: kohya stores ``alpha`` per module and means ΔW = (alpha / rank) · up @ down for each one.
  diffusers 0.42 keeps only the most common alpha for attention modules of SD files (its alpha names do not match
  PEFT's module names), so a file with mixed alphas is applied wrongly there. We keep each module's own alpha by
  following the tensor objects through diffusers' renaming (renaming moves tensors, never copies them). Flux kohya
  files come back from diffusers with alpha already folded into the factors.
- **PEFT / diffusers scaling configs**: ``lora_adapter_metadata`` in the safetensors metadata (diffusers ≥ 0.34) or
  an ``adapter_config.json`` beside a PEFT file gives ``r``, ``lora_alpha``, ``rank_pattern``, ``alpha_pattern`` and
  ``use_rslora``; they are resolved per module exactly as PEFT does. Without either, scale is 1 (alpha = rank).
- **DoRA** (PEFT ``use_dora``, diffusers keys alike): the ``lora_magnitude_vector`` tensors are taken out before
  diffusers' conversion (which would drop them) and each module's LoRA becomes a
  :class:`~fusion.relative.WeightDecomposed` update: m ⊙ (W + ΔW) / ‖W + ΔW‖ per output row, as PEFT computes it.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

from fusion.adapters import AdapterKind, LowRank
from fusion.errors import AdapterFormatError, UnknownLayoutError
from fusion.relative import WeightDecomposed
from weights_index.formats.module_errors import naming_module

DOWN_ALPHA_SIBLINGS = (".lora_down.weight", ".lora_A.weight", ".lora.down.weight")
DENOISER_PREFIXES = ("unet.", "transformer.")
TEXT_PREFIXES = ("text_encoder.", "text_encoder_2.")
LORA_ADAPTER_METADATA_KEY = "lora_adapter_metadata"


@dataclass(frozen=True)
class ScaleConfig:
    """The scaling part of a PEFT ``LoraConfig``: per-module r and alpha via patterns, optional rank-stabilised."""

    r: int
    lora_alpha: float
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    use_rslora: bool = False

    @classmethod
    def from_mapping(cls, raw: object, source: str, path: Path) -> ScaleConfig | None:
        """Build from a LoraConfig-like dict (``source`` names where it came from in errors); None when it has no
        ``r``/``lora_alpha``. Ranks must be positive integers and alphas finite numbers."""
        if not isinstance(raw, Mapping):
            raise AdapterFormatError(f"{source} is not a JSON object", path=path)
        if "r" not in raw and "lora_alpha" not in raw:
            return None
        r = _positive_rank(raw.get("r", 8), f"{source}: r", path)
        return cls(
            r=r,
            lora_alpha=_finite_alpha(raw.get("lora_alpha", r), f"{source}: lora_alpha", path),
            rank_pattern={
                str(k): _positive_rank(v, f"{source}: rank_pattern", path)
                for k, v in _mapping(raw.get("rank_pattern"), f"{source}: rank_pattern", path).items()
            },
            alpha_pattern={
                str(k): _finite_alpha(v, f"{source}: alpha_pattern", path)
                for k, v in _mapping(raw.get("alpha_pattern"), f"{source}: alpha_pattern", path).items()
            },
            use_rslora=bool(raw.get("use_rslora", False)),
        )

    def alpha_for(self, module: str, rank: int) -> float:
        """The ``LowRank.alpha`` giving this module the scale PEFT would apply (lora_alpha / r or / √r)."""
        from peft.utils.other import get_pattern_key

        r = int(self.rank_pattern.get(get_pattern_key(list(self.rank_pattern), module), self.r))
        alpha = float(self.alpha_pattern.get(get_pattern_key(list(self.alpha_pattern), module), self.lora_alpha))
        scale = alpha / math.sqrt(r) if self.use_rslora else alpha / r
        return scale * rank


def _mapping(value: object, what: str, path: Path) -> Mapping[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise AdapterFormatError(f"{what} is not a JSON object", path=path)
    return value


def _positive_rank(value: object, what: str, path: Path) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise AdapterFormatError(f"{what} must be a positive integer", path=path, hint="fix or remove the config")
    return value


def _finite_alpha(value: object, what: str, path: Path) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise AdapterFormatError(f"{what} must be a finite number", path=path, hint="fix or remove the config")
    return float(value)


PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = "adapter_model.safetensors"
"""A PEFT ``save_pretrained`` folder: its config scales its weights file, never other files beside it."""


def scale_configs(metadata: Mapping[str, str], path: Path) -> dict[str, ScaleConfig]:
    """Per-component scaling configs ("unet", "transformer", "text_encoder", …, or "" for a bare PEFT file), from
    the ``lora_adapter_metadata`` header key, or for a PEFT folder's :data:`PEFT_WEIGHTS` from its
    :data:`PEFT_CONFIG`."""
    configs: dict[str, ScaleConfig] = {}
    raw = metadata.get(LORA_ADAPTER_METADATA_KEY)
    if raw:
        packed = _parse_json(raw, f"{LORA_ADAPTER_METADATA_KEY} metadata", path)
        components: dict[str, dict[str, Any]] = {}
        for key, value in _mapping(packed, f"{LORA_ADAPTER_METADATA_KEY} metadata", path).items():
            component, _, name = str(key).partition(".")
            if name:
                components.setdefault(component, {})[name] = value
            else:
                components.setdefault("", {})[key] = value
        for component, values in components.items():
            config = ScaleConfig.from_mapping(values, f"{LORA_ADAPTER_METADATA_KEY} metadata", path)
            if config is not None:
                configs[component] = config
    folder_config = peft_folder_config(path) if "" not in configs else None
    if folder_config is not None:
        config = ScaleConfig.from_mapping(folder_config, PEFT_CONFIG, path.with_name(PEFT_CONFIG))
        if config is not None:
            configs[""] = config
    return configs


def peft_folder_config(path: Path) -> Mapping[str, Any] | None:
    """The parsed :data:`PEFT_CONFIG` of the PEFT folder whose weights file ``path`` is; None for any other file
    (a loose file beside a PEFT folder's config is never scaled by it) or when the folder has none."""
    sidecar = path.with_name(PEFT_CONFIG)
    if path.name != PEFT_WEIGHTS or not sidecar.is_file():
        return None
    try:
        text = sidecar.read_bytes().decode("utf-8")
    except OSError as exc:
        raise AdapterFormatError(f"cannot read {PEFT_CONFIG} ({exc.strerror or exc})", path=sidecar) from exc
    except UnicodeDecodeError as exc:
        raise AdapterFormatError(f"{PEFT_CONFIG} is not UTF-8 text", path=sidecar) from exc
    parsed = _parse_json(text, PEFT_CONFIG, sidecar)
    if not isinstance(parsed, Mapping):
        raise AdapterFormatError(f"{PEFT_CONFIG} is not a JSON object", path=sidecar, hint="fix or remove the config")
    return parsed


def _parse_json(text: str, what: str, path: Path) -> object:
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise AdapterFormatError(f"{what} is not JSON ({exc.msg} at {exc.pos})", path=path) from exc
    except RecursionError as exc:
        raise AdapterFormatError(f"{what} is nested too deeply", path=path) from exc


MAGNITUDE_SUFFIXES = (".lora_magnitude_vector", ".lora_magnitude_vector.weight")


def _take_magnitudes(tensors: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(the other tensors, DoRA magnitudes keyed by canonical layer key: denoiser path or ``text_encoder*.`` path)."""
    rest: dict[str, torch.Tensor] = {}
    magnitudes: dict[str, torch.Tensor] = {}
    for key, value in tensors.items():
        suffix = next((s for s in MAGNITUDE_SUFFIXES if key.endswith(s)), None)
        if suffix is None:
            rest[key] = value
            continue
        stem = key[: -len(suffix)].removeprefix("base_model.model.")
        for prefix in DENOISER_PREFIXES:
            stem = stem.removeprefix(prefix)
        magnitudes[stem] = value
    return rest, magnitudes


def _with_magnitudes(
    layers: dict[str, AdapterKind], text: dict[str, AdapterKind], magnitudes: Mapping[str, torch.Tensor], path: Path
) -> None:
    """Wrap each magnitude's module (in place) as a DoRA update; a magnitude without its LoRA is an error."""
    for key, magnitude in magnitudes.items():
        target = text if key.startswith(TEXT_PREFIXES) else layers
        update = target.get(key)
        if not isinstance(update, LowRank):
            raise AdapterFormatError(f"DoRA magnitude for {key!r} has no LoRA factors beside it", path=path)
        with naming_module(key, path):
            target[key] = WeightDecomposed(update=update, magnitude=magnitude.reshape(-1), on_output=True)


def _alphas_by_tensor(tensors: Mapping[str, torch.Tensor], path: Path) -> dict[int, float]:
    """Map id(down factor) → alpha for every ``<stem>.alpha`` with a down factor beside it."""
    found: dict[int, float] = {}
    for key, value in tensors.items():
        if not key.endswith(".alpha"):
            continue
        stem = key[: -len(".alpha")]
        for suffix in DOWN_ALPHA_SIBLINGS:
            down = tensors.get(stem + suffix)
            if down is not None:
                if value.numel() != 1:
                    raise AdapterFormatError(f"alpha {key!r} must hold one number", path=path)
                found[id(down)] = float(value.float().reshape(-1)[0])
    return found


def _diffusers_state_dict(tensors: dict[str, torch.Tensor], flux: bool, layers_per_block: int, path: Path) -> dict:
    """Run diffusers' key conversion for the file's family; its failures become UnknownLayoutError."""
    from diffusers.loaders.lora_pipeline import FluxLoraLoaderMixin, StableDiffusionXLLoraLoaderMixin

    try:
        if flux:
            state_dict, _ = FluxLoraLoaderMixin.lora_state_dict(tensors, return_alphas=True)
        else:
            state_dict, _ = StableDiffusionXLLoraLoaderMixin.lora_state_dict(
                tensors, unet_config=SimpleNamespace(layers_per_block=layers_per_block)
            )
    except (ValueError, KeyError, IndexError, AssertionError, RuntimeError) as exc:
        sample = ", ".join(repr(k) for k in list(tensors)[:3])
        raise UnknownLayoutError(
            f"diffusers could not convert these LoRA keys ({str(exc).strip()[:200]}); first keys: {sample}",
            path=path,
            hint="the file's key layout is not a supported LoRA layout",
        ) from exc
    return state_dict


def _to_peft_names(state_dict: Mapping[str, torch.Tensor], text: bool) -> dict[str, torch.Tensor]:
    """diffusers' own renaming to PEFT ``.lora_A.weight`` / ``.lora_B.weight`` names (same calls as its loaders)."""
    from diffusers.utils import (
        convert_state_dict_to_diffusers,
        convert_state_dict_to_peft,
        convert_unet_state_dict_to_peft,
    )
    from diffusers.utils.state_dict_utils import StateDictType

    if all(".lora_A." in k or ".lora_B." in k for k in state_dict):
        return dict(state_dict)
    if text:
        # diffusers infers the old ``to_k_lora`` layout only from a ``to_out_lora`` key: a file adapting just some
        # projections (say q and v) makes its inference fail, so name the layout when its keys show it.
        old = any(".to_q_lora." in k or ".to_k_lora." in k or ".to_v_lora." in k for k in state_dict)
        kind = StateDictType.DIFFUSERS_OLD if old else None
        return convert_state_dict_to_peft(convert_state_dict_to_diffusers(dict(state_dict), original_type=kind))
    return convert_unet_state_dict_to_peft(dict(state_dict))


def _split_components(state_dict: Mapping[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """Group keys by component prefix ("unet", "transformer", "text_encoder", "text_encoder_2", or "" for bare)."""
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in state_dict.items():
        name = key.removeprefix("base_model.model.")
        component = ""
        for prefix in (*DENOISER_PREFIXES, *TEXT_PREFIXES):
            if name.startswith(prefix):
                component, name = prefix[:-1], name[len(prefix) :]
                break
        parts.setdefault(component, {})[name] = value
    return parts


def _build_layers(
    named: Mapping[str, torch.Tensor],
    alphas: Mapping[int, float],
    config: ScaleConfig | None,
    path: Path,
) -> dict[str, AdapterKind]:
    downs: dict[str, torch.Tensor] = {}
    ups: dict[str, torch.Tensor] = {}
    for key, value in named.items():
        if key.endswith(".lora_A.weight"):
            downs[key[: -len(".lora_A.weight")]] = value
        elif key.endswith(".lora_B.weight"):
            ups[key[: -len(".lora_B.weight")]] = value
        else:
            raise UnknownLayoutError(
                f"unsupported LoRA tensor {key!r} (only down/up factors and alphas are understood)", path=path
            )
    layers: dict[str, AdapterKind] = {}
    for module in sorted(downs.keys() | ups.keys()):
        if module not in downs or module not in ups:
            raise AdapterFormatError(f"module {module!r} has only one of its two LoRA factors", path=path)
        down, up = downs[module], ups[module]
        if up.dim() == 2 and down.dim() == 4:
            up = up[:, :, None, None]
        alpha = alphas.get(id(downs[module]))
        if alpha is None and config is not None:
            alpha = config.alpha_for(module, int(down.shape[0]))
        with naming_module(module, path):
            layers[module] = LowRank(down=down, up=up, alpha=alpha)
    return layers


def read_lora(
    tensors: dict[str, torch.Tensor],
    metadata: Mapping[str, str],
    path: Path,
    *,
    flux: bool,
    layers_per_block: int = 2,
) -> tuple[dict[str, AdapterKind], dict[str, AdapterKind]]:
    """Read LoRA tensors into (denoiser layers, text-encoder layers) keyed canonically.

    ``flux`` selects diffusers' Flux conversions; ``layers_per_block`` is the UNet's, needed only to map kohya's
    LDM-named (``input_blocks``) files onto diffusers module paths (2 for SD1.x, SD2 and SDXL).
    """
    tensors, magnitudes = _take_magnitudes(tensors)
    keys = list(tensors)
    alphas = _alphas_by_tensor(tensors, path)
    kohya = any(k.endswith(".lora_down.weight") for k in keys)
    given = dict(tensors) if kohya else {k: v for k, v in tensors.items() if not k.endswith(".alpha")}
    state_dict = _diffusers_state_dict(given, flux, layers_per_block, path)
    configs = {} if kohya else scale_configs(metadata, path)
    denoiser: dict[str, AdapterKind] = {}
    text: dict[str, AdapterKind] = {}
    for component, named in _split_components(state_dict).items():
        is_text = component.startswith("text_encoder")
        peft_named = _to_peft_names(named, is_text)
        config = configs.get(component) or configs.get("")
        built = _build_layers(peft_named, alphas, config, path)
        if is_text:
            text.update({f"{component}.{k}": v for k, v in built.items()})
        else:
            denoiser.update(built)
    _with_magnitudes(denoiser, text, magnitudes, path)
    return denoiser, text


def kohya_module_paths(names: list[str], path: Path, *, layers_per_block: int = 2) -> dict[str, str]:
    """Canonical keys for kohya-style SD/SDXL module names (``lora_unet_…``, ``lora_te1_…``), by diffusers' renaming.

    Used by formats that share kohya's module naming but not its tensors (LyCORIS): each name is run through
    diffusers' LoRA conversion with placeholder factors and found again by tensor identity.
    """
    placeholders: dict[str, torch.Tensor] = {}
    owner: dict[int, str] = {}
    for name in names:
        down, up = torch.zeros(1, 1), torch.zeros(1, 1)
        placeholders[f"{name}.lora_down.weight"] = down
        placeholders[f"{name}.lora_up.weight"] = up
        owner[id(down)] = name
    state_dict = _diffusers_state_dict(placeholders, False, layers_per_block, path)
    found: dict[str, str] = {}
    for component, named in _split_components(state_dict).items():
        for key, value in _to_peft_names(named, component.startswith("text_encoder")).items():
            name = owner.get(id(value))
            if name is not None and key.endswith(".lora_A.weight"):
                module = key[: -len(".lora_A.weight")]
                found[name] = f"{component}.{module}" if component.startswith("text_encoder") else module
    missing = [n for n in names if n not in found]
    if missing:
        raise UnknownLayoutError(
            f"cannot map module names such as {missing[:3]} onto model modules",
            path=path,
            hint="the names match neither this model's modules nor a kohya SD/SDXL layout: use the adapter with the "
            "base model it was made for (LyCORIS files with BFL Flux names such as double_blocks_0_img_attn_qkv are "
            "not supported; train on the diffusers Flux model or convert to LoRA with LyCORIS)",
        )
    return found
