"""The scan's per-file fault boundary: every bad file becomes a row with its typed error, never a failed scan."""

from __future__ import annotations

import json
import os
import struct
import threading
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file

from weights_index import library_walk, sidecars
from weights_index import scan as scan_module
from weights_index.catalog import Library

KEY = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k"


def write_good(path: Path, metadata: dict[str, str] | None = None, seed: int = 0) -> Path:
    """A tiny valid kohya LoRA."""
    gen = torch.Generator().manual_seed(seed)
    tensors = {
        f"{KEY}.lora_down.weight": torch.randn(2, 768, generator=gen),
        f"{KEY}.lora_up.weight": torch.randn(320, 2, generator=gen),
        f"{KEY}.alpha": torch.tensor(2.0),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata=metadata)
    return path


def write_raw(path: Path, header: bytes, data: bytes = b"") -> Path:
    """A file with a safetensors length prefix, ``header`` and ``data`` verbatim."""
    path.write_bytes(struct.pack("<Q", len(header)) + header + data)
    return path


def surrogate_json(value: object) -> bytes:
    """Valid UTF-8 JSON whose ``\\udc80`` escapes decode to lone surrogates."""
    return json.dumps(value).encode()


def scan_in_thread(library: Library, seconds: float = 60.0) -> scan_module.ScanReport:
    """Scan, failing the test (instead of hanging it) when the scan does not finish in time."""
    result: dict[str, object] = {}

    def run() -> None:
        try:
            result["report"] = library.scan()
        except BaseException as exc:  # re-raised in the test thread
            result["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), "the scan hung"
    if "error" in result:
        raise result["error"]  # type: ignore[misc]
    return result["report"]  # type: ignore[return-value]


@pytest.fixture
def bad_library(tmp_path: Path) -> Path:
    root = tmp_path / "lib"
    write_good(root / "good.safetensors", {"ss_output_name": "good one"})
    write_raw(root / "surrogate_meta.safetensors", surrogate_json({"__metadata__": {"ss_output_name": "a\udc80b"}}))
    write_raw(
        root / "dtype_list.safetensors",
        json.dumps({"t": {"dtype": ["F32"], "shape": [1], "data_offsets": [0, 4]}}).encode(),
        b"\0" * 4,
    )
    write_raw(root / "nested.safetensors", b"[" * 100_000 + b"]" * 100_000)
    os.symlink("loop.safetensors", root / "loop.safetensors")
    write_good(root / os.fsdecode(b"bad\xffname.safetensors"), seed=1)
    os.mkfifo(root / "pipe.safetensors")
    write_good(root / "side_surrogate.safetensors", seed=2)
    (root / "side_surrogate.json").write_bytes(surrogate_json({"activation text": "x\udc80y", "notes": "\ud800"}))
    write_good(root / "side_nested.safetensors", seed=3)
    (root / "side_nested.civitai.info").write_text('{"a":' + "[" * 100_000 + "]" * 100_000 + "}")
    return root


def test_every_bad_file_becomes_a_typed_row_and_the_good_ones_survive(bad_library: Path) -> None:
    library = Library(bad_library)
    report = scan_in_thread(library)
    by_relpath = {entry.relpath: entry for entry in library.entries()}
    assert by_relpath["good.safetensors"].ok
    assert by_relpath["good.safetensors"].title == "good one"
    for relpath in ("dtype_list.safetensors", "nested.safetensors"):
        assert by_relpath[relpath].error_type == "AdapterFormatError", relpath
    assert by_relpath["loop.safetensors"].error_type == "NonRegularFileError"
    assert "symlink" in (by_relpath["loop.safetensors"].error or "")
    assert by_relpath["pipe.safetensors"].error_type == "NonRegularFileError"
    assert "FIFO" in (by_relpath["pipe.safetensors"].error or "")
    odd = [entry for relpath, entry in by_relpath.items() if relpath.startswith("bad")]
    assert len(odd) == 1
    assert odd[0].error_type == "UnsafePathError"
    assert "UTF-8" in (odd[0].error or "")
    surrogate = by_relpath["surrogate_meta.safetensors"]  # safetensors' reader refuses a lone surrogate escape
    assert surrogate.error_type == "AdapterFormatError"
    assert "JSON" in (surrogate.error or "")
    assert surrogate.title == "surrogate_meta"
    side = by_relpath["side_surrogate.safetensors"]
    assert side.ok
    assert side.trigger_words == ("x?y",)
    nested_side = by_relpath["side_nested.safetensors"]
    assert nested_side.ok
    assert any("side_nested.civitai.info" in w for w in nested_side.metadata.warnings)
    assert len(report.broken) == 6
    json.dumps([entry.to_json() for entry in library.entries()])  # everything is JSON-ready text
    assert [hit.entry.relpath for hit in library.search("good")] == ["good.safetensors"]
    again = scan_in_thread(library)
    assert again.unchanged == len(by_relpath)
    assert not again.added
    assert not again.updated


def test_a_header_is_checked_before_the_file_is_hashed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = tmp_path / "lib"
    root.mkdir()
    write_raw(root / "huge_bad.safetensors", b"not json at all", b"\0" * 1024)
    hashed: list[str] = []
    real = scan_module.file_sha256
    monkeypatch.setattr(scan_module, "file_sha256", lambda path: hashed.append(str(path)) or real(path))
    library = Library(root)
    library.scan()
    assert hashed == []
    assert library.get("huge_bad").error_type == "AdapterFormatError"


def test_an_oversized_sidecar_is_refused_with_a_typed_error_without_reading_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = tmp_path / "lib"
    write_good(root / "big.safetensors")
    write_good(root / "fine.safetensors", seed=1)
    (root / "big.json").write_text(json.dumps({"notes": "n" * 5000}))
    (root / "fine.json").write_text(json.dumps({"notes": "short"}))
    monkeypatch.setattr(sidecars, "MAX_SIDECAR_BYTES", 4096)
    library = Library(root)
    library.scan()
    big = library.get("big")
    assert big.error_type == "SidecarTooLargeError"
    assert "big.json" in (big.error or "")
    assert "4096" in (big.error or "")
    assert library.get("fine").ok
    assert library.get("fine").metadata.notes == "short"


def test_a_file_deleted_mid_scan_is_dropped_or_recorded_never_raised(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = tmp_path / "lib"
    for name in ("a", "b", "c", "d"):
        write_good(root / f"{name}.safetensors", seed=ord(name))
    real_found, real_inspect = library_walk.found_file, scan_module.Scan.inspect

    def found_after_deleting_b(entry: os.DirEntry[str], *args: Any) -> library_walk.FoundFile:
        if entry.name == "b.safetensors":
            os.unlink(entry.path)
        return real_found(entry, *args)

    def inspect_after_deleting_d(self: scan_module.Scan, item: library_walk.FoundFile) -> scan_module.ScannedFile:
        if item.relpath == "d.safetensors":
            os.unlink(root / "d.safetensors")
        return real_inspect(self, item)

    monkeypatch.setattr(library_walk, "found_file", found_after_deleting_b)
    monkeypatch.setattr(scan_module.Scan, "inspect", inspect_after_deleting_d)
    library = Library(root)
    library.scan()
    monkeypatch.undo()
    relpaths = {entry.relpath: entry for entry in library.entries()}
    assert "b.safetensors" not in relpaths
    assert relpaths["a.safetensors"].ok
    assert relpaths["c.safetensors"].ok
    assert "d.safetensors" not in relpaths or relpaths["d.safetensors"].error_type == "AdapterFormatError"
    library.scan()
    assert {entry.relpath for entry in library.entries()} == {"a.safetensors", "c.safetensors"}


def test_a_scan_commits_in_batches(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = tmp_path / "lib"
    for i in range(7):
        write_good(root / f"f{i}.safetensors", seed=i)
    monkeypatch.setattr(scan_module, "SCAN_BATCH_FILES", 3)
    library = Library(root)
    real_inspect = scan_module.Scan.inspect
    seen: list[int] = []

    def inspect_and_look(self: scan_module.Scan, item: library_walk.FoundFile) -> scan_module.ScannedFile:
        seen.append(len(Library(root).entries()))  # what another process would see right now
        return real_inspect(self, item)

    monkeypatch.setattr(scan_module.Scan, "inspect", inspect_and_look)
    library.scan()
    assert seen == [0, 0, 0, 3, 3, 3, 6]
    assert {entry.name for entry in library.entries()} == {f"f{i}" for i in range(7)}
    assert not any(entry.name.startswith("//") for entry in library.entries())
