"""Exact reads of a toy-world image where the world makes them exact: the character's fill hue, the block mosaic of
the pixel style, the periodic patterns of the striped and dotted styles, the dark lines of the outlined style.

The renderer places the character in a known window, paints backgrounds as row-wise gradients, and draws the styles
on fixed grids (stripes of period 8 along x + y, dots on an 8-pixel grid, pixel blocks of 4×4 aligned to the image).
These measures read those facts straight off the pixels, so a judge can check what its network says against what is
measurably there (:mod:`composer.toyworld.judge` combines them).
"""

from __future__ import annotations

import torch

from composer.toyworld.world import COLOUR_NAMES, COLOURS, IMAGE_SIZE

FIGURE_WINDOW = (16, 49, 16, 51)
"""x0, x1, y0, y1 (exclusive ends) of the window every character is drawn in (centre x 28–36, y 31–37, half-size
12–14.5), in pixels of the 64² image."""
OBJECT_ROWS = 44
"""Objects sit below this row, at the image's left or right edge."""


def _hsv(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Hue in degrees [0, 360), saturation and value in [0, 1] of images (B, 3, H, W) in [0, 1]."""
    r, g, b = images.unbind(1)
    high, _ = images.max(1)
    low, _ = images.min(1)
    span = (high - low).clamp_min(1e-6)
    hue = torch.where(
        high == r,
        torch.remainder((g - b) / span, 6),
        torch.where(high == g, (b - r) / span + 2, (r - g) / span + 4),
    )
    return hue * 60, (high - low) / high.clamp_min(1e-6), high


NAMED_HUES = {
    name: float(_hsv(torch.tensor(COLOURS[name], dtype=torch.float32).view(1, 3, 1, 1) / 255)[0])
    for name in COLOUR_NAMES
}
"""Hue in degrees of every named colour of the world."""


def foreground(images: torch.Tensor, threshold: float = 0.16) -> torch.Tensor:
    """Pixels (B, H, W) that differ from their row's background by more than ``threshold`` (RGB distance in [0, 1]
    units), the background of a row being the median of its six left- and six right-most pixels (every background
    of the world is a vertical gradient, the forest's trunks aside)."""
    border = torch.cat([images[..., :6], images[..., -6:]], dim=-1)
    background = border.median(dim=-1).values[..., None]
    return (images - background).norm(dim=1) > threshold


def fill_hue(images: torch.Tensor) -> dict[str, torch.Tensor]:
    """The character's fill: the dominant hue (degrees) of the saturated foreground pixels in the figure window
    (objects' corners left out), with the share of those pixels within 20° of it (``purity``) and how many there
    are (``pixels``). Pixels darker than 0.3 or with saturation under 0.35 (eyes, hats, glasses, outlines, scarves,
    stripes' dark halves) do not vote."""
    x0, x1, y0, y1 = FIGURE_WINDOW
    hue, saturation, value = _hsv(images)
    mask = foreground(images) & (saturation > 0.35) & (value > 0.3)
    window = torch.zeros_like(mask)
    window[:, y0:y1, x0:x1] = True
    window[:, OBJECT_ROWS:, : x0 + 2] = False
    window[:, OBJECT_ROWS:, x1 - 2 :] = False
    mask &= window
    bins = torch.arange(0, 360, 2.0)
    dominant, purity, count = [], [], []
    for b in range(images.shape[0]):
        hues = hue[b][mask[b]]
        count.append(float(hues.numel()))
        if hues.numel() == 0:
            dominant.append(float("nan"))
            purity.append(0.0)
            continue
        gap = torch.remainder(hues[None, :] - bins[:, None] + 180, 360) - 180
        votes = torch.exp(-(gap**2) / (2 * 6.0**2)).sum(1)
        peak = float(bins[votes.argmax()])
        near = torch.remainder(hues - peak + 180, 360) - 180
        centre = peak + float(near[near.abs() <= 20].mean()) if bool((near.abs() <= 20).any()) else peak
        dominant.append(centre % 360)
        purity.append(float((near.abs() <= 20).float().mean()))
    return {"hue": torch.tensor(dominant), "purity": torch.tensor(purity), "pixels": torch.tensor(count)}


def hue_margin(hue: float) -> tuple[str, str, float]:
    """The named colour nearest to ``hue``, the second nearest, and how far ``hue`` is (degrees) from the midpoint
    between them towards the nearest (0 on the midpoint)."""
    gaps = sorted((abs((hue - h + 180) % 360 - 180), name) for name, h in NAMED_HUES.items())
    (d1, first), (d2, second) = gaps[0], gaps[1]
    return first, second, (d2 - d1) / 2


def block_mosaic(images: torch.Tensor, block: int = 4) -> torch.Tensor:
    """How blocky each image is on the pixel style's grid: the mean colour change across block boundaries (best
    of the ``block`` grid phases, both axes) over the mean change inside blocks. About 1 on smooth images; large
    on a mosaic."""
    dx = (images[..., :, 1:] - images[..., :, :-1]).abs().sum(1)
    dy = (images[..., 1:, :] - images[..., :-1, :]).abs().sum(1)
    ratios = []
    for phase in range(block):
        across_x = (torch.arange(IMAGE_SIZE - 1) % block) == phase
        across = torch.cat([dx[..., across_x].flatten(1), dy[..., across_x, :].flatten(1)], 1).mean(1)
        inside = torch.cat([dx[..., ~across_x].flatten(1), dy[..., ~across_x, :].flatten(1)], 1).mean(1)
        ratios.append(across / inside.clamp_min(1e-4))
    return torch.stack(ratios, 1).max(1).values


OUTLINE_REACH = 2
"""Pixels on either side of a dark line at which :func:`outline_darkness` compares it (the world's outline is one to
two pixels wide; the model draws it two to three)."""
OUTLINE_DEPTH = 0.25
"""How much darker (value, max of RGB) than both sides a pixel must be to count as part of a dark line."""


def outline_darkness(images: torch.Tensor) -> torch.Tensor:
    """How much of the image is thin dark line: the share of pixels darker by :data:`OUTLINE_DEPTH` than both pixels
    :data:`OUTLINE_REACH` away, across rows plus across columns. A black outline round the figure and items makes
    such a line wherever it crosses from fill to background; solid dark areas (a hat, a night sky) do not, and on a
    night sky an outline is no darker than what surrounds it, just as the eye cannot see it there."""
    value = images.max(1).values
    r = OUTLINE_REACH

    def dips(v: torch.Tensor) -> torch.Tensor:
        return (v[..., r:-r] < torch.minimum(v[..., : -2 * r], v[..., 2 * r :]) - OUTLINE_DEPTH).float().mean((1, 2))

    return dips(value) + dips(value.transpose(1, 2))


def periodic_energy(images: torch.Tensor) -> dict[str, torch.Tensor]:
    """Share of each image's (luminance, mean removed) spectral energy at the styles' grids: ``stripes`` at the
    diagonal period-8 frequency along x + y; ``dots`` at the period-8 frequency along x and along y, the smaller of
    the two (a lattice of dots has both; vertical or horizontal bands have one)."""
    grey = images.mean(1)
    grey = grey - grey.mean((1, 2), keepdim=True)
    power = torch.fft.fft2(grey).abs() ** 2
    total = power.sum((1, 2)).clamp_min(1e-8)
    f = IMAGE_SIZE // 8

    def at(*points: tuple[int, int]) -> torch.Tensor:
        return sum(power[:, v % IMAGE_SIZE, u % IMAGE_SIZE] for u, v in points) / total

    along_x, along_y = at((f, 0), (-f, 0)), at((0, f), (0, -f))
    return {"stripes": at((f, f), (-f, -f)), "dots": 2 * torch.minimum(along_x, along_y)}
