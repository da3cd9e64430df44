"""What each metadata source says about an adapter, as a dict of :class:`~weights_index.metadata.AdapterMetadata`
fields: kohya sd-scripts' ``ss_*`` header keys, Stability's ModelSpec header keys, a Civitai model-version sidecar,
and A1111's per-LoRA settings sidecar. Values a source leaves empty are left out; oddities become warnings.
"""

from __future__ import annotations

import html
import json
import math
import re
from collections.abc import Iterable, Mapping
from typing import Any

from fusion.weight_range import weight_problem
from weights_index.families import family_from_text
from weights_index.kohya_captions import caption_presence, folder_names, reg_folders

MAX_TAGS = 500
"""Caption tags kept per adapter (most frequent first); big datasets list thousands."""

_DATASET_FOLDER = re.compile(r"^\d+_(.+)$")
_KOHYA_DEFAULT_TITLE = re.compile(r"^(LoRA|TextualInversion|Checkpoint)@[\d.]+$")


def from_kohya(meta: Mapping[str, str], warnings: list[str]) -> dict[str, Any]:
    """kohya's ``ss_*`` header keys: output name, base model, network settings, caption tags, dataset folders."""
    out: dict[str, Any] = {}
    if meta.get("ss_output_name"):
        out["title"] = meta["ss_output_name"]
    version = meta.get("ss_base_model_version")
    if version:
        out["base_model"] = version
        out["family_hint"] = family_from_text(version)
    elif meta.get("ss_v2", "").lower() == "true":
        out["family_hint"] = "sd2"
    elif meta.get("ss_sd_model_name"):
        out["base_model"] = meta["ss_sd_model_name"]
    if meta.get("ss_network_module"):
        out["network_module"] = meta["ss_network_module"]
    out["network_dim"] = _as_int(meta.get("ss_network_dim"))
    out["network_alpha"] = _as_float(meta.get("ss_network_alpha"))
    if meta.get("ss_tag_frequency"):
        out["tags"] = _tag_frequency(meta["ss_tag_frequency"], warnings)
        regularization = reg_folders(meta.get("ss_reg_dataset_dirs"))
        out["dataset_triggers"] = _dataset_triggers(meta["ss_tag_frequency"], regularization)
        out["dataset_folders"] = folder_names(meta["ss_tag_frequency"], regularization)
        presence = caption_presence(meta["ss_tag_frequency"], meta.get("ss_dataset_dirs"), regularization)
        out["caption_presence"] = {tag: (p.count, p.captions, p.folder) for tag, p in presence.items()}
    hashes = {k: meta[k] for k in ("sshs_model_hash", "sshs_legacy_hash") if meta.get(k)}
    if hashes:
        out["hashes"] = hashes
    return {k: v for k, v in out.items() if v not in (None, {}, "", ())}


def _tag_frequency(raw: str, warnings: list[str]) -> dict[str, int]:
    """Sum ``{dataset: {tag: count}}`` over datasets; most frequent first, ties by name."""
    try:
        datasets = json.loads(raw)
    except (json.JSONDecodeError, RecursionError):
        warnings.append("ss_tag_frequency is not valid JSON; tags skipped")
        return {}
    if not isinstance(datasets, dict):
        warnings.append("ss_tag_frequency is not a JSON object; tags skipped")
        return {}
    counts: dict[str, int] = {}
    for tags in datasets.values():
        if not isinstance(tags, dict):
            continue
        for tag, count in tags.items():
            tag = str(tag).strip()
            if tag and isinstance(count, (int, float)) and math.isfinite(count):
                counts[tag] = counts.get(tag, 0) + int(count)
    ranked = sorted(counts.items(), key=lambda item: (-item[1], item[0]))
    return dict(ranked[:MAX_TAGS])


def _dataset_triggers(raw: str, skip: frozenset[str] = frozenset()) -> tuple[str, ...]:
    """Identifiers of DreamBooth-style dataset folders (``<repeats>_<identifier>``) found among their own captions'
    tags; the regularization folders in ``skip`` (``1_woman``, captioned "woman") are left out."""
    try:
        datasets = json.loads(raw)
    except (json.JSONDecodeError, RecursionError):
        return ()
    found = []
    for folder, tags in datasets.items() if isinstance(datasets, dict) else ():
        match = None if str(folder) in skip else _DATASET_FOLDER.match(str(folder))
        if match and isinstance(tags, dict):
            identifier = match.group(1).strip()
            if identifier.lower() in {str(tag).strip().lower() for tag in tags}:
                found.append(identifier)
    return unique(found)


def from_modelspec(meta: Mapping[str, str]) -> dict[str, Any]:
    """Stability's ``modelspec.*`` header keys (a kohya default title such as ``LoRA@1.0`` is no title)."""
    out: dict[str, Any] = {}
    title = meta.get("modelspec.title", "").strip()
    if title and not _KOHYA_DEFAULT_TITLE.match(title):
        out["title"] = title
    for key in ("description", "author"):
        if meta.get(f"modelspec.{key}", "").strip():
            out[key] = meta[f"modelspec.{key}"].strip()
    architecture = meta.get("modelspec.architecture")
    if architecture:
        out["base_model"] = architecture
        out["family_hint"] = family_from_text(architecture)
    out["trigger_words"] = split_words(meta.get("modelspec.trigger_phrase"))
    out["labels"] = split_words(meta.get("modelspec.tags"))
    if meta.get("modelspec.hash_sha256"):
        out["hashes"] = {"modelspec.hash_sha256": meta["modelspec.hash_sha256"]}
    return {k: v for k, v in out.items() if v not in (None, (), "")}


def from_civitai(info: Mapping[str, Any], warnings: list[str]) -> dict[str, Any]:
    """A Civitai model-version JSON (``NAME.civitai.info``): name, creator, base model, trained words, tags."""
    if not info:
        return {}
    model = info.get("model") if isinstance(info.get("model"), dict) else {}
    out: dict[str, Any] = {}
    if isinstance(model.get("name"), str):
        out["title"] = model["name"].strip()
    if isinstance(model.get("type"), str):
        out["model_type"] = model["type"]
    description = info.get("description") or model.get("description")
    if isinstance(description, str):
        out["description"] = _strip_html(description)
    creator = info.get("creator") or model.get("creator")
    if isinstance(creator, dict) and isinstance(creator.get("username"), str):
        out["author"] = creator["username"]
    if isinstance(info.get("baseModel"), str):
        out["base_model"] = info["baseModel"]
        out["family_hint"] = family_from_text(info["baseModel"])
    words = info.get("trainedWords")
    if isinstance(words, list):
        out["trigger_words"] = tuple(w for item in words if isinstance(item, str) for w in split_words(item))
    tags = model.get("tags", info.get("tags"))
    if isinstance(tags, list):
        names = (t.get("name") if isinstance(t, dict) else t for t in tags)
        out["labels"] = tuple(n.strip() for n in names if isinstance(n, str) and n.strip())
    model_id, version_id = info.get("modelId"), info.get("id")
    if isinstance(model_id, int):
        suffix = f"?modelVersionId={version_id}" if isinstance(version_id, int) else ""
        out["source_url"] = f"https://civitai.com/models/{model_id}{suffix}"
    out["file_sha256"] = _civitai_primary_sha256(info.get("files"))
    if not any(v for v in out.values()):
        warnings.append("civitai sidecar has none of the expected fields")
    return {k: v for k, v in out.items() if v not in (None, (), "")}


def _civitai_primary_sha256(files: object) -> str | None:
    if not isinstance(files, list):
        return None
    candidates = [f for f in files if isinstance(f, dict)]
    candidates.sort(key=lambda f: not f.get("primary"))
    for entry in candidates:
        hashes = entry.get("hashes")
        if isinstance(hashes, dict) and isinstance(hashes.get("SHA256"), str):
            return hashes["SHA256"]
    return None


def from_a1111(settings: Mapping[str, Any], warnings: list[str]) -> dict[str, Any]:
    """A1111's per-LoRA settings (``NAME.json``); an out-of-range preferred weight is dropped."""
    if not settings:
        return {}
    out: dict[str, Any] = {}
    out["trigger_words"] = split_words(_as_str(settings.get("activation text")))
    weight = _as_float(settings.get("preferred weight"))
    problem = None if weight is None else weight_problem(weight)
    if problem is not None:
        warnings.append(f"preferred weight {weight!r} {problem}; ignored")
        weight = None
    out["preferred_weight"] = weight if weight else None  # A1111 writes 0 for "use the default"
    for key, target in (("notes", "notes"), ("negative text", "negative_text"), ("description", "description")):
        text = _as_str(settings.get(key))
        if text and text.strip():
            out[target] = text.strip()
    version = _as_str(settings.get("sd version"))
    if version and version.lower() != "unknown":
        out["base_model"] = version
        out["family_hint"] = family_from_text(version)
    return {k: v for k, v in out.items() if v not in (None, (), "")}


def split_words(text: str | None) -> tuple[str, ...]:
    """Comma-separated phrases → stripped, non-empty phrases."""
    if not text:
        return ()
    return tuple(p.strip() for p in text.split(",") if p.strip())


def unique(values: Iterable[str]) -> tuple[str, ...]:
    """``values`` in order, each once (compared ignoring case)."""
    seen: set[str] = set()
    out = []
    for value in values:
        if value.lower() not in seen:
            seen.add(value.lower())
            out.append(value)
    return tuple(out)


def _strip_html(text: str) -> str:
    text = re.sub(r"<br\s*/?>|</p>", "\n", text, flags=re.IGNORECASE)
    text = html.unescape(re.sub(r"<[^>]+>", "", text))
    return re.sub(r"\n{3,}", "\n\n", text).strip()


def _as_str(value: object) -> str | None:
    return value if isinstance(value, str) else None


def _as_int(value: object) -> int | None:
    try:
        return int(float(value)) if value not in (None, "", "None") else None  # type: ignore[arg-type]
    except (TypeError, ValueError, OverflowError):
        return None


def _as_float(value: object) -> float | None:
    """A finite float, or None (NaN and infinities carry no usable setting)."""
    try:
        number = float(value) if value not in (None, "", "None") else None  # type: ignore[arg-type]
    except (TypeError, ValueError, OverflowError):
        return None
    return number if number is not None and math.isfinite(number) else None
