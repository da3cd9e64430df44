"""Malformed files raise one typed error naming the file, before any tensor is handed out."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from fusion.errors import AdapterFormatError, NonFiniteTensorError, UnsafeFormatError
from weights_index.reader import probe, read_adapter
from weights_index.safetensors_file import all_finite, load_tensors, read_header

KEY = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"


def _good(path: Path, value: float = 0.1) -> Path:
    tensors = {f"{KEY}.lora_down.weight": torch.full((2, 8), value), f"{KEY}.lora_up.weight": torch.full((8, 2), 0.1)}
    save_file(tensors, str(path))
    return path


def test_truncated_file(tmp_path: Path) -> None:
    path = _good(tmp_path / "t.safetensors")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 20])
    for call in (probe, read_adapter):
        with pytest.raises(AdapterFormatError, match=r"t\.safetensors.*truncated"):
            call(path)


def test_header_longer_than_file(tmp_path: Path) -> None:
    path = tmp_path / "h.safetensors"
    path.write_bytes(struct.pack("<Q", 5000) + b"{}")
    with pytest.raises(AdapterFormatError, match=r"h\.safetensors.*truncated"):
        probe(path)


def test_absurd_header_size(tmp_path: Path) -> None:
    path = tmp_path / "a.safetensors"
    path.write_bytes(struct.pack("<Q", 2**62) + b"{}")
    with pytest.raises(AdapterFormatError, match=r"a\.safetensors.*corrupt"):
        read_adapter(path)


def test_bad_json_and_tiny_file(tmp_path: Path) -> None:
    path = tmp_path / "j.safetensors"
    path.write_bytes(struct.pack("<Q", 3) + b"{x}")
    with pytest.raises(AdapterFormatError, match="JSON"):
        read_header(path)
    (tmp_path / "s.safetensors").write_bytes(b"abc")
    with pytest.raises(AdapterFormatError, match="too short"):
        probe(tmp_path / "s.safetensors")


def test_offsets_outside_data(tmp_path: Path) -> None:
    header = json.dumps({"x.lora_A.weight": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}).encode()
    path = tmp_path / "o.safetensors"
    path.write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 8)
    with pytest.raises(AdapterFormatError, match="truncated"):
        read_header(path)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_refused_unless_allowed(tmp_path: Path, bad: float) -> None:
    path = _good(tmp_path / "n.safetensors", value=bad)
    with pytest.raises(NonFiniteTensorError, match=r"n\.safetensors"):
        read_adapter(path)
    adapter = read_adapter(path, allow_non_finite=True)
    assert not bool(torch.isfinite(next(iter(adapter.layers.values())).down).all())
    assert probe(path).num_layers == 1


@pytest.mark.parametrize("suffix", [".ckpt", ".pt", ".bin", ".pth"])
def test_pickle_files_refused_with_conversion_hint(tmp_path: Path, suffix: str) -> None:
    path = tmp_path / f"model{suffix}"
    path.write_bytes(b"\x80\x04not really a pickle")
    for call in (probe, read_adapter):
        with pytest.raises(UnsafeFormatError, match=r"model\..*safetensors") as info:
            call(path)
        assert "save_file" in str(info.value)


def test_load_tensors_subset(tmp_path: Path) -> None:
    path = _good(tmp_path / "g.safetensors")
    assert set(load_tensors(path, [f"{KEY}.lora_up.weight"])) == {f"{KEY}.lora_up.weight"}
    with pytest.raises(AdapterFormatError, match="not in file"):
        load_tensors(path, ["missing"])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.float8_e4m3fn])
def test_all_finite_finds_any_nan_or_inf_and_survives_overflowing_sums(dtype: torch.dtype) -> None:
    clean = torch.linspace(-2, 2, 257).to(dtype)
    assert all_finite(clean)
    assert all_finite(clean[:0])
    for bad in (float("nan"), float("inf"), float("-inf")):
        broken = clean.float().clone()
        broken[131] = bad
        broken = broken.to(dtype)
        if bool(torch.isfinite(broken.float()[131])):  # float8 e4m3 has no infinity: it saturates
            continue
        assert not all_finite(broken)
    huge = torch.full((64,), torch.finfo(dtype).max, dtype=torch.float64).to(dtype)
    assert all_finite(huge)


def _raw(path: Path, header: bytes, data: bytes = b"") -> Path:
    path.write_bytes(struct.pack("<Q", len(header)) + header + data)
    return path


def _entry(dtype: object = "F32", shape: object = (4,), offsets: object = (0, 16)) -> dict[str, object]:
    return {"dtype": dtype, "shape": list(shape) if isinstance(shape, tuple) else shape, "data_offsets": offsets}


MALFORMED_HEADERS = {
    "not UTF-8": (b'{"\xff": 1}', b""),
    "not an object": (b"[]", b""),
    "nested too deeply": (b"[" * 100_000 + b"]" * 100_000, b""),
    "metadata a list": (json.dumps({"__metadata__": [1]}).encode(), b""),
    "unknown dtype": (json.dumps({"x": _entry(dtype="F33")}).encode(), b"\0" * 16),
    "negative dimension": (json.dumps({"x": _entry(shape=[-4])}).encode(), b"\0" * 16),
    "entry not an object": (json.dumps({"x": 7}).encode(), b""),
    "no offsets": (json.dumps({"x": {"dtype": "F32", "shape": [4]}}).encode(), b"\0" * 16),
    "byte length not the shape's": (json.dumps({"x": _entry(shape=[5])}).encode(), b"\0" * 16),
    "offsets reversed": (json.dumps({"x": _entry(offsets=[16, 0])}).encode(), b"\0" * 16),
}


@pytest.mark.parametrize("case", sorted(MALFORMED_HEADERS))
def test_malformed_headers_raise_the_typed_error_naming_the_file(tmp_path: Path, case: str) -> None:
    header, data = MALFORMED_HEADERS[case]
    path = _raw(tmp_path / "m.safetensors", header, data)
    for call in (read_header, probe, read_adapter):
        with pytest.raises(AdapterFormatError, match=r"m\.safetensors"):
            call(path)


def test_a_header_names_every_tensor_with_its_dtype_and_shape_and_the_metadata(tmp_path: Path) -> None:
    path = tmp_path / "h.safetensors"
    save_file(
        {"a": torch.zeros(2, 3, dtype=torch.float16), "b": torch.zeros(5, dtype=torch.int64)},
        str(path),
        metadata={"title": "héllo"},
    )
    header = read_header(path)
    assert {name: (info.dtype, info.shape) for name, info in header.tensors.items()} == {
        "a": ("F16", (2, 3)),
        "b": ("I64", (5,)),
    }
    assert header.metadata == {"title": "héllo"}
    assert header.file_size == path.stat().st_size
    assert header.shape("a") == (2, 3)


def test_a_missing_file_is_a_typed_error(tmp_path: Path) -> None:
    with pytest.raises(AdapterFormatError, match="cannot read"):
        read_header(tmp_path / "gone.safetensors")


def test_bytes_no_tensor_covers_are_refused(tmp_path: Path) -> None:
    good = _good(tmp_path / "g.safetensors").read_bytes()
    (tmp_path / "tail.safetensors").write_bytes(good + b"\0" * 8)
    with pytest.raises(AdapterFormatError, match=r"tail\.safetensors.*truncated or corrupt"):
        probe(tmp_path / "tail.safetensors")
    gap = json.dumps({"x": {"dtype": "F32", "shape": [4], "data_offsets": [16, 32]}}).encode()
    with pytest.raises(AdapterFormatError, match=r"gap\.safetensors"):
        read_header(_raw(tmp_path / "gap.safetensors", gap, b"\0" * 32))


def test_probing_a_file_imports_no_torch(tmp_path: Path) -> None:
    path = _good(tmp_path / "p.safetensors")
    code = "import sys; from weights_index.reader import probe; probe(sys.argv[1]); print('torch' in sys.modules)"
    done = subprocess.run(
        [sys.executable, "-c", code, str(path)],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])},
        timeout=120,
        check=True,
    )
    assert done.stdout.strip() == "False"
