"""Loading a pipeline by name: the toy world's trained model, the smoke-test presets, single-file checkpoints, local
diffusers folders, known hub models and hub ids.

``load_preset("toy-sd")`` gives the toy world's trained pipeline shipped with the package; ``load_preset("tiny-sd")``
and the other random-weight presets of :mod:`composer.smoke_presets` are built once into the cache and loaded from disk
without any network. Any other name is a ``.safetensors`` checkpoint, a local diffusers folder, a known alias from
``KNOWN_MODELS`` or a hub id, handed to ``DiffusionPipeline.from_pretrained``; only aliases and hub ids may reach the
network.
"""

from __future__ import annotations

import contextlib
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

import diffusers
import torch
import transformers
from diffusers import DiffusionPipeline

from composer.checkpoints.layout import is_checkpoint_path
from composer.settings import CACHE_ENV
from composer.smoke_presets.cache import MARKER_FILE, ensure_preset, preset_cache_root
from composer.smoke_presets.registry import PRESETS, PresetSpec, build_denoiser, build_preset, build_tokenizers
from fusion.errors import PresetError
from weights_index.families import pipeline_family

__all__ = [
    "CACHE_ENV",
    "KNOWN_MODELS",
    "MARKER_FILE",
    "PRESETS",
    "TOY_PRESET",
    "KnownModel",
    "PresetSpec",
    "build_denoiser",
    "build_preset",
    "ensure_preset",
    "kontext_call_kwargs",
    "load_preset",
    "preset_cache_root",
    "preset_family",
    "refuse_checkpoint_options",
]

TOY_PRESET = "toy-sd"
"""The trained toy-world model shipped with the package (composer/toyworld): real images offline, the default."""


class KnownModel(NamedTuple):
    """A real model on the Hugging Face hub that LoRA Composer supports, for users with network access."""

    hub_id: str
    family: str


KNOWN_MODELS: dict[str, KnownModel] = {
    "sd15": KnownModel("stable-diffusion-v1-5/stable-diffusion-v1-5", "sd1"),
    "sdxl": KnownModel("stabilityai/stable-diffusion-xl-base-1.0", "sdxl"),
    "flux-dev": KnownModel("black-forest-labs/FLUX.1-dev", "flux"),
    "flux-schnell": KnownModel("black-forest-labs/FLUX.1-schnell", "flux"),
    "flux-kontext": KnownModel("black-forest-labs/FLUX.1-Kontext-dev", "flux"),
}
"""Aliases for real base models; ``load_preset(alias)`` downloads (or reuses the hub cache) like a hub id."""


# --- loading -----------------------------------------------------------------------------------------------------

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def _finish(pipe: DiffusionPipeline, device: str | torch.device | None) -> DiffusionPipeline:
    """Move a loaded pipeline to ``device`` when one was asked for."""
    return pipe.to(device) if device is not None else pipe


def _from_pretrained(
    source: str,
    *,
    offline: bool,
    torch_dtype: torch.dtype | None,
    what: str,
    hint: str,
    components: dict[str, Any] | None = None,
) -> Any:
    """``DiffusionPipeline.from_pretrained`` with every failure turned into a PresetError that says what to do
    (a local folder missing a listed component is refused before loading); ``components`` are passed in ready-made
    instead of being loaded from ``source``."""
    if Path(source).is_dir():
        _refuse_missing_components(Path(source))
    kwargs: dict[str, Any] = {"local_files_only": offline, **(components or {})}
    if torch_dtype is not None:
        kwargs["torch_dtype"] = torch_dtype
    try:
        if not offline:
            return DiffusionPipeline.from_pretrained(source, **kwargs)
        with _quiet_loading():
            return DiffusionPipeline.from_pretrained(source, **kwargs)
    except Exception as exc:
        raise PresetError(f"could not load {what}: {type(exc).__name__}: {exc}", path=source, hint=hint) from exc


def _refuse_missing_components(folder: Path) -> None:
    """Refuse a pipeline folder whose model_index.json lists a component it has no subfolder for.

    diffusers does not fail there for tokenizers: it builds one with an empty vocabulary, and every prompt then reads
    as unknown tokens, so the model draws without its text (the toy world's training command once trained adapters
    that way). Checked before loading, so nothing is built from a half folder.
    """
    index = folder / "model_index.json"
    if not index.is_file():
        return
    listed = json.loads(index.read_text())
    missing = [
        name
        for name, value in listed.items()
        if not name.startswith("_")
        and isinstance(value, list)
        and value[0] is not None
        and not (folder / name).is_dir()
    ]
    if missing:
        folders = ", ".join(f"{name}/" for name in missing)
        raise PresetError(
            f"{folder} lists {', '.join(missing)} in model_index.json but has no {folders} folder; diffusers would fill"
            " a missing tokenizer with an empty vocabulary and read every prompt as unknown tokens",
            path=folder,
            hint=f"restore {folders} from the model it came from (save_pretrained writes every component)",
        )


@contextlib.contextmanager
def _quiet_loading() -> Iterator[None]:
    """Hide diffusers' and transformers' per-component loading bars for local loads (they take well under a second)."""
    diffusers_was_on = diffusers.utils.logging.is_progress_bar_enabled()
    transformers_was_on = transformers.utils.logging.is_progress_bar_enabled()
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()
    try:
        yield
    finally:
        if diffusers_was_on:
            diffusers.utils.logging.enable_progress_bar()
        if transformers_was_on:
            transformers.utils.logging.enable_progress_bar()


def refuse_checkpoint_options(name: str, vae: str | Path | None, text_encoders: str | Path | None) -> None:
    """A PresetError when ``vae`` or ``text_encoders`` is given for a model that is no single-file checkpoint (a
    preset, a diffusers folder, a hub id): they would have nothing to apply to."""
    if is_checkpoint_path(name) or (vae is None and text_encoders is None):
        return
    raise PresetError(
        f"--vae and --text-encoders apply to single-file checkpoints; {name!r} is not one",
        hint="name a .safetensors checkpoint with --model, or leave the options out",
    )


def load_preset(
    name: str,
    *,
    cache_dir: str | Path | None = None,
    torch_dtype: torch.dtype | None = None,
    device: str | torch.device | None = None,
    vae: str | Path | None = None,
    text_encoders: str | Path | None = None,
) -> DiffusionPipeline:
    """Load a pipeline by preset name, known alias, single-file checkpoint, local diffusers folder or hub id.

    Built-in presets (``PRESETS``) are built once into the cache and loaded from disk, offline (their tokenizers are
    rebuilt in memory, ten times faster than reading them back). A ``.safetensors``
    checkpoint (SD 1.x, SD 2.x, SDXL, FLUX.1) is read offline by :func:`composer.checkpoints.load.load_checkpoint`, with
    ``vae`` overriding its autoencoder and ``text_encoders`` (a folder) supplying the text encoders it lacks. Aliases
    in ``KNOWN_MODELS`` and names shaped like ``owner/model`` go to the hub (or its local cache); a local folder never
    touches the network. Failures raise PresetError with a hint.
    """
    if is_checkpoint_path(name):
        from composer.checkpoints.load import load_checkpoint

        with _quiet_loading():
            pipe = load_checkpoint(name, vae=vae, text_encoders=text_encoders, torch_dtype=torch_dtype)
        return _finish(pipe, device)
    refuse_checkpoint_options(name, vae, text_encoders)
    if name == TOY_PRESET:
        from composer.toyworld.model import load_toy_pipeline

        with _quiet_loading():
            return _finish(load_toy_pipeline(torch_dtype), device)
    if name in PRESETS:
        folder = ensure_preset(name, cache_dir)
        pipe = _from_pretrained(
            str(folder),
            offline=True,
            torch_dtype=torch_dtype,
            what=f"the cached preset {name!r}",
            hint=f"delete {folder} so it is rebuilt",
            components=build_tokenizers(name),
        )
        return _finish(pipe, device)
    path = Path(name).expanduser()
    if path.is_dir():
        pipe = _from_pretrained(
            str(path),
            offline=True,
            torch_dtype=torch_dtype,
            what="a local pipeline folder",
            hint="point at a diffusers pipeline folder (one with model_index.json), e.g. made by save_pretrained",
        )
        return _finish(pipe, device)
    hub_id = KNOWN_MODELS[name].hub_id if name in KNOWN_MODELS else name
    if not _HUB_ID.match(hub_id):
        known = ", ".join([TOY_PRESET, *PRESETS, *KNOWN_MODELS])
        raise PresetError(
            f"{name!r} is not a preset, a known model, a checkpoint file, an existing folder or a hub id",
            hint=f"use one of {known}, a .safetensors checkpoint, a diffusers folder, or a hub id like owner/model",
        )
    pipe = _from_pretrained(
        hub_id,
        offline=False,
        torch_dtype=torch_dtype,
        what=f"the hub model {hub_id!r}",
        hint="check the id and your network (HF_HUB_OFFLINE must be unset to download), or use a local folder",
    )
    return _finish(pipe, device)


# --- helpers for callers -----------------------------------------------------------------------------------------


def preset_family(pipe: Any) -> str:
    """The base-model family of any loaded pipeline: "sd1", "sd2", "sdxl", "flux" or "unknown".

    The codebase's one pipeline-family rule, :func:`weights_index.families.pipeline_family` (SD 2.x by its
    1024-wide cross-attention).
    """
    return pipeline_family(pipe)


def kontext_call_kwargs(height: int, width: int) -> dict[str, Any]:
    """Call kwargs that make a FluxKontextPipeline run at exactly ``height`` × ``width``.

    Kontext silently rescales the output to ``max_area`` (default 1024²) and snaps the input image to one of its
    preferred resolutions; for a 64² test that means minutes at 1024². Pass these with ``**`` to keep the size:
    ``pipe(prompt="…", image=img, **kontext_call_kwargs(64, 64))`` (Kontext's first positional argument is the
    image, so pass the prompt by keyword). The input image should be ``height`` × ``width`` too.
    """
    return {"height": height, "width": width, "max_area": height * width, "_auto_resize": False}
