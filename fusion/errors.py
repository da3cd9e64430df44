"""Typed errors shared by every floor: one base class, each error names what was wrong, where, and the fix."""

from __future__ import annotations

from pathlib import Path


class ComposerError(Exception):
    """Base of every error LoRA Composer raises on purpose.

    ``path`` names the file or object at fault and ``hint`` says what the user can do about it; both are
    folded into the message so a traceback alone is enough to act on.
    """

    def __init__(self, message: str, *, path: str | Path | None = None, hint: str | None = None) -> None:
        self.reason = message
        self.path = None if path is None else str(path)
        self.hint = hint
        text = f"{self.path}: {message}" if self.path else message
        if hint:
            text = f"{text} (fix: {hint})"
        super().__init__(text)


class AdapterFormatError(ComposerError):
    """An adapter file is malformed: truncated, a bad header, non-finite values, or an unknown key layout."""


class UnsafeFormatError(AdapterFormatError):
    """A pickle-based file (.ckpt/.pt/.bin/.pth) was offered; only safetensors is loaded."""


class UnknownLayoutError(AdapterFormatError):
    """The file's tensor names match no adapter layout this version can read."""


class NonFiniteTensorError(AdapterFormatError):
    """A tensor in the file holds NaN or Inf values."""


class NonRegularFileError(AdapterFormatError):
    """An adapter path is not a regular file (a FIFO, socket, device or symlink loop) and is never opened."""


class SidecarTooLargeError(AdapterFormatError):
    """A metadata sidecar (``.civitai.info``, ``.json``) is larger than the size cap and is not read."""


class ShapeMismatchError(ComposerError):
    """An adapter layer's shape does not fit the module it targets (or the declared base family)."""


class FamilyMismatchError(ComposerError):
    """An adapter was made for a different base-model family than the pipeline it is attached to."""


class UnsafePathError(ComposerError):
    """A path points outside the library it must stay in (``..``, absolute, or a symlink leaving it)."""


class CompositionError(ComposerError):
    """A composition request is invalid: unknown adapter names, bad weights, schedules, or method options."""


class StepUnknownError(CompositionError):
    """A composition whose weights change over steps ran where the step index cannot be known."""


class UnsupportedModelError(ComposerError):
    """The model cannot be composed exactly as it is (quantised weights, weights offloaded to the meta device)."""


class UnknownAdapterError(CompositionError):
    """A name or id matches no adapter in the library catalog (or no registered adapter)."""


class PresetError(ComposerError):
    """A model preset or pipeline could not be built or loaded."""


class TrainingError(ComposerError):
    """A training request cannot run: unsupported pipeline, bad options, or nothing to train."""
