"""Images a benchmark drew, kept on disk under everything that drew them, so that a rerun after only the judge
changed re-reads them instead of drawing them again (the toy world's full quality run draws for two hours on two
CPU cores; judging the same images takes minutes)."""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from weights_index.hashing import file_sha256

DRAWING_PACKAGES = ("composer", "fusion", "weights_index", "retrieval")
"""The packages whose code and shipped files can change what a pipeline of the house draws."""
UNDRAWING_FILES = frozenset(
    {
        "composer/toyworld/judge.py",
        "composer/toyworld/verdict.py",
        "composer/toyworld/reader.py",
        "composer/toyworld/measures.py",
        "composer/toyworld/calibration.py",
        "composer/toyworld/weights/judge_calibration.json",
        "composer/cli/commands/judge.py",
        "composer/toyworld/weights/judge.safetensors",
        "composer/toyworld/weights/judge_generator.safetensors",
        "composer/toyworld/train.py",
    }
)
"""Files that never draw: the judge's code and weights read images, and the training command reaches drawing only
through the weights it writes, which are fingerprinted. A change to them keeps every drawn image valid."""
_NOT_DRAWING = (".md", ".pyc")


def drawing_fingerprint(root: Path) -> str:
    """SHA-256 over every file that can change a drawn image — the drawing packages' code and weights under the
    repository ``root`` (their Markdown and :data:`UNDRAWING_FILES` left out) — and torch's and diffusers' versions.
    A benchmark's own choices (prompt, seed, steps, CFG, weights, method, branches) belong in each image's recipe."""
    import diffusers

    digest = hashlib.sha256(f"torch {torch.__version__} diffusers {diffusers.__version__}".encode())
    for package in DRAWING_PACKAGES:
        for path in sorted((root / package).rglob("*")):
            name = path.relative_to(root).as_posix()
            if not path.is_file() or "__pycache__" in path.parts or path.suffix in _NOT_DRAWING:
                continue
            if name not in UNDRAWING_FILES:
                digest.update(name.encode() + b"\0" + bytes.fromhex(file_sha256(path)))
    return digest.hexdigest()


class ImageCache:
    """Drawn images by recipe (a JSON-able description of one drawing call) under one drawing fingerprint.

    ``folder`` ``None`` keeps nothing: every call draws. A stored entry keeps the seconds its drawing took, so a
    benchmark's timings stay those measured when the images were drawn."""

    def __init__(self, folder: Path | None, fingerprint: str) -> None:
        self.folder = folder
        self.fingerprint = fingerprint
        self.reused = 0
        self.drawn = 0

    def draw(self, recipe: dict[str, Any], make: Callable[[], torch.Tensor]) -> tuple[torch.Tensor, float]:
        """The images ``recipe`` names and the seconds drawing them took: read back when drawn before under this
        fingerprint, else made by ``make`` (timed) and stored."""
        from safetensors import safe_open
        from safetensors.torch import save_file

        path = None
        if self.folder is not None:
            key = json.dumps({"fingerprint": self.fingerprint, **recipe}, sort_keys=True)
            path = self.folder / f"{hashlib.sha256(key.encode()).hexdigest()}.safetensors"
            if path.is_file():
                with safe_open(str(path), "pt") as stored:
                    images, seconds = stored.get_tensor("images"), float(stored.metadata()["seconds"])
                self.reused += len(images)
                return images, seconds
        started = time.perf_counter()
        images = make()
        seconds = time.perf_counter() - started
        self.drawn += len(images)
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            partial = path.with_suffix(f".{os.getpid()}.partial")
            save_file({"images": images.contiguous()}, str(partial), metadata={"seconds": repr(seconds)})
            partial.replace(path)
        return images, seconds
