"""Safe, validated access to safetensors files: header-only inspection and on-demand tensor loading.

Everything in the library reads files through here, so every malformed case (truncated file, header
longer than the file, absurd header size, bad JSON, offsets out of range, NaN/Inf tensors, pickle files)
raises one typed error that names the file and the fix, before any tensor is handed out. Headers are parsed and
bounds-checked by the safetensors library's own reader (``safe_open``, numpy framework: no torch); torch is imported
only when tensors are checked or loaded.
"""

from __future__ import annotations

import os
import stat
import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from safetensors import SafetensorError, safe_open

from fusion.errors import AdapterFormatError, NonFiniteTensorError, NonRegularFileError, UnsafeFormatError

if TYPE_CHECKING:
    import torch

PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin", ".pkl")

CONVERT_HINT = (
    "convert it to safetensors on a machine you trust, e.g. "
    'python -c "import torch, safetensors.torch as s; '
    "s.save_file({k: v.contiguous() for k, v in torch.load('IN', weights_only=True).items()}, 'OUT.safetensors')\""
)

_HEADER_REFUSALS = (
    ("header too small", "the file is {size} bytes, too short to be safetensors"),
    ("header too large", "header length is over the safetensors limit; the file is corrupt or not safetensors"),
    ("invalid header length", "header length is longer than the file ({size} bytes); the file is truncated"),
    ("not fully covered", "the tensors do not cover the file's {size} bytes exactly; the file is truncated or corrupt"),
    ("invalid utf-8", "header is not UTF-8 text"),
    ("invalid json", "header is not valid JSON ({detail})"),
)
"""The safetensors reader's refusal (a phrase of its message, lower case) → what we say about the file."""


@dataclass(frozen=True)
class TensorInfo:
    """A tensor's entry in a safetensors header."""

    dtype: str
    shape: tuple[int, ...]


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
    """Read and validate only the header of ``path`` (no tensor data is touched).

    The safetensors library checks the header's size, JSON, dtypes and every tensor's byte range against the file;
    whatever it refuses becomes an :class:`AdapterFormatError` that names the file.
    """
    path = Path(path)
    refuse_pickle(path)
    try:
        info = path.stat()
        refuse_non_regular(path, info)
        with safe_open(str(path), framework="numpy") as handle:
            metadata = handle.metadata() or {}
            tensors = {}
            for name in handle.keys():  # noqa: SIM118 (a safe_open handle is not iterable)
                view = handle.get_slice(name)
                tensors[name] = TensorInfo(dtype=view.get_dtype(), shape=tuple(view.get_shape()))
    except OSError as exc:
        raise AdapterFormatError(f"cannot read file: {exc.strerror or exc}", path=path) from exc
    except SafetensorError as exc:
        raise _header_refusal(path, info.st_size, exc) from exc
    return SafetensorsHeader(path=path, file_size=info.st_size, metadata=dict(metadata), tensors=tensors)


def _header_refusal(path: Path, size: int, error: SafetensorError) -> AdapterFormatError:
    """The safetensors reader's refusal of a header, said about the file."""
    reason = str(error).removeprefix("Error while deserializing header: ")
    lowered = reason.lower()
    message = next(
        (said for phrase, said in _HEADER_REFUSALS if phrase in lowered), "not a valid safetensors file ({reason})"
    )
    detail = reason.split(": ", 1)[-1]
    return AdapterFormatError(
        message.format(size=size, reason=reason, detail=detail), path=path, hint="re-download the file"
    )


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
