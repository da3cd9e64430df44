"""Synthetic degradations for restoration training pairs: noise, rain, haze, JPEG and low light.

Every degradation takes a clean image as a (3, H, W) float tensor in [0, 1] and returns the degraded image in the same
form; randomness comes only from the ``generator`` passed in, so a seed reproduces a pair exactly. The models follow
the restoration literature:

- **noise** — additive white Gaussian noise, σ given on the 0–255 scale (the 15 / 25 / 50 levels of denoising
  benchmarks), clipped to the valid range;
- **rain** — sparse random drops smeared into slanted streaks by a line (motion-blur) kernel and screen-blended
  onto the image (the layer model O = B + S used by rain-streak datasets);
- **haze** — the atmospheric scattering model I = J·t + A·(1−t) with transmission t = exp(−β·d) from a depth map d
  (given, or a synthetic one: farther towards the top of the frame, with smooth random variation);
- **jpeg** — an encode/decode round trip at a given quality (blocking and ringing artefacts);
- **lowlight** — the exposure/gamma model I = s · J^γ (darker and lower-contrast, shadows crushed), plus optional
  read noise.

:func:`make_pairs` writes ``clean/`` and ``degraded/`` folders with matching names, the layout
``compose train-restore --pairs`` reads.
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image

from composer.restoration.degrade_names import DEGRADATIONS
from composer.training.data import DatasetError, list_images
from fusion.errors import ComposerError

NOISE_LEVELS = (15.0, 25.0, 50.0)
"""The standard Gaussian noise levels (σ on 0–255) of denoising benchmarks."""


class DegradationError(ComposerError):
    """A degradation was asked for with an unknown name or parameters outside their valid range."""


def to_tensor(image: Image.Image) -> torch.Tensor:
    """A PIL image as a (3, H, W) float32 tensor in [0, 1] (converted to RGB first)."""
    rgb = image.convert("RGB")
    pixels = torch.frombuffer(bytearray(rgb.tobytes()), dtype=torch.uint8).reshape(rgb.height, rgb.width, 3)
    return pixels.permute(2, 0, 1).float().div(255.0)


def to_pil(pixels: torch.Tensor) -> Image.Image:
    """A (3, H, W) tensor in [0, 1] as an RGB PIL image (clipped and rounded to 8 bits)."""
    array = pixels.detach().float().clamp(0, 1).mul(255.0).round().to(torch.uint8).permute(1, 2, 0).contiguous()
    return Image.fromarray(array.cpu().numpy(), mode="RGB")


def load_rgb(path: str | Path) -> torch.Tensor:
    """Read an image file as a (3, H, W) tensor in [0, 1]; unreadable files raise :class:`DatasetError`."""
    try:
        with Image.open(path) as handle:
            return to_tensor(handle)
    except (OSError, ValueError) as exc:
        raise DatasetError(f"cannot read the image: {exc}", path=path) from exc


def _check_image(image: torch.Tensor) -> None:
    if image.dim() != 3 or image.shape[0] != 3:
        raise DegradationError(f"expected a (3, H, W) image tensor, got shape {tuple(image.shape)}")


def gaussian_noise(
    image: torch.Tensor, sigma: float = 25.0, *, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Additive white Gaussian noise with standard deviation ``sigma`` on the 0–255 scale, clipped to [0, 1]."""
    _check_image(image)
    if sigma < 0:
        raise DegradationError(f"noise sigma must be ≥ 0, got {sigma}")
    noise = torch.randn(image.shape, generator=generator, dtype=torch.float32).to(image.device)
    return (image + noise * (sigma / 255.0)).clamp(0, 1)


def line_kernel(length: int, angle_degrees: float) -> torch.Tensor:
    """A normalised (length × length) kernel holding an anti-aliased line through the centre at ``angle_degrees``
    from vertical: convolving with it smears a point into a streak."""
    if length < 1:
        raise DegradationError(f"streak length must be ≥ 1, got {length}")
    size = length if length % 2 else length + 1
    centre = (size - 1) / 2
    theta = math.radians(angle_degrees)
    direction = torch.tensor([math.cos(theta), math.sin(theta)])  # (row, column) step along the streak
    rows, cols = torch.meshgrid(torch.arange(size) - centre, torch.arange(size) - centre, indexing="ij")
    along = rows * direction[0] + cols * direction[1]
    across = rows * direction[1] - cols * direction[0]
    kernel = (1 - across.abs()).clamp(min=0) * (along.abs() <= length / 2)
    return kernel / kernel.sum()


def rain_streaks(
    image: torch.Tensor,
    *,
    density: float = 0.02,
    length: int = 15,
    angle: float = 15.0,
    intensity: float = 0.8,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Rain: a fraction ``density`` of pixels seeds a drop, each smeared into a ``length``-pixel streak at ``angle``
    degrees from vertical and screen-blended (1 − (1 − J)(1 − S)) onto the image with peak ``intensity``."""
    _check_image(image)
    if not 0 <= density <= 1 or not 0 <= intensity <= 1:
        raise DegradationError("rain density and intensity must lie in [0, 1]")
    height, width = image.shape[1:]
    drops = (torch.rand((1, 1, height, width), generator=generator) < density).float()
    drops = drops * (0.5 + 0.5 * torch.rand((1, 1, height, width), generator=generator))
    kernel = line_kernel(length, angle)[None, None]
    pad = kernel.shape[-1] // 2
    streaks = F.conv2d(F.pad(drops, (pad, pad, pad, pad), mode="reflect"), kernel)[0]
    streaks = (streaks / streaks.max().clamp(min=1e-8) * intensity).clamp(0, 1).to(image.device)
    return 1 - (1 - image) * (1 - streaks)


def synthetic_depth(height: int, width: int, *, generator: torch.Generator | None = None) -> torch.Tensor:
    """A plausible (H, W) depth map in [0, 1]: 1 (far) at the top of the frame falling to 0 (near) at the bottom,
    with smooth random variation (bilinearly upsampled 4×4 noise) so the haze is not a pure gradient."""
    vertical = torch.linspace(1.0, 0.0, height)[:, None].expand(height, width)
    coarse = torch.rand((1, 1, 4, 4), generator=generator)
    smooth = F.interpolate(coarse, size=(height, width), mode="bilinear", align_corners=True)[0, 0]
    depth = 0.75 * vertical + 0.25 * smooth
    return (depth - depth.min()) / (depth.max() - depth.min()).clamp(min=1e-8)


def haze(
    image: torch.Tensor,
    *,
    beta: float = 1.2,
    airlight: float = 0.9,
    depth: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Atmospheric scattering: I = J·t + A·(1−t) with t = exp(−β·d), airlight A and depth d in [0, 1]
    (``depth`` (H, W), or :func:`synthetic_depth`)."""
    _check_image(image)
    if beta < 0 or not 0 <= airlight <= 1:
        raise DegradationError("haze needs beta ≥ 0 and airlight in [0, 1]")
    height, width = image.shape[1:]
    if depth is None:
        depth = synthetic_depth(height, width, generator=generator)
    if tuple(depth.shape) != (height, width):
        raise DegradationError(f"depth map shape {tuple(depth.shape)} does not match the image ({height}, {width})")
    transmission = torch.exp(-beta * depth.to(image.device, torch.float32))[None]
    return image * transmission + airlight * (1 - transmission)


def jpeg(image: torch.Tensor, *, quality: int = 10) -> torch.Tensor:
    """A JPEG encode/decode round trip at ``quality`` (1–95): block and ringing artefacts."""
    _check_image(image)
    if not 1 <= quality <= 95:
        raise DegradationError(f"JPEG quality must lie in 1..95, got {quality}")
    buffer = io.BytesIO()
    to_pil(image).save(buffer, format="JPEG", quality=int(quality))
    buffer.seek(0)
    with Image.open(buffer) as decoded:
        return to_tensor(decoded).to(image.device)


def low_light(
    image: torch.Tensor,
    *,
    gamma: float = 2.0,
    scale: float = 0.3,
    read_noise: float = 0.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Low light: I = scale · J^γ (γ > 1 crushes shadows, scale < 1 darkens), plus Gaussian read noise of
    ``read_noise`` (0–255 scale), clipped to [0, 1]."""
    _check_image(image)
    if gamma <= 0 or not 0 < scale <= 1:
        raise DegradationError("low light needs gamma > 0 and scale in (0, 1]")
    dark = scale * image.clamp(0, 1).pow(gamma)
    return gaussian_noise(dark, read_noise, generator=generator) if read_noise > 0 else dark


@dataclass(frozen=True)
class DegradeOptions:
    """Parameters of a named degradation (only the ones the chosen kind reads matter)."""

    sigma: float = 25.0
    quality: int = 10
    beta: float = 1.2
    airlight: float = 0.9
    density: float = 0.02
    gamma: float = 2.0
    scale: float = 0.3


def degrade(
    image: torch.Tensor,
    kind: str,
    options: DegradeOptions | None = None,
    *,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Apply the degradation named ``kind`` (one of :data:`DEGRADATIONS`) with ``options``."""
    opts = options or DegradeOptions()
    table: dict[str, Callable[[], torch.Tensor]] = {
        "noise": lambda: gaussian_noise(image, opts.sigma, generator=generator),
        "rain": lambda: rain_streaks(image, density=opts.density, generator=generator),
        "haze": lambda: haze(image, beta=opts.beta, airlight=opts.airlight, generator=generator),
        "jpeg": lambda: jpeg(image, quality=opts.quality),
        "lowlight": lambda: low_light(image, gamma=opts.gamma, scale=opts.scale, generator=generator),
    }
    if kind not in table:
        raise DegradationError(f"unknown degradation {kind!r}", hint=f"use one of {', '.join(DEGRADATIONS)}")
    return table[kind]()


def make_pairs(
    clean_dir: str | Path,
    out: str | Path,
    kind: str,
    options: DegradeOptions | None = None,
    *,
    seed: int = 0,
) -> list[tuple[Path, Path]]:
    """Degrade every image in ``clean_dir`` and write ``out/clean/<stem>.png`` + ``out/degraded/<stem>.png``.

    Image ``i`` (in name order) draws from seed ``seed + i``, so adding images never changes earlier pairs.
    Returns the (clean, degraded) paths written.
    """
    if kind not in DEGRADATIONS:
        raise DegradationError(f"unknown degradation {kind!r}", hint=f"use one of {', '.join(DEGRADATIONS)}")
    files = list_images(clean_dir)
    stems = [path.stem for path in files]
    duplicates = sorted({s for s in stems if stems.count(s) > 1})
    if duplicates:
        raise DatasetError(
            f"several images share the names {duplicates}", path=clean_dir, hint="give every image a unique stem"
        )
    root = Path(out)
    (root / "clean").mkdir(parents=True, exist_ok=True)
    (root / "degraded").mkdir(parents=True, exist_ok=True)
    written: list[tuple[Path, Path]] = []
    for index, path in enumerate(files):
        clean = load_rgb(path)
        generator = torch.Generator().manual_seed(seed + index)
        degraded = degrade(clean, kind, options, generator=generator)
        clean_path = root / "clean" / f"{path.stem}.png"
        degraded_path = root / "degraded" / f"{path.stem}.png"
        to_pil(clean).save(clean_path)
        to_pil(degraded).save(degraded_path)
        written.append((clean_path, degraded_path))
    return written
