"""Safe, validated access to safetensors files: header-only inspection and on-demand tensor loading.

Everything in the library reads files through here, so every malformed case (truncated file, header
longer than the file, absurd header size, bad JSON, offsets out of range, NaN/Inf tensors, pickle files)
raises one typed error that names the file and the fix, before any tensor is handed out. Header reading is pure
Python; torch is imported only when tensors are checked or loaded.
"""

from __future__ import annotations

import json
import math
import os
import stat
import struct
import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from safetensors import safe_open

from fusion.errors import AdapterFormatError, NonFiniteTensorError, NonRegularFileError, UnsafeFormatError
from weights_index.text_safety import storable_text

if TYPE_CHECKING:
    import torch

PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin", ".pkl")
MAX_HEADER_BYTES = 100 * 1024 * 1024
"""The safetensors reference rejects headers above 100 MB; so do we."""

DTYPE_BYTES = {
    "F64": 8,
    "F32": 4,
    "F16": 2,
    "BF16": 2,
    "I64": 8,
    "I32": 4,
    "I16": 2,
    "I8": 1,
    "U8": 1,
    "BOOL": 1,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
    "U16": 2,
    "U32": 4,
    "U64": 8,
}

CONVERT_HINT = (
    "convert it to safetensors on a machine you trust, e.g. "
    'python -c "import torch, safetensors.torch as s; '
    "s.save_file({k: v.contiguous() for k, v in torch.load('IN', weights_only=True).items()}, 'OUT.safetensors')\""
)


@dataclass(frozen=True)
class TensorInfo:
    """A tensor's entry in a safetensors header."""

    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int


@dataclass(frozen=True)
class SafetensorsHeader:
    """The parsed, validated header of a safetensors file: string metadata and tensor entries."""

    path: Path
    file_size: int
    metadata: dict[str, str]
    tensors: dict[str, TensorInfo]

    def shape(self, name: str) -> tuple[int, ...]:
        """Shape of tensor ``name``."""
        return self.tensors[name].shape


def refuse_pickle(path: Path) -> None:
    """Raise :class:`UnsafeFormatError` for pickle-based checkpoint suffixes."""
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise UnsafeFormatError(
            f"{path.suffix} files are Python pickles, which can run code when loaded; only safetensors is read",
            path=path,
            hint=CONVERT_HINT,
        )


def refuse_non_regular(path: Path, info: os.stat_result) -> None:
    """Raise :class:`NonRegularFileError` unless ``info`` (a followed stat) is a regular file: opening a FIFO
    blocks forever and a device or socket is never an adapter."""
    if stat.S_ISREG(info.st_mode):
        return
    kind = (
        "a FIFO"
        if stat.S_ISFIFO(info.st_mode)
        else "a socket"
        if stat.S_ISSOCK(info.st_mode)
        else "a folder"
        if stat.S_ISDIR(info.st_mode)
        else "a device or special file"
    )
    raise NonRegularFileError(f"not a regular file ({kind}); it is not opened", path=path, hint="remove it")


def read_header(path: str | Path) -> SafetensorsHeader:
    """Read and validate only the header of ``path`` (no tensor data is touched)."""
    path = Path(path)
    refuse_pickle(path)
    try:
        info = path.stat()
        refuse_non_regular(path, info)
        file_size = info.st_size
        with path.open("rb") as handle:
            prefix = handle.read(8)
            if len(prefix) < 8:
                raise AdapterFormatError(
                    f"file is {file_size} bytes, too short to be safetensors", path=path, hint="re-download the file"
                )
            (header_len,) = struct.unpack("<Q", prefix)
            if header_len > MAX_HEADER_BYTES:
                raise AdapterFormatError(
                    f"header length is over the limit of {MAX_HEADER_BYTES} bytes; "
                    "the file is corrupt or not safetensors",
                    path=path,
                    hint="re-download the file",
                )
            if 8 + header_len > file_size:
                raise AdapterFormatError(
                    f"header length is longer than the file ({file_size} bytes); the file is truncated or not "
                    "safetensors",
                    path=path,
                    hint="re-download the file",
                )
            raw = handle.read(header_len)
    except OSError as exc:
        raise AdapterFormatError(f"cannot read file: {exc.strerror or exc}", path=path) from exc
    try:
        parsed = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise AdapterFormatError("header is not UTF-8 text", path=path, hint="re-download the file") from exc
    except json.JSONDecodeError as exc:
        raise AdapterFormatError(
            f"header is not valid JSON ({exc.msg} at byte {exc.pos})", path=path, hint="re-download the file"
        ) from exc
    except RecursionError as exc:
        raise AdapterFormatError("header JSON is nested too deeply", path=path, hint="re-download the file") from exc
    if not isinstance(parsed, dict):
        raise AdapterFormatError("header is not a JSON object", path=path)
    metadata_raw = parsed.pop("__metadata__", None) or {}
    if not isinstance(metadata_raw, dict):
        raise AdapterFormatError("__metadata__ is not a JSON object", path=path)
    metadata = {
        storable_text(k): storable_text(v) if isinstance(v, str) else json.dumps(v) for k, v in metadata_raw.items()
    }
    data_size = file_size - 8 - header_len
    tensors: dict[str, TensorInfo] = {}
    for name, entry in parsed.items():
        tensors[name] = _tensor_info(path, name, entry, data_size)
    return SafetensorsHeader(path=path, file_size=file_size, metadata=metadata, tensors=tensors)


def _tensor_info(path: Path, name: str, entry: object, data_size: int) -> TensorInfo:
    if not isinstance(entry, dict) or not {"dtype", "shape", "data_offsets"} <= entry.keys():
        raise AdapterFormatError(f"tensor {name!r} has a malformed header entry", path=path)
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if not isinstance(dtype, str) or dtype not in DTYPE_BYTES:
        raise AdapterFormatError(f"tensor {name!r} has an unknown dtype", path=path)
    if not (isinstance(shape, list) and all(type(s) is int and s >= 0 for s in shape)):
        raise AdapterFormatError(f"tensor {name!r} has a malformed shape", path=path)
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int for o in offsets)):
        raise AdapterFormatError(f"tensor {name!r} has malformed data offsets", path=path)
    start, end = offsets
    if not 0 <= start <= end <= data_size:
        raise AdapterFormatError(
            f"tensor {name!r} lies at bytes {start}..{end} but the data section has {data_size}; the file is truncated",
            path=path,
            hint="re-download the file",
        )
    if end - start != math.prod(shape) * DTYPE_BYTES[dtype]:
        raise AdapterFormatError(f"tensor {name!r} byte length does not match its shape and dtype", path=path)
    return TensorInfo(dtype=dtype, shape=tuple(shape), start=start, end=end)


def all_finite(tensor: torch.Tensor) -> bool:
    """True when no entry is NaN or ±Inf.

    A NaN or Inf anywhere makes the sum non-finite, so a finite sum settles it with one reduction; only a
    non-finite sum (which finite values can also reach by overflow) is checked entry by entry.
    """
    import torch

    if tensor.element_size() == 1:  # float8 has no isfinite kernel
        tensor = tensor.float()
    total = tensor.sum(dtype=torch.float32 if tensor.element_size() < 4 else tensor.dtype)
    return bool(torch.isfinite(total)) or bool(torch.isfinite(tensor).all())


def load_tensors(
    path: str | Path,
    names: Iterable[str] | None = None,
    *,
    allow_non_finite: bool = False,
    header: SafetensorsHeader | None = None,
) -> dict[str, torch.Tensor]:
    """Load tensors (all, or ``names``) from a validated file onto the CPU.

    Floating tensors holding NaN/Inf raise :class:`NonFiniteTensorError` unless ``allow_non_finite``. ``header``
    is the file's already-read :func:`read_header` (it is read again when not given).
    """
    header = header or read_header(path)
    wanted = list(header.tensors) if names is None else list(names)
    missing = [n for n in wanted if n not in header.tensors]
    if missing:
        raise AdapterFormatError(f"tensors not in file: {missing[:5]}", path=header.path)
    out: dict[str, torch.Tensor] = {}
    try:
        with safe_open(str(header.path), framework="pt", device="cpu") as handle:
            for name in wanted:
                out[name] = handle.get_tensor(name)
    except Exception as exc:  # safetensors raises its own error types for corrupt data
        raise AdapterFormatError(f"cannot load tensors: {exc}", path=header.path) from exc
    if not allow_non_finite:
        for name, tensor in out.items():
            if tensor.is_floating_point() and not all_finite(tensor):
                raise NonFiniteTensorError(
                    f"tensor {name!r} contains NaN or Inf values",
                    path=header.path,
                    hint="the file is broken; pass allow_non_finite=True only to inspect it",
                )
    return out


def save_atomic(tensors: Mapping[str, torch.Tensor], path: str | Path, metadata: Mapping[str, str]) -> Path:
    """Write a safetensors file atomically (a temp file beside it, renamed into place); returns the path."""
    from safetensors.torch import save_file

    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    handle, temp = tempfile.mkstemp(prefix=target.name, suffix=".tmp", dir=target.parent)
    os.close(handle)
    try:
        save_file(dict(tensors), temp, metadata=dict(metadata))
        os.replace(temp, target)
    finally:
        if os.path.exists(temp):
            os.unlink(temp)
    return target
