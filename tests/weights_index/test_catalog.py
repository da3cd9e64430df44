"""The SQLite library catalog: incremental, atomic scans; renames, deletes, broken and unsafe files; FTS search."""

from __future__ import annotations

import base64
import io
import json
import os
import sqlite3
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path

import format_writers
import pytest
import safetensors
import torch
from safetensors.torch import save_file

from fusion.errors import ComposerError, UnsafePathError
from weights_index import catalog as catalog_module
from weights_index import reader, safetensors_file
from weights_index.catalog import Library, UnknownAdapterError
from weights_index.hashing import file_sha256

REPO = Path(__file__).resolve().parents[2]
CROSS_K = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k"
SELF_Q = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
TE2_Q = "lora_te2_text_model_encoder_layers_0_self_attn_q_proj"
PNG_1X1 = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9awAAAABJRU5ErkJggg=="


def write_kohya(
    path: Path, *, family: str = "sd1", rank: int = 1, metadata: dict[str, str] | None = None, seed: int = 0
) -> Path:
    """A tiny kohya-format LoRA (sd1: one cross-attention key projection; sdxl: plus a second text encoder)."""
    generator = torch.Generator().manual_seed(seed)
    modules = {CROSS_K: (768 if family == "sd1" else 2048, 320)}
    if family == "sdxl":
        modules[TE2_Q] = (1280, 1280)
    tensors = {}
    for key, (fan_in, fan_out) in modules.items():
        tensors[f"{key}.lora_down.weight"] = torch.randn(rank, fan_in, generator=generator).half()
        tensors[f"{key}.lora_up.weight"] = torch.randn(fan_out, rank, generator=generator).half()
        tensors[f"{key}.alpha"] = torch.tensor(float(rank)).half()
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata=metadata)
    return path


def names(library: Library) -> set[str]:
    return {entry.name for entry in library.entries()}


@pytest.fixture
def library_dir(tmp_path: Path) -> Path:
    root = tmp_path / "loras"
    write_kohya(
        root / "corgi.safetensors",
        rank=4,
        metadata={
            "ss_output_name": "corgi_astronaut",
            "ss_base_model_version": "sd_v1",
            "ss_tag_frequency": json.dumps({"10_corgi": {"corgi": 30, "helmet": 4}}),
        },
    )
    write_kohya(root / "styles" / "ink.safetensors", rank=8, metadata={"modelspec.trigger_phrase": "inkwash"})
    write_kohya(root / "xl" / "robot.safetensors", family="sdxl", rank=2)
    return root


def test_scan_catalogs_files_with_header_facts_and_metadata(library_dir: Path) -> None:
    (library_dir / "corgi.civitai.info").write_text(
        json.dumps({"trainedWords": ["crgstr"], "model": {"name": "Corgi Astronaut", "tags": ["character"]}})
    )
    library = Library(library_dir)
    report = library.scan()
    assert sorted(report.added) == ["corgi.safetensors", "styles/ink.safetensors", "xl/robot.safetensors"]
    assert report.unchanged == 0
    assert report.broken == ()
    corgi = library.get("corgi")
    assert (corgi.family, corgi.format, corgi.rank, corgi.num_layers) == ("sd1", "kohya", 4, 1)
    assert corgi.title == "Corgi Astronaut"
    assert corgi.trigger_words == ("crgstr",)
    assert corgi.metadata.tags == {"corgi": 30, "helmet": 4}
    assert corgi.metadata.category == "character"
    assert corgi.sha256 == file_sha256(library_dir / "corgi.safetensors")
    assert corgi.file_size == (library_dir / "corgi.safetensors").stat().st_size
    robot = library.get("robot")
    assert robot.family == "sdxl"
    assert robot.has_text_encoder
    assert [e.name for e in library.entries(family="sdxl")] == ["robot"]
    assert library.db_path == library_dir / ".lora-composer" / "catalog.sqlite"


def _count_calls(monkeypatch: pytest.MonkeyPatch, root: Path) -> dict[str, int]:
    """Count every way a scan could read an adapter file: open(), hashing, probing, metadata, safetensors."""
    counts = {"open": 0, "sha256": 0, "probe": 0, "metadata": 0, "safe_open": 0}
    real_open = io.open

    def counting_open(file: object, *args: object, **kwargs: object) -> object:
        if (
            isinstance(file, (str, os.PathLike))
            and str(file).startswith(str(root))
            and ".lora-composer" not in str(file)
        ):
            counts["open"] += 1
        return real_open(file, *args, **kwargs)

    def counted(key: str, function: Callable[..., object]) -> Callable[..., object]:
        def wrapper(*args: object, **kwargs: object) -> object:
            counts[key] += 1
            return function(*args, **kwargs)

        return wrapper

    monkeypatch.setattr(io, "open", counting_open)
    monkeypatch.setattr("builtins.open", counting_open)
    monkeypatch.setattr(catalog_module, "file_sha256", counted("sha256", catalog_module.file_sha256))
    monkeypatch.setattr(reader, "probe", counted("probe", reader.probe))
    monkeypatch.setattr(catalog_module, "read_metadata", counted("metadata", catalog_module.read_metadata))
    monkeypatch.setattr(safetensors, "safe_open", counted("safe_open", safetensors.safe_open))
    monkeypatch.setattr(safetensors_file, "safe_open", counted("safe_open", safetensors_file.safe_open))
    return counts


def test_rescan_of_500_unchanged_files_reads_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = tmp_path / "many"
    template = write_kohya(tmp_path / "template.safetensors")
    data = template.read_bytes()
    for i in range(500):
        folder = root / f"set{i % 10}"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"lora_{i:03d}.safetensors").write_bytes(data[:-2] + i.to_bytes(2, "little"))
    library = Library(root)
    counts = _count_calls(monkeypatch, root.resolve())
    first = library.scan()
    assert len(first.added) == 500
    assert first.broken == ()
    assert counts["sha256"] == 500
    assert counts["probe"] == 500
    counts.update(dict.fromkeys(counts, 0))
    for _ in range(3):
        again = library.scan()
        assert again.unchanged == 500
        assert not (again.added)
        assert not (again.updated)
        assert not (again.removed)
        assert not (again.renamed)
    assert counts == {"open": 0, "sha256": 0, "probe": 0, "metadata": 0, "safe_open": 0}


def test_rename_keeps_the_row_id_and_scores(library_dir: Path) -> None:
    library = Library(library_dir)
    library.scan()
    before = library.get("ink")
    library.update_scores("ink", {"high_frequency": 0.42})
    library.set_vector_id("ink", 7)
    os.rename(library_dir / "styles" / "ink.safetensors", library_dir / "ink_v2.safetensors")
    report = library.scan()
    assert report.renamed == (("styles/ink.safetensors", "ink_v2.safetensors"),)
    assert report.added == ()
    assert report.removed == ()
    after = library.get("ink_v2")
    assert after.id == before.id
    assert after.scores == {"high_frequency": 0.42}
    assert after.vector_id == 7
    assert "ink" not in names(library)


def test_changed_content_updates_in_place_and_clears_scores(library_dir: Path) -> None:
    library = Library(library_dir)
    library.scan()
    before = library.get("corgi")
    library.update_scores("corgi", {"high_frequency": 0.1})
    write_kohya(library_dir / "corgi.safetensors", rank=16, seed=3)
    report = library.scan()
    assert report.updated == ("corgi.safetensors",)
    after = library.get("corgi")
    assert after.id == before.id
    assert after.rank == 16
    assert after.sha256 != before.sha256
    assert after.scores == {}
    assert after.title == "corgi"


def test_delete_removes_the_row_and_its_search_text(library_dir: Path) -> None:
    library = Library(library_dir)
    library.scan()
    assert [hit.entry.name for hit in library.search("inkwash")] == ["ink"]
    (library_dir / "styles" / "ink.safetensors").unlink()
    report = library.scan()
    assert report.removed == ("styles/ink.safetensors",)
    assert names(library) == {"corgi", "robot"}
    assert library.search("inkwash") == []


def test_broken_files_are_recorded_and_the_scan_goes_on(library_dir: Path) -> None:
    good = (library_dir / "corgi.safetensors").read_bytes()
    (library_dir / "truncated.safetensors").write_bytes(good[: len(good) // 2])
    (library_dir / "garbage.safetensors").write_bytes(b"\x00" * 3)
    save_file({"some.random.weight": torch.zeros(2, 2)}, str(library_dir / "unknown_layout.safetensors"))
    library = Library(library_dir)
    report = library.scan()
    broken = dict(report.broken)
    assert set(broken) == {"truncated.safetensors", "garbage.safetensors", "unknown_layout.safetensors"}
    assert "truncated" in broken["truncated.safetensors"]
    assert library.get("unknown_layout").error_type == "UnknownLayoutError"
    assert library.get("garbage").error_type == "AdapterFormatError"
    assert {"corgi", "ink", "robot"} <= names(library)
    assert library.get("corgi").ok


def test_symlink_leaving_the_library_is_refused_and_never_opened(
    library_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    outside = write_kohya(tmp_path / "elsewhere" / "secret.safetensors")
    (library_dir / "escape.safetensors").symlink_to(outside)
    (library_dir / "alias.safetensors").symlink_to(library_dir / "styles" / "ink.safetensors")
    library = Library(library_dir)
    counts = _count_calls(monkeypatch, outside.parent)
    library.scan()
    assert counts["open"] == 0
    escape = library.get("escape")
    assert escape.error_type == "UnsafePathError"
    assert "outside the library" in (escape.error or "")
    assert escape.sha256 is None
    with pytest.raises(UnsafePathError):
        library.resolve("escape")
    alias = library.get("alias")
    assert alias.ok
    assert alias.rank == 8
    assert library.resolve("alias") == (library_dir / "styles" / "ink.safetensors").resolve()


def test_pickle_files_are_recorded_with_the_refusal_and_never_opened(
    library_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (library_dir / "old.ckpt").write_bytes(b"\x80\x04 pickled")
    (library_dir / "weights.pt").write_bytes(b"\x80\x04 pickled")
    library = Library(library_dir)
    counts = _count_calls(monkeypatch, library_dir.resolve())
    library.scan()
    assert counts["sha256"] == 3  # the three safetensors files only
    for name in ("old", "weights"):
        entry = library.get(name)
        assert entry.error_type == "UnsafeFormatError"
        assert "convert it to safetensors" in (entry.error or "")


def test_new_sidecar_refreshes_metadata_of_an_unchanged_file(library_dir: Path) -> None:
    library = Library(library_dir)
    library.scan()
    assert library.search("crgstr") == []
    (library_dir / "corgi.json").write_text(json.dumps({"activation text": "crgstr", "preferred weight": 0.6}))
    report = library.scan()
    assert report.updated == ("corgi.safetensors",)
    corgi = library.get("corgi")
    assert corgi.trigger_words == ("crgstr",)
    assert corgi.metadata.preferred_weight == 0.6
    assert [hit.entry.name for hit in library.search("crgstr")] == ["corgi"]


def test_search_ranks_trigger_words_above_description_mentions(library_dir: Path) -> None:
    write_kohya(
        library_dir / "mentions.safetensors",
        metadata={"modelspec.description": "Pairs well with an inkwash LoRA; adds paper grain and paper texture"},
    )
    library = Library(library_dir)
    library.scan()
    hits = library.search("inkwash portrait")
    assert [h.entry.name for h in hits] == ["ink", "mentions"]
    assert hits[0].score > hits[1].score > 0
    assert {h.entry.name for h in library.search("a corgi, in inkwash")} == {"ink", "mentions", "corgi"}
    assert library.search("   ,,, ") == []
    assert [h.entry.name for h in library.search("paper", limit=1)] == ["mentions"]


def test_search_leaves_broken_entries_out_unless_asked(library_dir: Path) -> None:
    (library_dir / "inkwash_old.ckpt").write_bytes(b"\x80\x04 pickled")
    (library_dir / "inkwash_old.civitai.info").write_text(json.dumps({"trainedWords": ["inkwash"]}))
    library = Library(library_dir)
    library.scan()
    assert [hit.entry.name for hit in library.search("inkwash")] == ["ink"]
    assert {hit.entry.name for hit in library.search("inkwash", include_broken=True)} == {"ink", "inkwash_old"}


def test_huge_header_values_are_parsed_but_not_stored_raw(tmp_path: Path) -> None:
    tags = {f"tag_{i}": i for i in range(2000)}
    write_kohya(tmp_path / "lib" / "big.safetensors", metadata={"ss_tag_frequency": json.dumps({"1_x": tags})})
    library = Library(tmp_path / "lib")
    library.scan()
    entry = library.get("big")
    assert entry.header_metadata["ss_tag_frequency"].endswith("characters, not stored>")
    assert len(entry.metadata.tags) == 500
    assert next(iter(entry.metadata.tags)) == "tag_1999"


def test_get_by_id_name_relpath_and_title(library_dir: Path) -> None:
    library = Library(library_dir)
    library.scan()
    corgi = library.get("corgi")
    assert library.get(corgi.id) == corgi
    assert library.get(str(corgi.id)) == corgi
    assert library.get("CORGI") == corgi
    assert library.get("corgi_astronaut") == corgi
    assert library.get("styles/ink.safetensors").name == "ink"
    with pytest.raises(UnknownAdapterError, match="corgo") as excinfo:
        library.get("corgo")
    assert "corgi" in str(excinfo.value)


def test_duplicate_stems_are_disambiguated_by_relative_path(library_dir: Path) -> None:
    write_kohya(library_dir / "more" / "ink.safetensors", seed=5)
    library = Library(library_dir)
    library.scan()
    assert names(library) == {"corgi", "styles/ink", "more/ink", "robot"}
    (library_dir / "more" / "ink.safetensors").unlink()
    library.scan()
    assert names(library) == {"corgi", "ink", "robot"}
    assert [hit.entry.name for hit in library.search("inkwash")] == ["ink"]


def test_embedded_thumbnail_becomes_the_preview(tmp_path: Path) -> None:
    png = base64.b64decode(PNG_1X1)
    root = tmp_path / "lib"
    write_kohya(root / "t.safetensors", metadata={"modelspec.thumbnail": "data:image/png;base64," + PNG_1X1})
    library = Library(root)
    library.scan()
    entry = library.get("t")
    assert entry.preview is not None
    assert entry.preview.read_bytes() == png
    assert entry.preview.parent == root.resolve() / ".lora-composer" / "previews"
    assert entry.header_metadata["modelspec.thumbnail"] == "<embedded image>"


def test_read_loads_the_adapter_through_the_reader(library_dir: Path) -> None:
    library = Library(library_dir)
    library.scan()
    adapter = library.read("corgi")
    assert adapter.name == "corgi"
    assert adapter.family == "sd1"
    (layer,) = adapter.layers.values()
    assert layer.rank == 4


def test_every_producer_format_is_catalogued_and_read(tmp_path: Path) -> None:
    shapes = {
        "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k": (320, 768),
        "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q": (320, 320),
    }
    root = tmp_path / "formats"
    root.mkdir()
    format_writers.write_kohya(root / "k.safetensors", shapes, rank=4)
    format_writers.write_diffusers(root / "d.safetensors", shapes, rank=2)
    format_writers.write_loha(root / "h.safetensors", shapes, rank=2)
    format_writers.write_shira(root / "s.safetensors", shapes, family="sd1")
    library = Library(root)
    assert library.scan().broken == ()
    formats = {entry.name: entry.format for entry in library.entries()}
    assert formats == {"k": "kohya", "d": "diffusers", "h": "lycoris-loha", "s": "shira"}
    for entry in library.entries():
        assert entry.family == "sd1"
        assert sorted(library.read(entry.name).layers) == sorted(shapes)


def test_a_numeric_file_name_wins_over_an_equal_id(tmp_path: Path) -> None:
    root = tmp_path / "numeric"
    write_kohya(root / "a.safetensors")
    write_kohya(root / "1.safetensors", seed=1)
    write_kohya(root / "2.safetensors", seed=2)
    library = Library(root)
    library.scan()
    ids = {entry.name: entry.id for entry in library.entries()}
    assert library.get("1").name == "1"
    assert library.get(ids["1"]).name == "1"
    assert library.get(ids["a"]).name == "a"


def test_missing_folder_and_corrupt_database_raise_typed_errors(tmp_path: Path) -> None:
    with pytest.raises(ComposerError, match="does not exist"):
        Library(tmp_path / "nope")
    (tmp_path / "lib").mkdir()
    bad_db = tmp_path / "bad.sqlite"
    bad_db.write_bytes(b"this is not a database" * 100)
    with pytest.raises(ComposerError, match="delete it"):
        Library(tmp_path / "lib", db_path=bad_db)


_KILL_SCRIPT = textwrap.dedent(
    """
    import sys, time
    from weights_index import catalog

    mode, root = sys.argv[1], sys.argv[2]
    if mode == "hook":
        original = catalog.Library._write
        written = []

        def slow_write(self, *args, **kwargs):
            written.append(1)
            if len(written) == 100:
                print("WRITING", flush=True)
                time.sleep(120)
            return original(self, *args, **kwargs)

        catalog.Library._write = slow_write
    library = catalog.Library(root)
    print("SCANNING", flush=True)
    library.scan()
    print("DONE", flush=True)
    """
)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["hook", "timed"])
def test_sigkill_mid_scan_keeps_a_consistent_catalog_with_the_batches_written(tmp_path: Path, mode: str) -> None:
    root = tmp_path / "big"
    template = write_kohya(tmp_path / "template.safetensors").read_bytes()
    for i in range(20):
        (root / "a").mkdir(parents=True, exist_ok=True)
        (root / "a" / f"first_{i:02d}.safetensors").write_bytes(template[:-2] + i.to_bytes(2, "little"))
    Library(root).scan()
    before = names(Library(root))
    for i in range(1500):
        (root / "b").mkdir(parents=True, exist_ok=True)
        (root / "b" / f"second_{i:04d}.safetensors").write_bytes(template[:-2] + (i + 100).to_bytes(2, "little"))
    (root / "a" / "first_00.safetensors").unlink()
    script = tmp_path / "scan.py"
    script.write_text(_KILL_SCRIPT)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(
        [sys.executable, str(script), mode, str(root)], stdout=subprocess.PIPE, text=True, cwd=REPO, env=env
    )
    try:
        assert proc.stdout is not None
        wanted = "WRITING" if mode == "hook" else "SCANNING"
        line = ""
        while line.strip() != wanted:
            line = proc.stdout.readline()
            assert line, "scan subprocess ended early"
        if mode == "timed":
            time.sleep(0.3)
    finally:
        proc.kill()
        proc.wait()
    db = sqlite3.connect(root / ".lora-composer" / "catalog.sqlite")
    assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    db.close()
    after = names(Library(root))
    second = {f"second_{i:04d}" for i in range(1500)}
    complete = (before - {"first_00"}) | second
    assert before - {"first_00"} <= after <= before | second
    if mode == "hook":  # killed while writing the second batch: the first is kept, the second is not
        assert len(after & second) == catalog_module.SCAN_BATCH_FILES
    library = Library(root)
    report = library.scan()
    assert names(library) == complete
    assert report.broken == ()


def test_read_carries_catalog_knowledge_into_adapter_meta(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    folder = tmp_path / "lib"
    folder.mkdir()
    tensors = {
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight": torch.randn(2, 32),
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_up.weight": torch.randn(32, 2),
    }
    save_file(tensors, str(folder / "misty_bg.safetensors"), metadata={"ss_output_name": "misty_bg"})
    (folder / "misty_bg.json").write_text(
        json.dumps({"activation text": "mistybg", "preferred weight": 0.6, "notes": "a background"})
    )
    (folder / "misty_bg.civitai.info").write_text(json.dumps({"model": {"name": "Misty", "tags": ["background"]}}))
    library = Library(folder)
    library.scan()
    library.update_scores("misty_bg", {"delta_h": -0.25})
    meta = library.read("misty_bg").meta
    assert meta["category"] == "background"
    assert meta["scores"] == {"delta_h": -0.25}
    assert meta["trigger_words"] == ["mistybg"]
    assert meta["preferred_weight"] == 0.6
