"""Everything a LoRA file and its sidecars say about it, merged into one :class:`AdapterMetadata`.

Community adapters describe themselves in several places, none complete on its own:

- kohya sd-scripts training metadata in the safetensors header (``ss_output_name``, ``ss_base_model_version``,
  ``ss_network_module``/``_dim``/``_alpha``, ``ss_tag_frequency`` — caption tag counts per dataset folder — and
  ``ss_dataset_dirs`` — images per folder; :mod:`weights_index.kohya_captions` reads how consistently each tag
  occurs in its folder's captions; the regularization folders ``ss_reg_dataset_dirs`` lists name nothing);
- Stability's ModelSpec keys in the same header (``modelspec.title``, ``.trigger_phrase``, ``.architecture``,
  ``.description``, ``.tags``, ``.thumbnail`` as a ``data:`` URI);
- ``NAME.civitai.info``: the Civitai model-version JSON saved by Civitai Helper and similar tools
  (``trainedWords``, ``baseModel``, ``model.name``/``type``/``tags``, ``files[].hashes``);
- ``NAME.json``: A1111's per-LoRA user settings (``activation text``, ``preferred weight``, ``notes``,
  ``sd version``, ``negative text``, ``description``);
- preview images next to the file (``NAME.preview.png``, ``NAME.png``, ``NAME.jpg``, …);
- our own ``category`` header key, which wins over the category inferred from labels and titles.

A malformed sidecar never fails a read: it is skipped and noted in ``warnings``. A sidecar over
:data:`MAX_SIDECAR_BYTES` is refused (:class:`~fusion.errors.SidecarTooLargeError`) without being read.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import html
import json
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from fusion.errors import SidecarTooLargeError
from fusion.weight_range import weight_problem
from weights_index.families import family_from_text
from weights_index.hashing import autov2
from weights_index.kohya_captions import CaptionPresence, caption_presence, folder_names, reg_folders
from weights_index.text_safety import storable_json

CATEGORIES = ("character", "clothing", "style", "background", "object")
"""What an adapter mainly adds to an image; retrieval balances picks across these."""

IMAGE_EXTENSIONS = ("png", "jpg", "jpeg", "webp", "gif")
PREVIEW_PATTERNS = tuple(f"{{stem}}.preview.{ext}" for ext in IMAGE_EXTENSIONS) + tuple(
    f"{{stem}}.{ext}" for ext in IMAGE_EXTENSIONS
)
"""Preview file names A1111, Forge and Civitai Helper look for, best first."""

CIVITAI_SIDECAR = "{stem}.civitai.info"
A1111_SIDECAR = "{stem}.json"
MAX_SIDECAR_BYTES = 4 * 1024 * 1024
"""The largest sidecar read; real Civitai and A1111 files are a few kB to a few hundred kB."""
MAX_TAGS = 500
"""Caption tags kept per adapter (most frequent first); big datasets list thousands."""

_DATASET_FOLDER = re.compile(r"^\d+_(.+)$")
_KOHYA_DEFAULT_TITLE = re.compile(r"^(LoRA|TextualInversion|Checkpoint)@[\d.]+$")
_CATEGORY_WORDS = {
    "character": ("character", "characters", "celebrity", "person", "people", "oc", "original character"),
    "clothing": ("clothing", "clothes", "outfit", "outfits", "costume", "costumes", "dress", "fashion", "uniform"),
    "style": ("style", "styles", "art style", "artstyle", "artist style", "aesthetic", "painting style"),
    "background": ("background", "backgrounds", "scenery", "landscape", "environment", "buildings", "cityscape"),
    "object": ("object", "objects", "item", "items", "prop", "props", "vehicle", "vehicles", "weapon", "weapons"),
}
_IMAGE_MAGIC = ((b"\x89PNG\r\n\x1a\n", "png"), (b"\xff\xd8\xff", "jpg"), (b"GIF8", "gif"))


@dataclass(frozen=True)
class AdapterMetadata:
    """What is known about one adapter beyond its tensors; every field is optional.

    ``tags`` are caption-tag counts from training (most frequent first); ``labels`` are curated tags from
    Civitai or ModelSpec. ``family_hint`` is what the metadata claims ("sd1"/"sd2"/"sdxl"/"flux"); the
    tensor shapes decide in the end. ``hashes`` holds ``sha256``, ``AutoV2`` and any hashes the file declares.
    """

    title: str | None = None
    description: str | None = None
    author: str | None = None
    trigger_words: tuple[str, ...] = ()
    dataset_triggers: tuple[str, ...] = ()
    """kohya dataset folders' identifiers (``10_ohwx`` → "ohwx") that also occur in that folder's captions: the
    token the LoRA was trained to answer to, when no other source states trigger words."""
    dataset_folders: tuple[str, ...] = ()
    """Names of the kohya dataset folders (``10_texas`` → "texas"), generic ones (``10_img``) left out."""
    caption_presence: dict[str, tuple[int, int, str]] = field(default_factory=dict)
    """Caption tag (lower case) → (captions holding it, captions, folder) in the folder where it is most consistent,
    for tags in at least half of that folder's captions (:func:`weights_index.kohya_captions.caption_presence`)."""
    tags: dict[str, int] = field(default_factory=dict)
    labels: tuple[str, ...] = ()
    base_model: str | None = None
    family_hint: str | None = None
    model_type: str | None = None
    network_module: str | None = None
    network_dim: int | None = None
    network_alpha: float | None = None
    preferred_weight: float | None = None
    negative_text: str | None = None
    notes: str | None = None
    category: str | None = None
    previews: tuple[str, ...] = ()
    hashes: dict[str, str] = field(default_factory=dict)
    source_url: str | None = None
    sources: tuple[str, ...] = ()
    warnings: tuple[str, ...] = ()

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict (tuples become lists); :meth:`from_json` inverts it."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> AdapterMetadata:
        """Rebuild from :meth:`to_json` output; unknown keys (from newer versions) are ignored."""
        known = cls.__dataclass_fields__
        values = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items() if k in known}
        presence = values.get("caption_presence")
        if isinstance(presence, dict):
            values["caption_presence"] = {
                str(tag): tuple(item) for tag, item in presence.items() if isinstance(item, (list, tuple))
            }
        return cls(**values)

    def presence(self, tag: str) -> CaptionPresence | None:
        """How consistently ``tag`` occurs in its dataset folder's captions (None: in fewer than half, or unknown)."""
        found = self.caption_presence.get(tag.strip().lower())
        return None if found is None else CaptionPresence(*found)


SIDECAR_SUFFIXES = tuple(p.format(stem="") for p in (CIVITAI_SIDECAR, A1111_SIDECAR, *PREVIEW_PATTERNS))
"""What follows the adapter's stem in the names of its sidecars and previews."""


def sidecar_names(stem: str) -> tuple[str, ...]:
    """File names next to an adapter whose changes change its metadata (sidecars and previews)."""
    return tuple(stem + suffix for suffix in SIDECAR_SUFFIXES)


def read_metadata(
    path: str | Path,
    header_metadata: Mapping[str, str],
    *,
    sha256: str | None = None,
    thumbnail_dir: str | Path | None = None,
) -> AdapterMetadata:
    """Merge the header's ``__metadata__`` with the sidecars next to ``path``.

    ``sha256`` (of the whole file) adds the ``sha256``/``AutoV2`` hashes and lets a Civitai sidecar that
    describes a different file be flagged. When ``thumbnail_dir`` is given, an embedded ModelSpec thumbnail
    is written there (content-addressed) and listed among the previews.

    Precedence: title = ModelSpec title, else the Civitai model name, else kohya's output name; the family
    hint trusts the header (ModelSpec, kohya) over sidecars; trigger words and labels are merged from every
    source (A1111's user-edited activation text first); preferred weight and notes come from A1111's file.
    """
    path = Path(path)
    warnings: list[str] = []
    civitai = _load_sidecar(path.with_name(CIVITAI_SIDECAR.format(stem=path.stem)), warnings)
    a1111 = _load_sidecar(path.with_name(A1111_SIDECAR.format(stem=path.stem)), warnings)
    header = dict(header_metadata)
    layers = [
        ("a1111", _from_a1111(a1111, warnings)),
        ("civitai", _from_civitai(civitai, warnings)),
        ("modelspec", _from_modelspec(header)),
        ("kohya", _from_kohya(header, warnings)),
    ]
    found = dict(layers)
    sources = tuple(name for name, fields in layers if fields)

    def first(key: str, order: Iterable[str]) -> Any:
        for name in order:
            value = found[name].get(key)
            if value not in (None, "", ()):
                return value
        return None

    title = first("title", ("modelspec", "civitai", "kohya"))
    description = first("description", ("modelspec", "civitai", "a1111"))
    labels = _unique(v for _, fields in layers for v in fields.get("labels", ()))
    triggers = _unique(v for _, fields in layers for v in fields.get("trigger_words", ()))
    base_model = first("base_model", ("civitai", "kohya", "modelspec", "a1111"))
    family_hint = first("family_hint", ("modelspec", "kohya", "civitai", "a1111"))
    hashes = {**found["modelspec"].get("hashes", {}), **found["kohya"].get("hashes", {})}
    if sha256:
        hashes = {"sha256": sha256, "AutoV2": autov2(sha256), **hashes}
        declared = found["civitai"].get("file_sha256")
        if declared and declared.lower() != sha256:
            warnings.append(f"{CIVITAI_SIDECAR.format(stem=path.stem)} describes a different file (sha256 differs)")
    previews = _previews(path)
    thumbnail = header.get("modelspec.thumbnail")
    if thumbnail and thumbnail_dir is not None:
        written = _write_thumbnail(thumbnail, Path(thumbnail_dir), warnings)
        if written is not None:
            previews = (*previews, str(written))
    tags = dict(first("tags", ("kohya",)) or {})
    return AdapterMetadata(
        title=title,
        description=description,
        author=first("author", ("modelspec", "civitai")),
        trigger_words=triggers,
        dataset_triggers=first("dataset_triggers", ("kohya",)) or (),
        dataset_folders=first("dataset_folders", ("kohya",)) or (),
        caption_presence=dict(first("caption_presence", ("kohya",)) or {}),
        tags=tags,
        labels=labels,
        base_model=base_model,
        family_hint=family_hint,
        model_type=first("model_type", ("civitai",)),
        network_module=first("network_module", ("kohya",)),
        network_dim=first("network_dim", ("kohya",)),
        network_alpha=first("network_alpha", ("kohya",)),
        preferred_weight=first("preferred_weight", ("a1111",)),
        negative_text=first("negative_text", ("a1111",)),
        notes=first("notes", ("a1111",)),
        category=_explicit_category(header) or infer_category(labels, title or path.stem, description),
        previews=previews,
        hashes=hashes,
        source_url=first("source_url", ("civitai",)),
        sources=sources,
        warnings=tuple(warnings),
    )


def infer_category(labels: Iterable[str], title: str | None, description: str | None = None) -> str | None:
    """The adapter's category: a curated label naming one wins, then category words in the title/description."""
    synonyms = {word: category for category, words in _CATEGORY_WORDS.items() for word in words}
    for label in labels:
        category = synonyms.get(label.strip().lower())
        if category:
            return category
    for text in (title, description):
        words = re.findall(r"[a-z]+", (text or "").lower())
        for word in words:
            if word in synonyms:
                return synonyms[word]
    return None


def _explicit_category(meta: Mapping[str, str]) -> str | None:
    """Our own ``category`` header key (written by our tools), when it names a known category."""
    value = meta.get("category", "").strip().lower()
    return value if value in CATEGORIES else None


def _from_kohya(meta: Mapping[str, str], warnings: list[str]) -> dict[str, Any]:
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
    return _unique(found)


def _from_modelspec(meta: Mapping[str, str]) -> dict[str, Any]:
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
    out["trigger_words"] = _split_words(meta.get("modelspec.trigger_phrase"))
    out["labels"] = _split_words(meta.get("modelspec.tags"))
    if meta.get("modelspec.hash_sha256"):
        out["hashes"] = {"modelspec.hash_sha256": meta["modelspec.hash_sha256"]}
    return {k: v for k, v in out.items() if v not in (None, (), "")}


def _from_civitai(info: Mapping[str, Any], warnings: list[str]) -> dict[str, Any]:
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
        out["trigger_words"] = tuple(w for item in words if isinstance(item, str) for w in _split_words(item))
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


def _from_a1111(settings: Mapping[str, Any], warnings: list[str]) -> dict[str, Any]:
    if not settings:
        return {}
    out: dict[str, Any] = {}
    out["trigger_words"] = _split_words(_as_str(settings.get("activation text")))
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


def _load_sidecar(path: Path, warnings: list[str]) -> dict[str, Any]:
    if path.is_symlink() or not path.is_file():  # a symlinked sidecar could point anywhere: not followed
        return {}
    try:
        size = path.stat().st_size
        if size > MAX_SIDECAR_BYTES:
            raise SidecarTooLargeError(
                f"sidecar {path.name} is {size} bytes, over the limit of {MAX_SIDECAR_BYTES}; it is not read",
                path=path,
                hint="shrink or remove the sidecar",
            )
        data = storable_json(json.loads(path.read_text(encoding="utf-8")))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        warnings.append(f"{path.name} is unreadable ({type(exc).__name__}); skipped")
        return {}
    except RecursionError:
        warnings.append(f"{path.name} is nested too deeply; skipped")
        return {}
    if not isinstance(data, dict):
        warnings.append(f"{path.name} is not a JSON object; skipped")
        return {}
    return data


def _previews(path: Path) -> tuple[str, ...]:
    candidates = (path.with_name(p.format(stem=path.stem)) for p in PREVIEW_PATTERNS)
    return tuple(str(c) for c in candidates if c.is_file() and not c.is_symlink())


def _write_thumbnail(uri: str, directory: Path, warnings: list[str]) -> Path | None:
    """Decode a ``data:image/...;base64,`` thumbnail and store it under its content hash."""
    head, _, payload = uri.partition(",")
    if not head.startswith("data:") or ";base64" not in head:
        warnings.append("modelspec.thumbnail is not a base64 data URI; skipped")
        return None
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        warnings.append("modelspec.thumbnail holds invalid base64; skipped")
        return None
    ext = _image_extension(data)
    if ext is None:
        warnings.append("modelspec.thumbnail is not a PNG, JPEG, GIF or WebP image; skipped")
        return None
    target = directory / f"{hashlib.sha256(data).hexdigest()[:24]}.{ext}"
    if not target.exists():
        directory.mkdir(parents=True, exist_ok=True)
        partial = target.with_suffix(".partial")
        partial.write_bytes(data)
        partial.replace(target)
    return target


def _image_extension(data: bytes) -> str | None:
    for magic, ext in _IMAGE_MAGIC:
        if data.startswith(magic):
            return ext
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    return None


def _split_words(text: str | None) -> tuple[str, ...]:
    """Comma-separated phrases → stripped, non-empty phrases."""
    if not text:
        return ()
    return tuple(p.strip() for p in text.split(",") if p.strip())


def _unique(values: Iterable[str]) -> tuple[str, ...]:
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
