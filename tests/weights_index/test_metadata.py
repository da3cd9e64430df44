"""Metadata merging per source: kohya ss_*, ModelSpec, .civitai.info, A1111 name.json, previews, hashes."""

from __future__ import annotations

import base64
import hashlib
import json
from pathlib import Path

import pytest

from weights_index.families import family_from_text
from weights_index.hashing import autov2, file_sha256
from weights_index.metadata import AdapterMetadata, infer_category, read_metadata, sidecar_names

PNG_1X1 = base64.b64decode(
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9awAAAABJRU5ErkJggg=="
)

KOHYA = {
    "ss_output_name": "corgi_astronaut_v2",
    "ss_base_model_version": "sd_v1",
    "ss_sd_model_name": "v1-5-pruned-emaonly.safetensors",
    "ss_network_module": "networks.lora",
    "ss_network_dim": "16",
    "ss_network_alpha": "8.0",
    "ss_tag_frequency": json.dumps(
        {
            "10_corgi": {"corgi": 40, " astronaut": 12, "space suit": 7},
            "5_reg": {"corgi": 5, "dog": 3},
        }
    ),
    "sshs_model_hash": "5f2a4d43c1e0e3ab53b1a3f2c4e7d8a9b0c1d2e3f4a5b6c7d8e9f0a1b2c3d4e5",
    "sshs_legacy_hash": "a1b2c3d4",
    "ss_training_comment": "trained on 45 images",
}

CIVITAI_INFO = {
    "id": 123456,
    "modelId": 98765,
    "name": "v2.0",
    "baseModel": "SDXL 1.0",
    "trainedWords": ["crgstr, corgi astronaut", "floating in space"],
    "description": "<p>Second version: <b>better</b> helmets &amp; suits.</p>",
    "model": {"name": "Corgi Astronaut", "type": "LORA", "nsfw": False, "tags": ["character", "dog", "space"]},
    "creator": {"username": "spacedog"},
    "files": [{"name": "corgi.safetensors", "primary": True, "hashes": {"AutoV2": "X", "SHA256": "0" * 64}}],
    "images": [{"url": "https://image.civitai.com/x.jpeg"}],
}

A1111 = {
    "description": "my corgi LoRA",
    "sd version": "SD1",
    "activation text": "crgstr, red helmet",
    "preferred weight": 0.7,
    "negative text": "blurry",
    "notes": "works best at 0.6-0.8",
}


def _adapter(tmp_path: Path, name: str = "corgi") -> Path:
    path = tmp_path / f"{name}.safetensors"
    path.write_bytes(b"not read by read_metadata")
    return path


def test_kohya_training_metadata(tmp_path: Path) -> None:
    meta = read_metadata(_adapter(tmp_path), KOHYA)
    assert meta.title == "corgi_astronaut_v2"
    assert meta.family_hint == "sd1"
    assert meta.base_model == "sd_v1"
    assert (meta.network_module, meta.network_dim, meta.network_alpha) == ("networks.lora", 16, 8.0)
    assert meta.tags == {"corgi": 45, "astronaut": 12, "space suit": 7, "dog": 3}
    assert next(iter(meta.tags)) == "corgi"
    assert meta.dataset_triggers == ("corgi",)  # "10_corgi" names a caption tag; "5_reg" does not
    assert meta.trigger_words == ()
    assert meta.hashes["sshs_model_hash"] == KOHYA["sshs_model_hash"]
    assert meta.sources == ("kohya",)


def test_kohya_dynamic_dim_and_bad_tag_frequency_are_tolerated(tmp_path: Path) -> None:
    meta = read_metadata(
        _adapter(tmp_path),
        {"ss_network_dim": "Dynamic", "ss_network_alpha": "Dynamic", "ss_tag_frequency": "{not json", "ss_v2": "True"},
    )
    assert meta.network_dim is None
    assert meta.network_alpha is None
    assert meta.tags == {}
    assert meta.family_hint == "sd2"
    assert any("ss_tag_frequency" in w for w in meta.warnings)


def test_modelspec_fields_and_thumbnail(tmp_path: Path) -> None:
    header = {
        "modelspec.sai_model_spec": "1.0.1",
        "modelspec.architecture": "stable-diffusion-xl-v1-base/lora",
        "modelspec.implementation": "https://github.com/Stability-AI/generative-models",
        "modelspec.title": "Watercolor Wash",
        "modelspec.author": "painter",
        "modelspec.description": "Soft watercolor style",
        "modelspec.trigger_phrase": "wtrclr, wet paper",
        "modelspec.tags": "style, painting",
        "modelspec.thumbnail": "data:image/png;base64," + base64.b64encode(PNG_1X1).decode(),
        "ss_output_name": "watercolor_v1",
    }
    thumbs = tmp_path / "thumbs"
    meta = read_metadata(_adapter(tmp_path), header, thumbnail_dir=thumbs)
    assert meta.title == "Watercolor Wash"  # an explicit title beats kohya's output name
    assert meta.family_hint == "sdxl"
    assert meta.trigger_words == ("wtrclr", "wet paper")
    assert meta.labels == ("style", "painting")
    assert meta.category == "style"
    assert meta.author == "painter"
    assert len(meta.previews) == 1
    written = Path(meta.previews[0])
    assert written.parent == thumbs
    assert written.suffix == ".png"
    assert written.read_bytes() == PNG_1X1
    assert written.stem == hashlib.sha256(PNG_1X1).hexdigest()[:24]


def test_kohya_default_title_and_non_image_thumbnail_are_ignored(tmp_path: Path) -> None:
    header = {
        "modelspec.title": "LoRA@1700000000.123",
        "ss_output_name": "ink",
        "modelspec.thumbnail": "data:image/png;base64," + base64.b64encode(b"<script>").decode(),
    }
    meta = read_metadata(_adapter(tmp_path), header, thumbnail_dir=tmp_path / "thumbs")
    assert meta.title == "ink"
    assert meta.previews == ()
    assert not (tmp_path / "thumbs").exists()
    assert any("thumbnail" in w for w in meta.warnings)


def test_civitai_sidecar(tmp_path: Path) -> None:
    path = _adapter(tmp_path)
    (tmp_path / "corgi.civitai.info").write_text(json.dumps(CIVITAI_INFO))
    meta = read_metadata(path, {}, sha256="ab" * 32)
    assert meta.title == "Corgi Astronaut"
    assert meta.trigger_words == ("crgstr", "corgi astronaut", "floating in space")
    assert meta.base_model == "SDXL 1.0"
    assert meta.family_hint == "sdxl"
    assert meta.model_type == "LORA"
    assert meta.labels == ("character", "dog", "space")
    assert meta.category == "character"
    assert meta.author == "spacedog"
    assert meta.description == "Second version: better helmets & suits."
    assert meta.source_url == "https://civitai.com/models/98765?modelVersionId=123456"
    assert any("different file" in w for w in meta.warnings)  # the sidecar's SHA256 is not this file's


def test_civitai_tag_objects_and_matching_hash(tmp_path: Path) -> None:
    path = _adapter(tmp_path)
    info = {**CIVITAI_INFO, "model": {"name": "Trench", "tags": [{"name": "clothing"}, {"name": "coat"}]}}
    sha = "cd" * 32
    info["files"] = [{"primary": True, "hashes": {"SHA256": sha.upper()}}]
    (tmp_path / "corgi.civitai.info").write_text(json.dumps(info))
    meta = read_metadata(path, {}, sha256=sha)
    assert meta.labels == ("clothing", "coat")
    assert meta.category == "clothing"
    assert meta.warnings == ()


def test_a1111_user_settings_win_for_triggers_and_weight(tmp_path: Path) -> None:
    path = _adapter(tmp_path)
    (tmp_path / "corgi.json").write_text(json.dumps(A1111))
    (tmp_path / "corgi.civitai.info").write_text(json.dumps(CIVITAI_INFO))
    meta = read_metadata(path, KOHYA)
    assert meta.trigger_words[:2] == ("crgstr", "red helmet")
    assert "floating in space" in meta.trigger_words
    assert meta.trigger_words.count("crgstr") == 1
    assert meta.preferred_weight == 0.7
    assert meta.negative_text == "blurry"
    assert meta.notes == "works best at 0.6-0.8"
    assert meta.family_hint == "sd1"  # the header (kohya) outranks sidecars for the base family
    assert set(meta.sources) == {"a1111", "civitai", "kohya"}


def test_a1111_zero_weight_means_default_and_broken_sidecar_is_skipped(tmp_path: Path) -> None:
    path = _adapter(tmp_path)
    (tmp_path / "corgi.json").write_text(json.dumps({"preferred weight": 0, "sd version": "Unknown"}))
    (tmp_path / "corgi.civitai.info").write_text("{truncated")
    meta = read_metadata(path, {})
    assert meta.preferred_weight is None
    assert meta.family_hint is None
    assert any("corgi.civitai.info" in w for w in meta.warnings)


def test_preview_files_in_preference_order(tmp_path: Path) -> None:
    path = _adapter(tmp_path)
    for name in ("corgi.png", "corgi.preview.jpeg", "corgi.webp", "other.png"):
        (tmp_path / name).write_bytes(PNG_1X1)
    meta = read_metadata(path, {})
    assert [Path(p).name for p in meta.previews] == ["corgi.preview.jpeg", "corgi.png", "corgi.webp"]


def test_hashes_sha256_and_autov2(tmp_path: Path) -> None:
    path = tmp_path / "f.safetensors"
    path.write_bytes(b"hello world")
    sha = file_sha256(path)
    assert sha == hashlib.sha256(b"hello world").hexdigest()
    assert autov2(sha) == sha[:10].upper()
    meta = read_metadata(path, {}, sha256=sha)
    assert meta.hashes["sha256"] == sha
    assert meta.hashes["AutoV2"] == "B94D27B993"


@pytest.mark.parametrize(
    ("text", "family"),
    [
        ("SD 1.5", "sd1"),
        ("sd_v1", "sd1"),
        ("stable-diffusion-v1/lora", "sd1"),
        ("SD 2.1 768", "sd2"),
        ("sd_v2", "sd2"),
        ("sdxl_base_v1-0", "sdxl"),
        ("Pony", "sdxl"),
        ("Illustrious", "sdxl"),
        ("flux-1-dev/lora", "flux"),
        ("Flux.1 Kontext", "flux"),
        ("SD 3.5", None),
        ("stable-diffusion-3-medium", None),
        ("", None),
    ],
)
def test_family_from_text(text: str, family: str | None) -> None:
    assert family_from_text(text) == family


def test_category_from_title_words_when_no_labels() -> None:
    assert infer_category([], "Ghibli Style") == "style"
    assert infer_category([], "Red Dress") == "clothing"
    assert infer_category(["misc", "objects"], "Anything") == "object"
    assert infer_category([], "ohwx", "a city scenery") == "background"
    assert infer_category([], "ohwx") is None


def test_explicit_category_key_wins(tmp_path: Path) -> None:
    meta = read_metadata(_adapter(tmp_path), {"category": "Background", "modelspec.tags": "style"})
    assert meta.category == "background"
    assert read_metadata(_adapter(tmp_path), {"category": "vibes", "modelspec.tags": "style"}).category == "style"


def test_metadata_json_round_trip(tmp_path: Path) -> None:
    (tmp_path / "corgi.civitai.info").write_text(json.dumps(CIVITAI_INFO))
    meta = read_metadata(_adapter(tmp_path), KOHYA, sha256="ab" * 32)
    again = AdapterMetadata.from_json(json.loads(json.dumps(meta.to_json())))
    assert again == meta


def test_sidecar_names_cover_sidecars_and_previews() -> None:
    names = sidecar_names("x")
    assert {"x.civitai.info", "x.json", "x.preview.png", "x.png", "x.jpg", "x.webp"} <= set(names)


@pytest.mark.parametrize(
    ("sidecar", "header", "warning"),
    [
        ("[1, 2]", {}, "corgi.json is not a JSON object; skipped"),
        (None, {"ss_tag_frequency": "[1, 2]"}, "ss_tag_frequency is not a JSON object; tags skipped"),
        (None, {"modelspec.thumbnail": "https://example.com/t.png"}, "not a base64 data URI"),
    ],
    ids=["sidecar-list", "tag-frequency-list", "thumbnail-url"],
)
def test_valid_json_of_the_wrong_shape_is_skipped_with_a_warning(
    tmp_path: Path, sidecar: str | None, header: dict[str, str], warning: str
) -> None:
    path = _adapter(tmp_path)
    if sidecar is not None:
        path.with_name("corgi.json").write_text(sidecar)
    meta = read_metadata(path, header, thumbnail_dir=tmp_path / "thumbs")
    assert any(warning in w for w in meta.warnings), meta.warnings
    assert meta.previews == ()
    assert not meta.tags
