"""The toy world: a seeded procedural generator of captioned 64×64 scenes with five kinds of element.

Every scene has a character (a shape with a colour and two eyes), a background, and optionally something the
character wears (clothing), a small second item (object) and a whole-image style. The five kinds mirror the
categories of community LoRAs (character, clothing, style, background, object), so composition methods can be
judged on it exactly: the renderer knows what it drew.

The vocabulary is split in two. The *base* vocabulary is what the base model ``toy-sd`` is trained on; the
*held-out* concepts (new characters, clothing, styles, backgrounds and objects, each with an invented trigger word)
never appear in its training data and are taught to it by LoRAs. Rendering is vectorised in torch over a batch
(a shape mask per pixel from closed-form inside tests at 2× resolution, box-filtered down), so training data is
drawn on the training device at no cost instead of being stored.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

IMAGE_SIZE = 64
"""Side of every rendered image, in pixels."""

_SUPERSAMPLE = 2

SHAPES = ("circle", "square", "triangle", "star", "cross", "crescent")
COLOURS = {
    "red": (220, 40, 40),
    "blue": (40, 80, 225),
    "green": (30, 150, 50),
    "yellow": (245, 205, 30),
    "purple": (140, 50, 200),
    "orange": (250, 130, 20),
    "cyan": (30, 200, 210),
}
COLOUR_NAMES = tuple(COLOURS)
CLOTHING = ("none", "hat", "scarf", "crown", "sunglasses")
STYLES = ("none", "striped", "outlined", "pixel", "dots")
BACKGROUNDS = ("sky", "grass", "night", "snow", "sunset", "forest")
OBJECTS = ("none", "ball", "box", "flower", "mushroom")

ATTRIBUTES = ("background", "shape", "colour", "clothing", "style", "object")
"""What the judge reads from an image, in order; each is a class index into its vocabulary below."""

VOCABULARY: dict[str, tuple[str, ...]] = {
    "background": BACKGROUNDS,
    "shape": SHAPES,
    "colour": COLOUR_NAMES,
    "clothing": CLOTHING,
    "style": STYLES,
    "object": OBJECTS,
}

BASE_SHAPES = ("circle", "square", "triangle")
BASE_COLOURS = ("red", "blue", "green", "yellow")
BASE_CLOTHING = ("none", "hat", "scarf")
BASE_STYLES = ("none", "striped", "outlined")
BASE_BACKGROUNDS = ("sky", "grass", "night", "snow")
BASE_OBJECTS = ("none", "ball", "box")


@dataclass(frozen=True)
class Concept:
    """A held-out concept: what it sets in a scene, the trigger word that names it, and how captions say it."""

    name: str
    category: str
    trigger: str
    phrase: str
    sets: dict[str, str] = field(default_factory=dict)
    description: str = ""


HELD_OUT: tuple[Concept, ...] = (
    Concept("zorbex", "character", "zorbex", "zorbex", {"shape": "star", "colour": "purple"}, "a purple star creature"),
    Concept(
        "kiboko", "character", "kiboko", "kiboko", {"shape": "cross", "colour": "orange"}, "an orange cross creature"
    ),
    Concept(
        "lunari", "character", "lunari", "lunari", {"shape": "crescent", "colour": "cyan"}, "a cyan crescent creature"
    ),
    Concept("crown", "clothing", "krwn", "a krwn crown", {"clothing": "crown"}, "a golden crown"),
    Concept("sunglasses", "clothing", "shdz", "shdz sunglasses", {"clothing": "sunglasses"}, "black sunglasses"),
    Concept("pixel_art", "style", "pxlart", "pxlart pixel art", {"style": "pixel"}, "blocky pixel-art style"),
    Concept("polka_dots", "style", "dotz", "dotz polka dots", {"style": "dots"}, "white polka-dot overlay style"),
    Concept("sunset", "background", "snst", "at a snst sunset", {"background": "sunset"}, "an orange-pink sunset sky"),
    Concept("forest", "background", "frst", "in a frst forest", {"background": "forest"}, "a dark forest with trunks"),
    Concept("flower", "object", "flwr", "a flwr flower", {"object": "flower"}, "a small yellow flower"),
    Concept("mushroom", "object", "mshrm", "a mshrm mushroom", {"object": "mushroom"}, "a small violet mushroom"),
)
"""The concepts the base model never sees: three characters and two of every other kind, one LoRA each."""

CONCEPTS = {concept.name: concept for concept in HELD_OUT}

OTHER_CATEGORIES = ("clothing", "style", "background", "object")
"""The categories composed around a character (ComposLoRA's protocol), in a fixed order."""


def concepts_by_category(names: list[str]) -> dict[str, list[Concept]]:
    """The named held-out concepts grouped by category, in the order given."""
    grouped: dict[str, list[Concept]] = {}
    for name in names:
        grouped.setdefault(CONCEPTS[name].category, []).append(CONCEPTS[name])
    return grouped


_BACKGROUND_PHRASES = {
    "sky": ("under a blue sky", "in the sky"),
    "grass": ("on the grass", "in a green meadow"),
    "night": ("at night", "under a night sky"),
    "snow": ("in the snow", "on a snowy field"),
}
_STYLE_PHRASES = {"striped": ("striped", "with stripes"), "outlined": ("outlined", "with a black outline")}
_CLOTHING_PHRASES = {"hat": "a hat", "scarf": "a scarf"}
_OBJECT_PHRASES = {"ball": "a ball", "box": "a box"}


@dataclass(frozen=True)
class Scene:
    """One scene's content, by name. Layout (position, size) is drawn separately by the renderer's generator."""

    background: str
    shape: str
    colour: str
    clothing: str = "none"
    style: str = "none"
    object: str = "none"

    def labels(self) -> tuple[int, ...]:
        """Class indices in :data:`ATTRIBUTES` order, as the judge reports them."""
        return tuple(VOCABULARY[attr].index(getattr(self, attr)) for attr in ATTRIBUTES)

    def with_concepts(self, *concepts: Concept) -> Scene:
        """This scene with each concept's settings applied."""
        values = {attr: getattr(self, attr) for attr in ATTRIBUTES}
        for concept in concepts:
            values.update(concept.sets)
        return Scene(**values)


def sample_scene(rng: random.Random, *, optional: float = 0.5) -> Scene:
    """A random scene of the base vocabulary; clothing, style and object each appear with probability ``optional``."""

    def pick(options: tuple[str, ...]) -> str:
        return rng.choice(options)

    def maybe(options: tuple[str, ...]) -> str:
        return pick(options[1:]) if rng.random() < optional else "none"

    return Scene(
        background=pick(BASE_BACKGROUNDS),
        shape=pick(BASE_SHAPES),
        colour=pick(BASE_COLOURS),
        clothing=maybe(BASE_CLOTHING),
        style=maybe(BASE_STYLES),
        object=maybe(BASE_OBJECTS),
    )


def caption(scene: Scene, rng: random.Random, concepts: tuple[Concept, ...] = ()) -> str:
    """One of several phrasings of the scene; held-out elements are named by their concepts' trigger phrases."""
    by_category = {concept.category: concept for concept in concepts}

    def choose(options: tuple[str, ...]) -> str:
        return rng.choice(options)

    if "character" in by_category:
        character = by_category["character"].phrase
    else:
        character = choose((f"a {scene.colour} {scene.shape}", f"a {scene.colour} {scene.shape} creature"))
    parts_after: list[str] = []
    if "clothing" in by_category:
        parts_after.append(f"wearing {by_category['clothing'].phrase}")
    elif scene.clothing != "none":
        parts_after.append(choose(("wearing ", "with ")) + _CLOTHING_PHRASES[scene.clothing])
    background = (
        by_category["background"].phrase
        if "background" in by_category
        else choose(_BACKGROUND_PHRASES[scene.background])
    )
    obj = ""
    if "object" in by_category:
        obj = choose(("next to ", "and ", "beside ")) + by_category["object"].phrase
    elif scene.object != "none":
        obj = choose(("next to ", "and ", "beside ")) + _OBJECT_PHRASES[scene.object]
    style = ""
    if "style" in by_category:
        style = by_category["style"].phrase
    elif scene.style != "none":
        style = choose(_STYLE_PHRASES[scene.style])
    subject = " ".join([character, *parts_after])
    order = rng.randrange(3)
    if order == 0:
        words = [subject, obj, background]
    elif order == 1:
        words = [subject, background, obj]
    else:
        words = [background + ",", subject, obj]
    text = " ".join(w for w in words if w)
    return f"{text}, {style}" if style else text


# --- rendering ----------------------------------------------------------------------------------------------------


@dataclass
class Layout:
    """Per-sample placement, as tensors of shape (B,): character centre and half-size, object centre, sky stars."""

    cx: torch.Tensor
    cy: torch.Tensor
    size: torch.Tensor
    ox: torch.Tensor
    oy: torch.Tensor
    seed: torch.Tensor


def sample_layout(batch: int, rng: torch.Generator) -> Layout:
    """Random placements within the ranges every element stays visible in (pixel units of a 64² image)."""

    def uniform(low: float, high: float) -> torch.Tensor:
        return low + (high - low) * torch.rand(batch, generator=rng)

    left = torch.rand(batch, generator=rng) < 0.5
    return Layout(
        cx=uniform(28, 36),
        cy=uniform(31, 37),
        size=uniform(12, 14.5),
        ox=torch.where(left, uniform(8, 11), uniform(53, 56)),
        oy=uniform(51, 55),
        seed=torch.randint(0, 2**30, (batch,), generator=rng),
    )


def _grid(batch: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Pixel-centre coordinates at the supersampled resolution, in 64² pixel units: x, y of shape (1, H, W)."""
    n = IMAGE_SIZE * _SUPERSAMPLE
    coords = (torch.arange(n, device=device, dtype=torch.float32) + 0.5) / _SUPERSAMPLE
    y, x = torch.meshgrid(coords, coords, indexing="ij")
    return x[None], y[None]


def _shape_masks(u: torch.Tensor, v: torch.Tensor) -> dict[str, torch.Tensor]:
    """Inside tests of every character shape in local coordinates (unit half-size, y pointing down)."""
    r = torch.sqrt(u * u + v * v)
    theta = torch.atan2(v, u) + math.pi / 2
    phase = torch.remainder(5 * theta / (2 * math.pi), 1.0)
    star_radius = 0.45 + 0.6 * (1 - torch.abs(2 * phase - 1))
    return {
        "circle": r <= 1.0,
        "square": (u.abs() <= 0.85) & (v.abs() <= 0.85),
        "triangle": (v <= 0.8) & (v >= -1.0) & (u.abs() <= (v + 1.0) / 1.8 * 1.05),
        "star": r <= star_radius,
        "cross": ((u.abs() <= 0.34) & (v.abs() <= 1.0)) | ((v.abs() <= 0.34) & (u.abs() <= 1.0)),
        "crescent": (r <= 1.0) & ((u - 0.45) ** 2 + (v + 0.3) ** 2 > 0.72**2),
    }


def _clothing_masks(u: torch.Tensor, v: torch.Tensor) -> dict[str, tuple[torch.Tensor, tuple[int, int, int]]]:
    """Masks and colours of every clothing item in the character's local coordinates."""
    hat = ((u.abs() <= 0.62) & (v >= -1.08) & (v <= -0.92)) | ((u.abs() <= 0.38) & (v >= -1.6) & (v <= -1.08))
    scarf = ((u.abs() <= 0.8) & (v >= 0.22) & (v <= 0.48)) | (((u - 0.5).abs() <= 0.13) & (v >= 0.48) & (v <= 0.9))
    teeth = torch.abs(torch.remainder((u + 0.55) / 1.1 * 3, 1.0) * 2 - 1)
    crown = (u.abs() <= 0.55) & (((v >= -1.15) & (v <= -0.88)) | ((v < -1.15) & (-1.15 - v <= 0.45 * (1 - teeth))))
    lens = ((u - 0.32) ** 2 + (v + 0.2) ** 2 <= 0.24**2) | ((u + 0.32) ** 2 + (v + 0.2) ** 2 <= 0.24**2)
    glasses = lens | ((u.abs() <= 0.34) & ((v + 0.2).abs() <= 0.05)) | ((u.abs() <= 0.75) & ((v + 0.28).abs() <= 0.04))
    return {
        "hat": (hat, (20, 20, 20)),
        "scarf": (scarf, (245, 245, 245)),
        "crown": (crown, (255, 196, 0)),
        "sunglasses": (glasses, (10, 10, 10)),
    }


def _object_layers(u: torch.Tensor, v: torch.Tensor) -> dict[str, list[tuple[torch.Tensor, tuple[int, int, int]]]]:
    """Each object as painted layers (mask, colour), back to front, in its local coordinates (unit half-size)."""
    r2 = u * u + v * v
    petals = torch.zeros_like(u, dtype=torch.bool)
    for du, dv in ((0.5, -0.1), (-0.5, -0.1), (0.0, -0.6), (0.0, 0.4)):
        petals |= (u - du) ** 2 + (v - dv) ** 2 <= 0.42**2
    return {
        "ball": [(r2 <= 1.0, (245, 245, 245)), ((r2 <= 1.0) & (v < 0), (215, 30, 30))],
        "box": [
            ((u.abs() <= 0.9) & (v.abs() <= 0.9), (90, 55, 20)),
            ((u.abs() <= 0.7) & (v.abs() <= 0.7), (160, 105, 45)),
        ],
        "flower": [
            ((u.abs() <= 0.1) & (v >= 0) & (v <= 1.1), (40, 140, 40)),
            (petals, (250, 220, 50)),
            ((u * u + (v + 0.1) ** 2) <= 0.22**2, (225, 100, 20)),
        ],
        "mushroom": [
            ((u.abs() <= 0.3) & (v >= -0.1) & (v <= 0.95), (240, 235, 220)),
            ((r2 <= 1.0) & (v <= 0.0), (120, 45, 175)),
            (
                (((u - 0.4) ** 2 + (v + 0.4) ** 2) <= 0.13**2) | (((u + 0.35) ** 2 + (v + 0.6) ** 2) <= 0.12**2),
                (250, 250, 250),
            ),
        ],
    }


def _colour(rgb: tuple[int, int, int], device: torch.device) -> torch.Tensor:
    return torch.tensor(rgb, dtype=torch.float32, device=device).view(3, 1, 1) / 255.0


def _gradient(y: torch.Tensor, top: tuple[int, int, int], bottom: tuple[int, int, int]) -> torch.Tensor:
    """A vertical blend from ``top`` to ``bottom`` over the image, (1, 3, H, W) at the supersampled resolution."""
    t = (y / IMAGE_SIZE)[:, None]
    return _colour(top, y.device) * (1 - t) + _colour(bottom, y.device) * t


def _plain_backgrounds(x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
    """Every background that looks the same in every sample, (1, 3, H, W) each (the night sky's stars differ)."""
    device = x.device
    sky = _gradient(y, (120, 180, 250), (185, 220, 255))
    ground = (y >= 44)[:, None]
    trunks = (torch.remainder(x + 2, 12) < 4)[:, None]
    return {
        "sky": sky,
        "grass": torch.where(ground, _colour((95, 185, 70), device).expand_as(sky), sky),
        "snow": torch.where(ground, _colour((250, 250, 252), device), _gradient(y, (205, 212, 225), (225, 230, 240))),
        "sunset": _gradient(y, (250, 140, 50), (235, 70, 150)),
        "forest": torch.where(trunks, _colour((70, 45, 25), device), _gradient(y, (20, 70, 35), (35, 100, 45))),
    }


def _night(x: torch.Tensor, y: torch.Tensor, seeds: torch.Tensor) -> torch.Tensor:
    """The night sky for samples with these star ``seeds`` (b,), (b, 3, H, W): a per-sample pseudo-random sprinkle
    of small dots from an integer hash of the pixel's cell."""
    device = x.device
    cell = (torch.div(x, 6, rounding_mode="floor") * 97 + torch.div(y, 6, rounding_mode="floor") * 31).long()
    hashed = torch.remainder(cell * 2654435761 + seeds.view(-1, 1, 1).to(device) * 40503, 2**31) % 11
    in_cell = (torch.remainder(x, 6) - 3) ** 2 + (torch.remainder(y, 6) - 3) ** 2 <= 0.9
    stars = ((hashed == 0) & in_cell)[:, None]
    return torch.where(stars, _colour((235, 235, 250), device), _gradient(y, (15, 18, 50), (30, 35, 80)))


def _paint_backgrounds(x: torch.Tensor, y: torch.Tensor, chosen: torch.Tensor, seeds: torch.Tensor) -> torch.Tensor:
    """Each sample's background (class indices ``chosen`` into BACKGROUNDS), (B, 3, H, W) at the supersampled
    resolution. Backgrounds that look the same in every sample are drawn once and copied; the night sky only for the
    samples that show it."""
    plain = _plain_backgrounds(x, y)
    blank = torch.zeros_like(plain["sky"])
    image = torch.cat([plain.get(name, blank) for name in BACKGROUNDS]).index_select(0, chosen)
    at_night = (chosen == BACKGROUNDS.index("night")).nonzero().flatten()
    if len(at_night):
        image[at_night] = _night(x, y, seeds[at_night.cpu()])
    return image


def _index(names: list[str], vocabulary: tuple[str, ...], device: torch.device) -> torch.Tensor:
    return torch.tensor([vocabulary.index(n) for n in names], device=device)


def _select(options: dict[str, torch.Tensor], chosen: torch.Tensor, vocabulary: tuple[str, ...]) -> torch.Tensor:
    """Per sample, the entry of ``options`` named by ``chosen`` (class indices into ``vocabulary``)."""
    out = torch.zeros_like(next(iter(options.values())))
    for i, name in enumerate(vocabulary):
        if name in options:
            pick = (chosen == i).view(-1, *([1] * (out.dim() - 1)))
            out = torch.where(pick, options[name], out)
    return out


def render(
    scenes: list[Scene], layout: Layout, device: torch.device | str = "cpu", fills: torch.Tensor | None = None
) -> torch.Tensor:
    """Draw the scenes: a float tensor (B, 3, 64, 64) in [0, 1]. Deterministic given scenes and layout.
    ``fills`` (B, 3) in [0, 1], when given, paints each character instead of its named colour."""
    device = torch.device(device)
    batch = len(scenes)
    x, y = _grid(batch, device)
    size = layout.size.to(device).view(-1, 1, 1)
    u = (x - layout.cx.to(device).view(-1, 1, 1)) / size
    v = (y - layout.cy.to(device).view(-1, 1, 1)) / size

    image = _paint_backgrounds(x, y, _index([s.background for s in scenes], BACKGROUNDS, device), layout.seed)
    body = _select(
        {k: m[:, None] for k, m in _shape_masks(u, v).items()},
        _index([s.shape for s in scenes], SHAPES, device),
        SHAPES,
    )
    if fills is None:
        colours = torch.stack([_colour(COLOURS[s.colour], device) for s in scenes])
    else:
        colours = fills.to(device=device, dtype=torch.float32).view(batch, 3, 1, 1)
    image = torch.where(body, colours, image)
    eyes = ((u - 0.32) ** 2 + (v + 0.2) ** 2 <= 0.13**2) | ((u + 0.32) ** 2 + (v + 0.2) ** 2 <= 0.13**2)
    image = torch.where(eyes[:, None] & body, _colour((15, 15, 15), device), image)
    figure = body.clone()

    clothing = _index([s.clothing for s in scenes], CLOTHING, device)
    for i, (name, (mask, rgb)) in enumerate(_clothing_masks(u, v).items(), start=1):
        assert CLOTHING[i] == name
        paint = mask[:, None] & (clothing == i).view(-1, 1, 1, 1)
        image = torch.where(paint, _colour(rgb, device), image)
        figure |= paint

    osize = 6.5
    ou = (x - layout.ox.to(device).view(-1, 1, 1)) / osize
    ov = (y - layout.oy.to(device).view(-1, 1, 1)) / osize
    objects = _index([s.object for s in scenes], OBJECTS, device)
    for i, (name, layers) in enumerate(_object_layers(ou, ov).items(), start=1):
        assert OBJECTS[i] == name
        chosen = (objects == i).view(-1, 1, 1, 1)
        for mask, rgb in layers:
            paint = mask[:, None] & chosen
            image = torch.where(paint, _colour(rgb, device), image)
            figure |= paint

    styles = _index([s.style for s in scenes], STYLES, device).view(-1, 1, 1, 1)
    grown = F.max_pool2d(figure.float(), 2 * _SUPERSAMPLE + 1, stride=1, padding=_SUPERSAMPLE) > 0
    image = torch.where((styles == STYLES.index("outlined")) & grown & ~figure, _colour((0, 0, 0), device), image)

    image = F.avg_pool2d(image, _SUPERSAMPLE)
    small_x = F.avg_pool2d(x[None], _SUPERSAMPLE)[0]
    small_y = F.avg_pool2d(y[None], _SUPERSAMPLE)[0]
    stripes = (torch.remainder(small_x + small_y, 8) < 4)[None]
    image = torch.where((styles == STYLES.index("striped")) & stripes, image * 0.55, image)
    pixelated = F.interpolate(F.avg_pool2d(image, 4), scale_factor=4, mode="nearest")
    image = torch.where(styles == STYLES.index("pixel"), pixelated, image)
    dots = ((torch.remainder(small_x, 8) - 4) ** 2 + (torch.remainder(small_y, 8) - 4) ** 2 <= 2.3)[None]
    image = torch.where((styles == STYLES.index("dots")) & dots, image * 0.25 + 0.75, image)
    return image.clamp(0, 1)
