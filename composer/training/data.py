"""Image/caption folders for fine-tuning (DreamBooth-style SHiRA, restoration pairs, gate training).

A folder holds images (``.png``, ``.jpg``, ``.jpeg``, ``.webp``, ``.bmp``); an image's caption is the text of a
``.txt`` file with the same stem when one exists, otherwise the folder-wide default prompt. Images are resized so the
short side is ``size``, centre-cropped to ``size``×``size`` and returned as CHW float tensors in [-1, 1] (what the
diffusers VAEs expect). Optional horizontal flips (seeded) augment small sets.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image
from torch.utils.data import Dataset

from fusion.errors import ComposerError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


class DatasetError(ComposerError):
    """A training folder is missing, empty, or holds an image that cannot be read."""


def list_images(folder: str | Path) -> list[Path]:
    """The image files directly inside ``folder``, sorted by name; raises :class:`DatasetError` if there are none."""
    root = Path(folder)
    if not root.is_dir():
        raise DatasetError("the training image folder does not exist", path=root, hint="pass --images DIR")
    files = sorted(p for p in root.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise DatasetError(
            "the training image folder holds no images",
            path=root,
            hint=f"add files with one of the suffixes {', '.join(IMAGE_SUFFIXES)}",
        )
    return files


def load_image(path: Path, size: int) -> torch.Tensor:
    """One RGB image, short side resized to ``size`` and centre-cropped, as a (3, size, size) tensor in [-1, 1]."""
    try:
        with Image.open(path) as handle:
            image = handle.convert("RGB")
    except (OSError, ValueError) as exc:
        raise DatasetError(f"cannot read the image: {exc}", path=path) from exc
    scale = size / min(image.size)
    resized = image.resize(
        (max(size, round(image.width * scale)), max(size, round(image.height * scale))), Image.Resampling.BICUBIC
    )
    left, top = (resized.width - size) // 2, (resized.height - size) // 2
    cropped = resized.crop((left, top, left + size, top + size))
    pixels = torch.frombuffer(bytearray(cropped.tobytes()), dtype=torch.uint8).reshape(size, size, 3)
    return pixels.permute(2, 0, 1).float().div(127.5).sub(1.0)


@dataclass(frozen=True)
class Example:
    """One training example: the image tensor and its caption."""

    pixels: torch.Tensor
    caption: str


class ImageCaptionFolder(Dataset):
    """The images of a folder with their captions (see the module docstring), loaded once and kept in memory."""

    def __init__(
        self,
        folder: str | Path,
        *,
        prompt: str = "",
        size: int = 512,
        flip: bool = False,
        seed: int = 0,
    ) -> None:
        self.files = list_images(folder)
        self.size = size
        self.flip = flip
        self._generator = torch.Generator().manual_seed(seed)
        self.images = [load_image(path, size) for path in self.files]
        self.captions = [self._caption(path, prompt) for path in self.files]

    @staticmethod
    def _caption(path: Path, prompt: str) -> str:
        sidecar = path.with_suffix(".txt")
        if sidecar.is_file():
            text = sidecar.read_text(encoding="utf-8").strip()
            if text:
                return text
        return prompt

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> Example:
        pixels = self.images[index]
        if self.flip and bool(torch.rand((), generator=self._generator) < 0.5):
            pixels = pixels.flip(-1)
        return Example(pixels=pixels, caption=self.captions[index])


def collate(examples: list[Example]) -> dict[str, torch.Tensor | list[str]]:
    """Stack examples into a batch: ``pixels`` (N, 3, H, W) and ``captions`` (N strings)."""
    return {"pixels": torch.stack([e.pixels for e in examples]), "captions": [e.caption for e in examples]}


def index_batches(count: int, batch_size: int, generator: torch.Generator) -> Iterator[torch.Tensor]:
    """Endless shuffled index batches over ``count`` examples (a fresh permutation each epoch)."""
    while True:
        order = torch.randperm(count, generator=generator)
        for start in range(0, count, batch_size):
            yield order[start : start + batch_size]
