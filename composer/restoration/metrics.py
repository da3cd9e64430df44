"""Restoration metrics: PSNR and SSIM against a reference (torchmetrics), and a CLIP-IQA-style no-reference score.

PSNR and SSIM are torchmetrics' implementations on RGB images in [0, 1] (data range 1; SSIM with the standard
11×11 Gaussian window, σ = 1.5, averaged over channels), computed per image and then averaged, as restoration
papers report them. Identical images give PSNR = inf and SSIM = 1.

:class:`ClipIQA` follows CLIP-IQA (Wang et al., AAAI 2023): the image embedding's cosine similarity to an antonym
prompt pair ("a good photo." / "a bad photo.") is scaled by 100 and soft-maxed; the score is the probability of the
positive prompt, in [0, 1]. The open_clip model is built offline: pass ``weights`` (a local open_clip checkpoint of
the same architecture, e.g. OpenAI ViT-B-32) for a meaningful score. Without weights the towers are randomly
initialised under a fixed seed — the machinery runs and is deterministic, but the number says nothing about quality.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure

from composer.restoration.degrade import load_rgb
from composer.training.data import DatasetError, list_images
from fusion.errors import ComposerError
from fusion.warning_categories import MeaninglessScoreWarning
from retrieval.text import random_init_is_intended

DEFAULT_IQA_MODEL = "ViT-B-32"
TINY_IQA_MODEL = "lora-composer-tiny-iqa"
TINY_IQA_CONFIG: dict[str, Any] = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}
"""A one-layer, 32-wide CLIP (real vocabulary) that builds in milliseconds: for tests and quick dry runs."""

ANTONYM_PROMPTS = ("a good photo.", "a bad photo.")
"""CLIP-IQA's quality antonym pair: (positive, negative)."""

CLIP_IQA_LOGIT_SCALE = 100.0


class MetricError(ComposerError):
    """Images cannot be compared (different sizes, missing references) or a scorer cannot be built."""


def _batch(image: torch.Tensor) -> torch.Tensor:
    if image.dim() == 3:
        image = image.unsqueeze(0)
    if image.dim() != 4 or image.shape[1] != 3:
        raise MetricError(f"expected (3, H, W) or (N, 3, H, W) RGB tensors, got shape {tuple(image.shape)}")
    return image.float()


def _pair(restored: torch.Tensor, reference: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    restored, reference = _batch(restored), _batch(reference)
    if restored.shape != reference.shape:
        raise MetricError(
            f"restored {tuple(restored.shape)} and reference {tuple(reference.shape)} differ in shape",
            hint="compare images of the same size",
        )
    return restored, reference


def psnr(restored: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR in dB of images in [0, 1], shape (N,) (inf where an image equals its reference)."""
    restored, reference = _pair(restored, reference)
    return peak_signal_noise_ratio(restored, reference, data_range=1.0, reduction="none", dim=(1, 2, 3))


def ssim(restored: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Per-image SSIM of images in [0, 1], shape (N,) (1 where an image equals its reference)."""
    restored, reference = _pair(restored, reference)
    return structural_similarity_index_measure(restored, reference, data_range=1.0, reduction="none")


def expected_noise_psnr(sigma: float) -> float:
    """The PSNR (dB) of additive Gaussian noise of std ``sigma`` on the 0–255 scale before clipping:
    20·log10(255 / σ) (e.g. 20.17 dB at σ = 25)."""
    return 20.0 * math.log10(255.0 / sigma)


class ClipIQA:
    """CLIP-IQA no-reference quality in [0, 1] from an open_clip model (see the module docstring).

    ``model`` is an open_clip architecture name (``TINY_IQA_MODEL`` is registered on demand); ``weights`` a local
    checkpoint path or None for seeded random weights (machinery only: the score is then meaningless).
    """

    def __init__(
        self,
        model: str = DEFAULT_IQA_MODEL,
        *,
        weights: str | Path | None = None,
        prompts: Sequence[str] = ANTONYM_PROMPTS,
        seed: int = 0,
        device: str | torch.device = "cpu",
    ) -> None:
        import open_clip

        from retrieval.text import register_model_config

        if model == TINY_IQA_MODEL:
            register_model_config(TINY_IQA_MODEL, TINY_IQA_CONFIG)
        if model not in open_clip.list_models():
            raise MetricError(f"unknown open_clip architecture {model!r}", hint="use one of open_clip.list_models()")
        if len(prompts) != 2:
            raise MetricError("CLIP-IQA needs exactly two prompts: a positive and a negative one")
        if weights is not None and not Path(weights).is_file():
            raise MetricError("the CLIP weights file does not exist", path=weights)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            try:
                with random_init_is_intended(weights is None):
                    clip, _, self.preprocess = open_clip.create_model_and_transforms(
                        model, pretrained=None if weights is None else str(weights)
                    )
            except (RuntimeError, OSError, ValueError) as exc:
                raise MetricError(f"cannot build {model!r}: {exc}", path=weights) from exc
        if weights is None:
            warnings.warn(
                f"CLIP-IQA on {model!r} with random weights: the score is not a quality measure (give weights=)",
                MeaninglessScoreWarning,
                stacklevel=2,
            )
        self.model = clip.to(device).eval()
        self.device = torch.device(device)
        self.name = model
        self.pretrained = weights is not None
        tokenizer = open_clip.get_tokenizer(model)
        with torch.no_grad():
            text = self.model.encode_text(tokenizer(list(prompts)).to(self.device)).float()
        self.text_features = torch.nn.functional.normalize(text, dim=-1)

    @torch.no_grad()
    def score(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """Quality scores (N,) in [0, 1]: softmax over 100 · cos(image, prompt) of the positive prompt."""
        if not images:
            return torch.zeros(0)
        pixels = torch.stack([self.preprocess(image.convert("RGB")) for image in images]).to(self.device)
        features = torch.nn.functional.normalize(self.model.encode_image(pixels).float(), dim=-1)
        logits = CLIP_IQA_LOGIT_SCALE * features @ self.text_features.T
        return logits.softmax(dim=-1)[:, 0].cpu()


@dataclass
class RestorationReport:
    """Per-image and mean metrics of a restored folder against its reference folder."""

    restored: Path
    reference: Path
    images: list[dict[str, Any]] = field(default_factory=list)
    means: dict[str, float] = field(default_factory=dict)
    clip_iqa_model: str | None = None
    clip_iqa_pretrained: bool = False

    def as_dict(self) -> dict[str, Any]:
        """JSON-friendly view; inf PSNR is written as the string "inf" (JSON has no infinity)."""

        def clean(value: Any) -> Any:
            return "inf" if isinstance(value, float) and math.isinf(value) else value

        return {
            "restored": str(self.restored),
            "reference": str(self.reference),
            "count": len(self.images),
            "mean": {k: clean(v) for k, v in self.means.items()},
            "clip_iqa_model": self.clip_iqa_model,
            "clip_iqa_pretrained": self.clip_iqa_pretrained,
            "images": [{k: clean(v) for k, v in row.items()} for row in self.images],
        }


def matching_files(restored: str | Path, reference: str | Path) -> list[tuple[Path, Path]]:
    """(restored, reference) paths paired by file stem; every restored image needs a reference."""
    references = {path.stem: path for path in list_images(reference)}
    pairs = []
    missing = []
    for path in list_images(restored):
        if path.stem in references:
            pairs.append((path, references[path.stem]))
        else:
            missing.append(path.name)
    if missing:
        raise DatasetError(
            f"no reference image for {missing[:5]}{' …' if len(missing) > 5 else ''}",
            path=reference,
            hint="reference and restored images are paired by file name (stem)",
        )
    return pairs


def evaluate_folders(restored: str | Path, reference: str | Path, *, iqa: ClipIQA | None = None) -> RestorationReport:
    """PSNR and SSIM of every restored image against the same-named reference (and CLIP-IQA when ``iqa`` is
    given), with means over the folder."""
    report = RestorationReport(Path(restored), Path(reference))
    columns: dict[str, list[float]] = {"psnr": [], "ssim": []}
    pictures: list[Image.Image] = []
    for restored_path, reference_path in matching_files(restored, reference):
        ours, theirs = load_rgb(restored_path), load_rgb(reference_path)
        if ours.shape != theirs.shape:
            raise MetricError(
                f"size {tuple(ours.shape[1:])} differs from the reference's {tuple(theirs.shape[1:])}",
                path=restored_path,
                hint="restore at the reference's size",
            )
        row = {"name": restored_path.name, "psnr": float(psnr(ours, theirs)[0]), "ssim": float(ssim(ours, theirs)[0])}
        columns["psnr"].append(row["psnr"])
        columns["ssim"].append(row["ssim"])
        report.images.append(row)
        if iqa is not None:
            with Image.open(restored_path) as handle:
                pictures.append(handle.convert("RGB"))
    if iqa is not None:
        scores = iqa.score(pictures).tolist()
        for row, value in zip(report.images, scores):
            row["clip_iqa"] = value
        columns["clip_iqa"] = scores
        report.clip_iqa_model = iqa.name
        report.clip_iqa_pretrained = iqa.pretrained
    report.means = {name: sum(values) / len(values) for name, values in columns.items() if values}
    return report


def summarise(values: Mapping[str, float]) -> str:
    """One line ``psnr 27.31 dB  ssim 0.8123  clip_iqa 0.512`` for terminal output."""
    parts = []
    for name, value in values.items():
        unit = " dB" if name == "psnr" else ""
        parts.append(f"{name} {value:.4g}{unit}" if not math.isinf(value) else f"{name} inf{unit}")
    return "  ".join(parts)
