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

from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from weights_index.categories import CATEGORIES, explicit_category, infer_category
from weights_index.hashing import autov2
from weights_index.kohya_captions import CaptionPresence
from weights_index.metadata_sources import from_a1111, from_civitai, from_kohya, from_modelspec, unique
from weights_index.sidecars import (
    A1111_SIDECAR,
    CIVITAI_SIDECAR,
    MAX_SIDECAR_BYTES,
    SIDECAR_SUFFIXES,
    load_sidecar,
    preview_files,
    sidecar_names,
    write_thumbnail,
)

__all__ = [
    "CATEGORIES",
    "MAX_SIDECAR_BYTES",
    "SIDECAR_SUFFIXES",
    "AdapterMetadata",
    "infer_category",
    "read_metadata",
    "sidecar_names",
]


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
    civitai = load_sidecar(path.with_name(CIVITAI_SIDECAR.format(stem=path.stem)), warnings)
    a1111 = load_sidecar(path.with_name(A1111_SIDECAR.format(stem=path.stem)), warnings)
    header = dict(header_metadata)
    layers = [
        ("a1111", from_a1111(a1111, warnings)),
        ("civitai", from_civitai(civitai, warnings)),
        ("modelspec", from_modelspec(header)),
        ("kohya", from_kohya(header, warnings)),
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
    labels = unique(v for _, fields in layers for v in fields.get("labels", ()))
    triggers = unique(v for _, fields in layers for v in fields.get("trigger_words", ()))
    base_model = first("base_model", ("civitai", "kohya", "modelspec", "a1111"))
    family_hint = first("family_hint", ("modelspec", "kohya", "civitai", "a1111"))
    hashes = {**found["modelspec"].get("hashes", {}), **found["kohya"].get("hashes", {})}
    if sha256:
        hashes = {"sha256": sha256, "AutoV2": autov2(sha256), **hashes}
        declared = found["civitai"].get("file_sha256")
        if declared and declared.lower() != sha256:
            warnings.append(f"{CIVITAI_SIDECAR.format(stem=path.stem)} describes a different file (sha256 differs)")
    previews = preview_files(path)
    thumbnail = header.get("modelspec.thumbnail")
    if thumbnail and thumbnail_dir is not None:
        written = write_thumbnail(thumbnail, Path(thumbnail_dir), warnings)
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
        category=explicit_category(header) or infer_category(labels, title or path.stem, description),
        previews=previews,
        hashes=hashes,
        source_url=first("source_url", ("civitai",)),
        sources=sources,
        warnings=tuple(warnings),
    )
