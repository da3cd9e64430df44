"""SHiRA files: our own sparse layout (read and written here) and PEFT's ``ShiraModel`` checkpoints (read).

Our layout, version 1 (a plain safetensors file; every adapted weight has three tensors)::

    <component>.<module path>.shira_index   int32, 1-D, sorted unique flat (row-major) positions into the weight
    <component>.<module path>.shira_values  float, 1-D, same length: the update ΔW at those positions
    <component>.<module path>.shira_shape   int64, 1-D: the weight's shape (e.g. [out, in] or [out, in, kh, kw])

``<component>`` is ``unet`` (SD1/SD2/SDXL) or ``transformer`` (Flux) for the denoiser, ``text_encoder`` /
``text_encoder_2`` for text encoders. String metadata (``__metadata__``)::

    shira_format_version  "1"
    base_family           "sd1" | "sd2" | "sdxl" | "flux"
    mask_type             "random" | "wm" | "grad" | "snip" | "struct" | "lora-topk" | …
    r  or  density        the budget the mask was built with (K = r·(out+in), or K = density·numel)
    base_fingerprint      identifies the base weights the values were trained against
    task_prompt, needs_input_image   (restoration / editing adapters only)

ΔW is the values at their positions (no extra scale). PEFT's checkpoints store, per module,
``base_model.model.<path>.shira_indices`` (int32 2×K: rows, then columns) and ``….shira_weight`` (K values) with
scaling 1 and duplicates summed (a sparse COO tensor); they do not store the weight's shape, so reading them needs
the target model's shapes.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch

from fusion.adapters import Adapter, AdapterKind, Sparse
from fusion.errors import AdapterFormatError, ShapeMismatchError
from weights_index.formats.module_errors import naming_module
from weights_index.safetensors_file import save_atomic

SHIRA_FORMAT_VERSION = "1"
UNET_FAMILIES = ("sd1", "sd2", "sdxl")
_PARTS = ("shira_index", "shira_values", "shira_shape")


def _denoiser_component(family: str) -> str:
    return "unet" if family in UNET_FAMILIES else "transformer"


def save_shira(
    adapter_or_layers: Adapter | Mapping[str, AdapterKind],
    path: str | Path,
    metadata: Mapping[str, str] | None = None,
) -> Path:
    """Write sparse updates in our SHiRA layout (atomically: a temp file renamed into place).

    Give an :class:`Adapter` (its family picks the denoiser component and fills ``base_family``) or a mapping of
    canonical keys to :class:`Sparse` updates (then pass ``base_family`` in ``metadata``). Returns the path.
    """
    meta = {"shira_format_version": SHIRA_FORMAT_VERSION}
    if isinstance(adapter_or_layers, Adapter):
        meta["base_family"] = adapter_or_layers.family
        if adapter_or_layers.task_prompt:
            meta["task_prompt"] = adapter_or_layers.task_prompt
        if adapter_or_layers.needs_input_image:
            meta["needs_input_image"] = "true"
        items = list(adapter_or_layers.all_layers())
    else:
        items = list(adapter_or_layers.items())
    meta.update({str(k): str(v) for k, v in (metadata or {}).items()})
    component = _denoiser_component(meta.get("base_family", "unknown"))
    tensors: dict[str, torch.Tensor] = {}
    for key, update in items:
        if not isinstance(update, Sparse):
            raise AdapterFormatError(
                f"layer {key!r} is {type(update).__name__}; SHiRA files hold sparse updates only",
                path=path,
                hint="convert it first with fusion.adapters.to_sparse",
            )
        name = key if key.startswith(("text_encoder.", "text_encoder_2.")) else f"{component}.{key}"
        tensors[f"{name}.shira_index"] = update.index.to(torch.int32).contiguous()
        tensors[f"{name}.shira_values"] = update.values.contiguous()
        tensors[f"{name}.shira_shape"] = torch.tensor(update.shape, dtype=torch.int64)
    return save_atomic(tensors, path, meta)


def _split_key(name: str) -> tuple[bool, str]:
    """(is text encoder, canonical key) for a module name with its component prefix."""
    bare = name.removeprefix("base_model.model.")
    if bare.startswith(("text_encoder.", "text_encoder_2.")):
        return True, bare
    for prefix in ("unet.", "transformer."):
        if bare.startswith(prefix):
            return False, bare[len(prefix) :]
    return False, bare


def _read_ours(tensors: Mapping[str, torch.Tensor], path: Path) -> dict[str, Sparse]:
    groups: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        stem, _, part = key.rpartition(".")
        if part not in _PARTS:
            raise AdapterFormatError(f"unexpected tensor {key!r} in a SHiRA file", path=path)
        groups.setdefault(stem, {})[part] = value
    out: dict[str, Sparse] = {}
    for stem, parts in groups.items():
        missing = [p for p in _PARTS if p not in parts]
        if missing:
            raise AdapterFormatError(f"SHiRA module {stem!r} lacks {missing}", path=path)
        index, values, shape = parts["shira_index"], parts["shira_values"], parts["shira_shape"]
        if index.is_floating_point() or shape.is_floating_point():
            raise AdapterFormatError(f"SHiRA module {stem!r} has non-integer indices or shape", path=path)
        with naming_module(stem, path, "SHiRA module"):
            out[stem] = Sparse(index=index, values=values, shape=tuple(int(s) for s in shape.tolist()))
    return out


def _read_peft(
    tensors: Mapping[str, torch.Tensor], path: Path, shapes: Mapping[str, tuple[int, ...]] | None
) -> dict[str, Sparse]:
    out: dict[str, Sparse] = {}
    for key, weight in tensors.items():
        if not key.endswith(".shira_weight"):
            if not key.endswith(".shira_indices"):
                raise AdapterFormatError(f"unexpected tensor {key!r} in a PEFT SHiRA file", path=path)
            continue
        stem = key[: -len(".shira_weight")]
        indices = tensors.get(f"{stem}.shira_indices")
        if indices is None:
            raise AdapterFormatError(f"PEFT SHiRA module {stem!r} has weights but no shira_indices", path=path)
        if indices.dim() != 2 or indices.shape[0] != 2 or indices.shape[1] != weight.numel():
            raise ShapeMismatchError(
                f"PEFT SHiRA module {stem!r}: indices {tuple(indices.shape)} do not match {weight.numel()} values",
                path=path,
            )
        _, canonical = _split_key(stem)
        shape = None if shapes is None else shapes.get(canonical)
        if shape is None:
            raise AdapterFormatError(
                f"PEFT SHiRA files do not store weight shapes, and none was given for {canonical!r}",
                path=path,
                hint="pass shapes= (module key -> weight shape) from the target model, or convert to our SHiRA layout",
            )
        rows, cols = indices.long()
        if rows.numel() and (int(rows.max()) >= shape[0] or int(cols.max()) >= shape[1] or int(indices.min()) < 0):
            raise ShapeMismatchError(f"PEFT SHiRA module {stem!r} indexes outside a {tuple(shape)} weight", path=path)
        flat = rows * int(shape[1]) + cols
        out[stem] = Sparse.from_unsorted(flat, weight.reshape(-1), tuple(shape))
    return out


def read_shira(
    tensors: Mapping[str, torch.Tensor],
    metadata: Mapping[str, str],
    path: Path,
    *,
    peft_layout: bool,
    shapes: Mapping[str, tuple[int, ...]] | None = None,
) -> tuple[dict[str, AdapterKind], dict[str, AdapterKind]]:
    """Read SHiRA tensors (ours, or PEFT's with ``peft_layout``) into (denoiser layers, text-encoder layers)."""
    version = metadata.get("shira_format_version")
    if not peft_layout and version not in (None, SHIRA_FORMAT_VERSION):
        raise AdapterFormatError(
            f"SHiRA format version {version!r} is newer than this reader ({SHIRA_FORMAT_VERSION})",
            path=path,
            hint="upgrade lora-composer",
        )
    modules = _read_peft(tensors, path, shapes) if peft_layout else _read_ours(tensors, path)
    denoiser: dict[str, AdapterKind] = {}
    text: dict[str, AdapterKind] = {}
    for stem, update in modules.items():
        is_text, canonical = _split_key(stem)
        (text if is_text else denoiser)[canonical] = update
    return denoiser, text
