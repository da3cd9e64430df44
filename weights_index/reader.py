"""Adapter files → facts and canonical adapters: :func:`probe` (header only) and :func:`read_adapter` (tensors).

``probe`` reads nothing but the safetensors header, so a catalog can classify thousands of files cheaply: the
producer format, base family, number of adapted modules, ranks and whether text encoders are adapted.
``read_adapter`` loads and validates the tensors and hands them to the reader of the file's format family
(``weights_index/formats/``), which returns a :class:`fusion.adapters.Adapter` whose per-layer ``.delta()`` is the
exact ΔW the producer (and diffusers, where it loads the format) applies. The format readers (and torch) are
imported on the first ``read_adapter``, so probing a library stays light.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fusion.errors import AdapterFormatError, ComposerError, FamilyMismatchError, ShapeMismatchError, UnknownLayoutError
from weights_index.families import ALL_FAMILIES, FamilyEvidence, detect_family
from weights_index.formats.layout import read_layout
from weights_index.safetensors_file import load_tensors, read_header

if TYPE_CHECKING:
    from fusion.adapters import Adapter, AdapterKind


@dataclass(frozen=True)
class AdapterHeader:
    """Header-only facts about an adapter file (no tensor data read); what the catalog scanner stores."""

    path: Path
    format: str
    family: str
    num_layers: int
    ranks: tuple[int, ...]
    has_text_encoder: bool
    metadata: dict[str, str]
    file_size: int


CHECKPOINT_FILES = ("adapter_model.safetensors", "pytorch_lora_weights.safetensors")
"""The weights file inside a PEFT ``save_pretrained`` folder and a diffusers ``save_lora_weights`` folder."""


def adapter_file(path: str | Path) -> Path:
    """The safetensors file to read for ``path``: the path itself, or the checkpoint file inside a PEFT /
    diffusers folder (:data:`CHECKPOINT_FILES`); a folder without one raises :class:`UnknownLayoutError`."""
    path = Path(path)
    if not path.is_dir():
        return path
    for name in CHECKPOINT_FILES:
        if (path / name).is_file():
            return path / name
    raise UnknownLayoutError(
        "the folder holds no adapter checkpoint",
        path=path,
        hint=f"point at a .safetensors file, or a folder with one of {', '.join(CHECKPOINT_FILES)}",
    )


def _shapes(path: Path) -> tuple[dict[str, tuple[int, ...]], dict[str, str], int]:
    header = read_header(path)
    return {k: v.shape for k, v in header.tensors.items()}, header.metadata, header.file_size


def _check_evidence(evidence: FamilyEvidence, path: Path) -> None:
    named = evidence.from_metadata
    if named is not None and evidence.candidates and named not in evidence.candidates:
        allowed = "/".join(sorted(evidence.candidates))
        raise ShapeMismatchError(
            f"metadata says the adapter is for {named}, but its keys and shapes are {allowed}-structured",
            path=path,
            hint="the file's metadata is wrong or the file was edited; fix or remove its base-model metadata",
        )


def probe(path: str | Path) -> AdapterHeader:
    """Classify an adapter file from its header alone: format, family, module count, ranks, text encoders.

    Raises the typed errors of :mod:`weights_index.safetensors_file` for malformed files,
    :class:`~fusion.errors.UnknownLayoutError` for unrecognised key layouts and
    :class:`~fusion.errors.ShapeMismatchError` when metadata and structure disagree about the family.
    """
    path = adapter_file(path)
    shapes, metadata, file_size = _shapes(path)
    layout = read_layout(shapes, metadata, path=path)
    evidence = detect_family(shapes, metadata)
    _check_evidence(evidence, path)
    family = "flux" if layout.format.startswith("flux-") else evidence.family
    return AdapterHeader(
        path=path,
        format=layout.format,
        family=family,
        num_layers=len(layout.modules),
        ranks=layout.ranks,
        has_text_encoder=bool(layout.text_modules),
        metadata=metadata,
        file_size=file_size,
    )


def _resolve_family(evidence: FamilyEvidence, detected: str, declared: str | None, path: Path) -> str:
    """The family to read the file as: the detected one, or ``declared`` when the file leaves room for it."""
    if declared is None or declared == detected:
        return detected
    if declared not in ALL_FAMILIES:
        raise FamilyMismatchError(f"unknown family {declared!r}", path=path, hint=f"use one of {sorted(ALL_FAMILIES)}")
    ruled_out = bool(evidence.candidates) and declared not in evidence.candidates
    if ruled_out or (evidence.from_metadata is not None and evidence.from_metadata != declared):
        raise FamilyMismatchError(
            f"the file is a {detected} adapter ({evidence.reason}), not {declared}",
            path=path,
            hint=f"use it with a {detected} pipeline",
        )
    return declared


def _read_layers(
    fmt: str,
    family: str,
    tensors: dict,
    metadata: dict[str, str],
    path: Path,
    layers_per_block: int,
    shapes: Mapping[str, tuple[int, ...]] | None,
) -> tuple[dict[str, AdapterKind], dict[str, AdapterKind]]:
    from weights_index.formats.lora import read_lora
    from weights_index.formats.lycoris import read_lycoris
    from weights_index.formats.shira import read_shira

    if fmt in ("shira", "peft-shira"):
        return read_shira(tensors, metadata, path, peft_layout=fmt == "peft-shira", shapes=shapes)
    if fmt.startswith("lycoris"):
        return read_lycoris(tensors, path, layers_per_block=layers_per_block, shapes=shapes)
    return read_lora(tensors, metadata, path, flux=family == "flux", layers_per_block=layers_per_block)


INTEGER_TENSOR_SUFFIXES = ("index", "indices", "shape", "alpha", "on_input")
"""Tensor names that may hold integers: sparse positions and shapes, alphas (a scalar read as a number) and IA3's
``on_input`` flag."""


def _refuse_malformed_values(tensors: Mapping[str, Any], path: Path) -> None:
    """Every tensor must hold something, and adapter values must be floating point: an empty factor or alpha, or an
    integer or bool factor, is a broken file (never cast, never divided by a rank of 0)."""
    for key, tensor in tensors.items():
        if tensor.numel() == 0:
            raise AdapterFormatError(f"tensor {key!r} is empty", path=path, hint="the file is broken")
        if not tensor.is_floating_point() and not key.rsplit(".", 1)[-1].endswith(INTEGER_TENSOR_SUFFIXES):
            raise AdapterFormatError(
                f"tensor {key!r} is {str(tensor.dtype).removeprefix('torch.')}; adapter values must be floating point",
                path=path,
                hint="the file is broken or not an adapter",
            )


def read_adapter(
    path: str | Path,
    family: str | None = None,
    *,
    name: str | None = None,
    allow_non_finite: bool = False,
    layers_per_block: int = 2,
    shapes: Mapping[str, tuple[int, ...]] | None = None,
) -> Adapter:
    """Read any supported adapter file (or PEFT / diffusers checkpoint folder) into a canonical
    :class:`~fusion.adapters.Adapter`.

    ``family`` declares the pipeline's family: a file that is clearly for another family raises
    :class:`~fusion.errors.FamilyMismatchError`. NaN/Inf tensors are refused unless ``allow_non_finite``.
    ``layers_per_block`` (the UNet's) is used only for kohya/LyCORIS files with LDM ``input_blocks`` names;
    ``shapes`` (canonical key → weight shape of the target model; a pipeline's ``model_shapes()``) is needed for
    PEFT SHiRA files and LyCORIS IA3/OFT files, which store none, maps kohya/LyCORIS module names through the
    model's own paths, and gives LyCORIS conv layers (stored flattened) their conv shape.
    ``meta`` carries ``format`` and the raw ``safetensors_metadata``; SHiRA/restoration files set
    ``task_prompt`` / ``needs_input_image`` from the metadata keys of the same names.
    """
    given = Path(path)
    path = adapter_file(given)
    header = read_header(path)
    header_shapes = {k: v.shape for k, v in header.tensors.items()}
    layout = read_layout(header_shapes, header.metadata, path=path)
    evidence = detect_family(header_shapes, header.metadata)
    _check_evidence(evidence, path)
    detected = "flux" if layout.format.startswith("flux-") else evidence.family
    resolved = _resolve_family(evidence, detected, family, path)
    tensors = load_tensors(path, allow_non_finite=allow_non_finite, header=header)
    _refuse_malformed_values(tensors, path)
    try:
        layers, text_layers = _read_layers(
            layout.format, resolved, tensors, header.metadata, path, layers_per_block, shapes
        )
    except ComposerError:
        raise
    except Exception as exc:  # a format reader met values it did not anticipate: still a typed error
        raise AdapterFormatError(
            f"the {layout.format} file could not be read ({type(exc).__name__})", path=path, hint="the file is broken"
        ) from exc
    if not layers and not text_layers:
        raise UnknownLayoutError("no adapted module could be read from the file", path=path)
    metadata = header.metadata
    from fusion.adapters import Adapter
    from fusion.magnitude import check_adapter_numbers

    adapter = Adapter(
        name=name or (given.name if given.is_dir() else path.stem),
        family=resolved,
        layers=layers,
        text_encoder_layers=text_layers,
        task_prompt=metadata.get("task_prompt") or None,
        needs_input_image=metadata.get("needs_input_image", "").strip().lower() in ("1", "true", "yes"),
        meta={"format": layout.format, "safetensors_metadata": dict(metadata)},
        source=str(path),
    )
    if not allow_non_finite:
        check_adapter_numbers(adapter)
    return adapter
