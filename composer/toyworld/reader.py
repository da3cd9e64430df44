"""The judge as it reads: the network's class probabilities checked against exact measures of the image, with an
explicit ``unsure`` where the evidence is weak — a concept counts as present only when a person would say so.

The network (:class:`composer.toyworld.judge.Judge`) is trained on the generator, whose images are cleaner than a
model's; on muddled model outputs it answers with confidence where a person sees nothing clear. The reader keeps
each answer only when the evidence for it passes thresholds fitted on images labelled by eye
(:mod:`composer.toyworld.calibration`): a probability floor per value, the character's fill hue against the
named colours with an unsure band between neighbours, and the styles' grids measured on the pixels.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch

from composer.toyworld.judge import JUDGE_FILE, Judge
from composer.toyworld.measures import block_mosaic, fill_hue, outline_darkness, periodic_energy
from composer.toyworld.world import ATTRIBUTES, COLOUR_NAMES, VOCABULARY

UNSURE = "unsure"
"""What the reader reports for an attribute whose evidence does not settle it; it never matches an expectation."""
CALIBRATION_FILE = "judge_calibration.json"


@dataclass
class Evidence:
    """Everything a reading rests on, per image: class probabilities per attribute and the exact measures."""

    probabilities: dict[str, torch.Tensor]
    hue: torch.Tensor
    purity: torch.Tensor
    pixels: torch.Tensor
    mosaic: torch.Tensor
    stripes: torch.Tensor
    dots: torch.Tensor
    outline: torch.Tensor

    @classmethod
    def from_rows(cls, rows: list[dict[str, Any]] | tuple[dict[str, Any], ...]) -> Evidence:
        """Evidence from :meth:`row` dicts (the inverse of :meth:`row`, one row per image)."""

        def column(key: str) -> torch.Tensor:
            return torch.tensor([row[key] for row in rows], dtype=torch.float32)

        return cls(
            probabilities={a: torch.tensor([row["probabilities"][a] for row in rows]) for a in ATTRIBUTES},
            hue=column("hue"),
            purity=column("purity"),
            pixels=column("pixels"),
            mosaic=column("mosaic"),
            stripes=column("stripes"),
            dots=column("dots"),
            outline=column("outline"),
        )

    def take(self, indices: list[int]) -> Evidence:
        """The evidence of the images at ``indices`` only, in that order."""
        measures = {f.name: getattr(self, f.name)[indices] for f in fields(self) if f.name != "probabilities"}
        return Evidence(probabilities={a: p[indices] for a, p in self.probabilities.items()}, **measures)

    def row(self, i: int) -> dict[str, Any]:
        """Image ``i``'s evidence as plain numbers (for fitting and for reports)."""
        return {
            "probabilities": {a: self.probabilities[a][i].tolist() for a in ATTRIBUTES},
            "hue": float(self.hue[i]),
            "purity": float(self.purity[i]),
            "pixels": float(self.pixels[i]),
            "mosaic": float(self.mosaic[i]),
            "stripes": float(self.stripes[i]),
            "dots": float(self.dots[i]),
            "outline": float(self.outline[i]),
        }


MIRRORED = ("shape", "object")
"""Attributes whose probabilities are the mean of the network's reading of the image and of its mirror image: a
mirror shows the same shape and object, and the two readings' slips differ. Not the style (the stripes run along one
diagonal only), nor the colour, background and clothing (on the labelled set, cross-fitted, the mirror gained
nothing there or ranked the answers worse)."""


def head_probabilities(
    network: Judge, pooled: dict[str, torch.Tensor], mirrored: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Class probabilities per attribute from the pooled features each head reads (:meth:`Judge.head_features`) of
    images and of their mirror images, the attributes in :data:`MIRRORED` averaged over both."""
    with torch.no_grad():
        probabilities = {}
        for attr, head in network.heads.items():
            p = head(pooled[attr]).softmax(1)
            probabilities[attr] = (p + head(mirrored[attr]).softmax(1)) / 2 if attr in MIRRORED else p
    return probabilities


FEATURE_CHUNK = 16
"""Images per trunk pass when reading: the activations of 16 images stay in a CPU's cache, which reads hundreds of
images about twice as fast on one thread as a single batch does, with the same numbers (the trunk treats each image
on its own)."""


def _pooled(network: Judge, images: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per attribute, the network's pooled features of ``images`` that its head reads, :data:`FEATURE_CHUNK` images
    at a time."""
    chunks = [network.head_features(chunk) for chunk in images.split(FEATURE_CHUNK)]
    joined: dict[str, torch.Tensor] = {}
    for attr in ATTRIBUTES:  # heads that read the same features share one concatenation
        twin = next((other for other in joined if chunks[0][other] is chunks[0][attr]), None)
        joined[attr] = joined[twin] if twin is not None else torch.cat([chunk[attr] for chunk in chunks])
    return joined


def gather_evidence(network: Judge, images: torch.Tensor) -> Evidence:
    """The network's probabilities and the measures for images (B, 3, 64, 64) in [0, 1]."""
    images = images.detach().float().cpu().clamp(0, 1)
    with torch.no_grad():
        pooled, mirrored = _pooled(network, images), _pooled(network, images.flip(3))
    fill = fill_hue(images)
    periodic = periodic_energy(images)
    return Evidence(
        probabilities=head_probabilities(network, pooled, mirrored),
        hue=fill["hue"],
        purity=fill["purity"],
        pixels=fill["pixels"],
        mosaic=block_mosaic(images),
        stripes=periodic["stripes"],
        dots=periodic["dots"],
        outline=outline_darkness(images),
    )


@dataclass
class Calibration:
    """The thresholds a reading applies (fitted on labelled model outputs; see :mod:`composer.toyworld.calibration`).

    ``floor[attr][value]``: the least network probability an answer of that value needs. ``boundaries``: the hue
    (degrees) of each boundary between neighbouring named colours; ``band``: the half-width of the unsure band around
    each; ``min_purity`` and ``min_pixels``: what a fill needs to be read at all; ``colour_rule``: how hue and
    network combine. ``style_needs``: for each style in :data:`STYLE_GATES`, the least measure it needs (``pixel``:
    mosaic ratio, ``striped`` and ``dots``: spectral share, ``outlined``: share of thin dark line).
    """

    floor: dict[str, dict[str, float]] = field(default_factory=lambda: {a: {} for a in ATTRIBUTES})
    boundaries: dict[str, float] = field(default_factory=dict)
    band: float = 0.0
    min_purity: float = 0.0
    min_pixels: float = 0.0
    style_needs: dict[str, float] = field(default_factory=dict)
    colour_rule: str = "agree"
    """``agree``: the colour is read only when the network and the measured hue name the same colour; ``hue``: the
    measured hue alone names it (the network is not asked), unsure where the hue cannot be read."""

    @classmethod
    def load(cls, path: Path) -> Calibration:
        """Read a calibration written by :meth:`save`."""
        return cls(**json.loads(path.read_text()))

    def save(self, path: Path) -> None:
        """Write this calibration as JSON."""
        path.write_text(json.dumps(self.__dict__, indent=1, sort_keys=True) + "\n")


def _hue_name(hue: float, calibration: Calibration) -> str:
    """The named colour whose hue range holds ``hue``, or :data:`UNSURE` inside a boundary's band. Ranges run
    between the calibrated boundaries of neighbouring colours around the hue circle."""
    order = sorted(calibration.boundaries.items(), key=lambda item: item[1])
    for i, (pair, boundary) in enumerate(order):
        if abs((hue - boundary + 180) % 360 - 180) <= calibration.band:
            return UNSURE
        start = boundary
        end = order[(i + 1) % len(order)][1]
        if (hue - start) % 360 < (end - start) % 360:
            return pair.split("|")[1]
    return UNSURE


STYLE_GATES = {"pixel": "mosaic", "striped": "stripes", "dots": "dots", "outlined": "outline"}
"""The measure each style needs: the pixel style's block mosaic, the stripes' and dots' grids in the spectrum, and
for a black outline thin dark lines that stand out from both their sides."""


def read_one(evidence: Evidence, i: int, calibration: Calibration) -> dict[str, str]:
    """Image ``i``'s reading: a value of each attribute's vocabulary, or :data:`UNSURE` (see :func:`read_column`)."""
    return read_all(evidence.take([i]), calibration)[0]


def read_all(evidence: Evidence, calibration: Calibration) -> list[dict[str, str]]:
    """Every image's reading (see :func:`read_column`)."""
    columns = {attr: read_column(evidence, calibration, attr) for attr in ATTRIBUTES}
    return [{attr: columns[attr][i] for attr in ATTRIBUTES} for i in range(len(columns[ATTRIBUTES[0]]))]


def read_column(evidence: Evidence, calibration: Calibration, attr: str) -> list[str]:
    """Every image's reading of one attribute: a value of its vocabulary, or :data:`UNSURE`.

    The attribute takes the network's most probable value if its probability reaches that value's floor. A style
    whose measure falls short of what the calibration needs is ruled out (the grid, the mosaic or the dark lines
    that would make it are not in the image) and the most probable of the styles left is read, under the same
    floors. The colour must also be the named colour of the measured fill hue (outside the unsure bands), or under
    the ``hue`` rule is that name alone."""
    if attr == "colour" and calibration.boundaries and calibration.colour_rule == "hue":
        return _measured_colours(evidence, calibration)
    p = evidence.probabilities[attr].double().clone()
    if attr == "style":
        for style, measure in STYLE_GATES.items():
            need = calibration.style_needs.get(style)
            if need is not None:
                ruled_out = getattr(evidence, measure).double() < need
                p[ruled_out, VOCABULARY["style"].index(style)] = -1.0
    top, best = p.max(1)
    floors = torch.tensor([calibration.floor.get(attr, {}).get(v, 0.0) for v in VOCABULARY[attr]], dtype=p.dtype)
    values = [VOCABULARY[attr][b] if ok else UNSURE for b, ok in zip(best.tolist(), (top >= floors[best]).tolist())]
    if attr == "colour" and calibration.boundaries:
        measured = _measured_colours(evidence, calibration)
        values = [value if value == seen else UNSURE for value, seen in zip(values, measured)]
    return values


def _measured_colours(evidence: Evidence, calibration: Calibration) -> list[str]:
    """The named colour of each image's measured fill hue, or :data:`UNSURE` where the fill cannot be read."""
    readable = (
        (evidence.hue == evidence.hue)
        & (evidence.purity.double() >= calibration.min_purity)
        & (evidence.pixels.double() >= calibration.min_pixels)
    ).tolist()
    return [_hue_name(hue, calibration) if ok else UNSURE for hue, ok in zip(evidence.hue.tolist(), readable)]


class Reader:
    """The shipped judge: network plus measures plus calibration. ``read`` returns per image a dict of attribute →
    value or :data:`UNSURE`."""

    def __init__(self, network: Judge, calibration: Calibration) -> None:
        self.network = network
        self.calibration = calibration

    @classmethod
    def load(cls, folder: Path) -> Reader:
        """The judge whose network (``judge.safetensors``) and calibration (``judge_calibration.json``) are in
        ``folder``: the shipped weights, or a folder ``calibrate --weights`` wrote."""
        return cls(Judge.load(folder / JUDGE_FILE), Calibration.load(folder / CALIBRATION_FILE))

    def evidence(self, images: torch.Tensor) -> Evidence:
        """See :func:`gather_evidence`."""
        return gather_evidence(self.network, images)

    def read(self, images: torch.Tensor) -> list[dict[str, str]]:
        """What the judge is sure it sees in each image (B, 3, 64, 64) in [0, 1]; :data:`UNSURE` elsewhere."""
        evidence = self.evidence(images)
        return read_all(evidence, self.calibration)


def colour_names() -> tuple[str, ...]:
    """The named colours in hue order (the order their boundaries run in)."""
    from composer.toyworld.measures import NAMED_HUES

    return tuple(sorted(COLOUR_NAMES, key=lambda name: NAMED_HUES[name]))
