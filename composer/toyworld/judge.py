"""The judge: a small CNN that reads every attribute of a toy-world image (background, shape, colour, clothing,
style, object), trained on the generator with augmentations that make it robust to a model's output.

The generator knows what it drew, so the judge's training labels are exact; blur, desaturation, colour jitter,
noise, small shifts and a round trip through the model's own autoencoder stand in for the ways a generated image
departs from a rendered one. ``Judge.read`` returns class names, ``Judge.check`` compares against a scene.
"""

from __future__ import annotations

import math
import random
from copy import deepcopy
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from composer.toyworld.data import WorldRandom
from composer.toyworld.world import ATTRIBUTES, COLOUR_NAMES, COLOURS, VOCABULARY, Scene, render, sample_layout
from fusion.errors import TrainingError

JUDGE_FILE = "judge.safetensors"
"""The shipped network: trained on the generator, its heads then fine-tuned on the labelled set."""
GENERATOR_JUDGE_FILE = "judge_generator.safetensors"
"""The network as trained on the generator alone: where every fine-tune on labelled images starts from."""


def sample_any_scene(rng: random.Random) -> Scene:
    """A scene drawn uniformly from the WHOLE vocabulary (held-out concepts included): the judge must read all."""
    return Scene(**{attr: rng.choice(VOCABULARY[attr]) for attr in ATTRIBUTES})


class Judge(nn.Module):
    """Six classification heads over a shared convolutional trunk (64² RGB in [0, 1]).

    Where the trunk's last blocks were tuned on model outputs, the heads named in ``kept_for`` can keep reading a copy
    of those blocks as the generator trained them (``kept_tail``): a tuned block reads muddled model outputs more as a
    person does but forgets part of the generator's world (a style plainly drawn), and one head can keep that world
    while the others gain."""

    def __init__(self, width: int = 48, kept_blocks: int = 0, kept_for: tuple[str, ...] = ()) -> None:
        super().__init__()
        _check_kept(kept_blocks, kept_for)

        def block(cin: int, cout: int, stride: int) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1), nn.GroupNorm(8, cout), nn.SiLU())

        w = width
        self.trunk = nn.Sequential(
            block(3, w, 1), block(w, w, 1), block(w, 2 * w, 2), block(2 * w, 2 * w, 1),
            block(2 * w, 4 * w, 2), block(4 * w, 4 * w, 1), block(4 * w, 4 * w, 2),
        )  # fmt: skip
        self.heads = nn.ModuleDict({attr: nn.Linear(8 * w, len(VOCABULARY[attr])) for attr in ATTRIBUTES})
        if kept_blocks >= len(self.trunk):
            raise TrainingError(
                f"kept_blocks {kept_blocks} must be less than the trunk's {len(self.trunk)} blocks",
                hint="1 keeps the last block",
            )
        self.kept_for = tuple(kept_for)
        self.kept_tail = deepcopy(self.last_blocks(kept_blocks)) if kept_blocks else None

    @property
    def kept_blocks(self) -> int:
        """How many of the trunk's last blocks the heads in ``kept_for`` read as the generator trained them."""
        return len(self.kept_tail) if self.kept_tail is not None else 0

    def head_features(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per attribute, the pooled features (B, 8 × width) its head reads, for images (B, 3, 64, 64) in [0, 1]."""
        return self.head_features_from_maps(self.entering(images, self.kept_blocks), self.kept_blocks)

    def head_features_from_maps(self, maps: torch.Tensor, blocks: int) -> dict[str, torch.Tensor]:
        """Per attribute, the pooled features its head reads, from the maps entering the trunk's last ``blocks``
        blocks (at least as many as the kept tail has, at most the whole trunk)."""
        kept = self.kept_blocks
        if not kept <= blocks <= len(self.trunk):
            raise TrainingError(
                f"maps entering the last {blocks} blocks cannot feed this judge",
                hint=f"give between {kept} (its kept tail) and {len(self.trunk)} (the whole trunk)",
            )
        shared = self.trunk[len(self.trunk) - blocks : len(self.trunk) - kept](maps)
        tuned = self.pool(self.last_blocks(kept)(shared))
        held = self.pool(self.kept_tail(shared)) if self.kept_tail is not None else tuned
        return {attr: held if attr in self.kept_for else tuned for attr in ATTRIBUTES}

    def entering(self, images: torch.Tensor, blocks: int = 0) -> torch.Tensor:
        """The maps that enter the trunk's last ``blocks`` blocks (its output where ``blocks`` is 0), for images
        (B, 3, 64, 64) in [0, 1]."""
        return self.trunk[: len(self.trunk) - blocks](images * 2 - 1)

    def last_blocks(self, blocks: int) -> nn.Sequential:
        """The trunk's last ``blocks`` blocks (none where ``blocks`` is 0: the maps pass through unchanged)."""
        return self.trunk[len(self.trunk) - blocks :]

    @staticmethod
    def pool(maps: torch.Tensor) -> torch.Tensor:
        """The trunk's output maps (B, C, H, W) pooled as the heads read them: mean and max over space (B, 2C)."""
        return torch.cat([maps.mean((2, 3)), maps.amax((2, 3))], dim=1)

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Logits per attribute for images (B, 3, 64, 64) in [0, 1]."""
        pooled = self.head_features(images)
        return {attr: head(pooled[attr]) for attr, head in self.heads.items()}

    @torch.no_grad()
    def read(self, images: torch.Tensor) -> list[dict[str, str]]:
        """The attribute names the judge sees in each image."""
        logits = self(images.to(next(self.parameters()).device, torch.float32))
        chosen = {attr: value.argmax(1).tolist() for attr, value in logits.items()}
        return [{attr: VOCABULARY[attr][chosen[attr][i]] for attr in ATTRIBUTES} for i in range(images.shape[0])]

    def save(self, path: Path) -> None:
        """Write the weights as safetensors with the width (and any kept tail's size and heads) in the header."""
        from safetensors.torch import save_file

        metadata = {"width": str(self.trunk[0][0].out_channels)}
        if self.kept_tail is not None:
            metadata |= {"kept_blocks": str(self.kept_blocks), "kept_for": ",".join(self.kept_for)}
        save_file({k: v.contiguous() for k, v in self.state_dict().items()}, str(path), metadata=metadata)

    @classmethod
    def load(cls, path: Path) -> Judge:
        """A judge from :meth:`save`'s file, in eval mode on CPU."""
        from safetensors import safe_open
        from safetensors.torch import load_file

        with safe_open(str(path), "pt") as handle:
            header = handle.metadata()
        kept_for = tuple(name for name in header.get("kept_for", "").split(",") if name)
        judge = cls(int(header["width"]), int(header.get("kept_blocks", 0)), kept_for)
        judge.load_state_dict(load_file(str(path)))
        return judge.eval()


def augment(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Blur, desaturation, brightness/contrast jitter, noise and a small shift, each drawn per image."""
    b = images.shape[0]
    device = images.device

    def draw(low: float, high: float) -> torch.Tensor:
        return (low + (high - low) * torch.rand(b, 1, 1, 1, generator=generator)).to(device)

    sigma = float(torch.rand((), generator=generator)) * 1.2
    if sigma > 0.2:
        radius = max(1, math.ceil(2 * sigma))
        xs = torch.arange(-radius, radius + 1, dtype=torch.float32, device=device)
        kernel = torch.exp(-(xs**2) / (2 * sigma**2))
        kernel = kernel / kernel.sum()
        images = F.conv2d(
            F.pad(images, (radius, radius, 0, 0), mode="replicate"),
            kernel.view(1, 1, 1, -1).repeat(3, 1, 1, 1),
            groups=3,
        )
        images = F.conv2d(
            F.pad(images, (0, 0, radius, radius), mode="replicate"),
            kernel.view(1, 1, -1, 1).repeat(3, 1, 1, 1),
            groups=3,
        )
    grey = images.mean(1, keepdim=True)
    images = images + (grey - images) * draw(0.0, 0.35)
    mean = images.mean((1, 2, 3), keepdim=True)
    images = (images - mean) * draw(0.8, 1.2) + mean + draw(-0.1, 0.1)
    images = images + torch.randn(images.shape, generator=generator).to(device) * draw(0.0, 0.06)
    shift = [int(s) for s in torch.randint(-2, 3, (2,), generator=generator)]
    images = torch.roll(images, shifts=shift, dims=(2, 3))
    return images.clamp(0, 1)


def drifted_fills(
    scenes: list[Scene], drift: float, generator: torch.Generator, share: float = 1.0
) -> tuple[torch.Tensor, list[str]]:
    """A ``share`` of the scenes (each drawn at random) with the character fill moved from its named colour towards
    one of the two named colours nearest to it (RGB), picked at random, by a fraction drawn up to ``drift``; the rest
    keep their named colour. As (B, 3) in [0, 1], with the name of the named colour nearest to each fill.

    Models draw in-between fills (an orange cross drifting amber); trained on these, the judge reads such a fill as
    the colour it is nearest to, instead of wherever its training happened to put the boundary between two colours.
    Only neighbours are targets: a fill on the way to a far colour passes near others, which is not how models err.
    """
    table = torch.tensor([COLOURS[name] for name in COLOUR_NAMES], dtype=torch.float32)
    distances = torch.cdist(table, table)
    distances.fill_diagonal_(float("inf"))
    neighbours = distances.topk(2, largest=False).indices
    own = torch.tensor([COLOUR_NAMES.index(scene.colour) for scene in scenes])
    pick = torch.randint(0, 2, (len(scenes),), generator=generator)
    other = neighbours[own, pick]
    fraction = torch.rand(len(scenes), 1, generator=generator) * drift
    if share < 1:
        fraction = fraction * (torch.rand(len(scenes), 1, generator=generator) < share)
    fills = table[own] + (table[other] - table[own]) * fraction
    nearest = torch.cdist(fills, table).argmin(1)
    return fills / 255, [COLOUR_NAMES[int(i)] for i in nearest]


def train_judge(
    steps: int = 3000,
    batch: int = 128,
    seed: int = 0,
    vae: torch.nn.Module | None = None,
    device: str | torch.device | None = None,
    lr: float = 2e-3,
    init: Judge | None = None,
    decoded_every: int = 3,
    colour_drift: float = 0.0,
    colour_drift_share: float = 1.0,
) -> Judge:
    """Train a judge on augmented generator images (and, when ``vae`` is given, its reconstructions on every
    ``decoded_every``-th step: generated images are decoded latents), from scratch or, given ``init``, onward from
    a copy of it (after the world changes, a fine-tune instead of a new run). ``colour_drift`` > 0 paints the
    characters (a ``colour_drift_share`` of them) with :func:`drifted_fills` and labels them with the nearest named
    colour."""
    if decoded_every < 1:
        raise TrainingError(
            f"decoded_every {decoded_every} must be at least 1", hint="3 trains on a round trip every third step"
        )
    if not 0 <= colour_drift < 1:
        raise TrainingError(
            f"colour_drift {colour_drift} must be in [0, 1)", hint="0 paints every character in its named colour"
        )
    if not 0 < colour_drift_share <= 1:
        raise TrainingError(
            f"colour_drift_share {colour_drift_share} must be in (0, 1]", hint="1 drifts every character's fill"
        )
    if colour_drift == 0 and colour_drift_share != 1:
        raise TrainingError(
            f"colour_drift_share {colour_drift_share} has no effect without a colour_drift",
            hint="give colour_drift > 0 (e.g. 0.5) too, or leave the share at 1",
        )
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    rng = WorldRandom(seed)
    judge = Judge().to(device)
    if init is not None:
        judge.load_state_dict(init.state_dict())
    optimizer = torch.optim.AdamW(judge.parameters(), lr=lr, weight_decay=1e-4)
    for step in tqdm(range(steps), desc="judge", mininterval=5):
        scenes = [sample_any_scene(rng.content) for _ in range(batch)]
        layout = sample_layout(batch, rng.layout)
        fills = None
        if colour_drift:
            fills, colours = drifted_fills(scenes, colour_drift, rng.layout, colour_drift_share)
            scenes = [replace(scene, colour=colour) for scene, colour in zip(scenes, colours)]
        images = render(scenes, layout, device, fills=fills)
        if vae is not None and step % decoded_every == 0:
            with torch.no_grad():
                latents = vae.encode(images * 2 - 1).latent_dist.sample()
                images = (vae.decode(latents).sample.float() / 2 + 0.5).clamp(0, 1)
        images = augment(images, rng.layout)
        labels = torch.tensor([s.labels() for s in scenes], device=device)
        for group in optimizer.param_groups:
            group["lr"] = lr * 0.5 * (1 + math.cos(math.pi * step / steps))
        logits = judge(images)
        loss = sum(F.cross_entropy(logits[attr], labels[:, i]) for i, attr in enumerate(ATTRIBUTES))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return judge.eval().cpu()


def judge_accuracy(judge: Judge, count: int = 1000, seed: int = 12345) -> dict[str, float]:
    """Per-attribute accuracy on fresh (un-augmented) generator images of the whole vocabulary, plus all-correct."""
    rng = WorldRandom(seed)
    scenes = [sample_any_scene(rng.content) for _ in range(count)]
    images = render(scenes, sample_layout(count, rng.layout))
    seen = []
    for start in range(0, count, 250):
        seen += judge.read(images[start : start + 250])
    result = {attr: sum(s[attr] == getattr(sc, attr) for s, sc in zip(seen, scenes)) / count for attr in ATTRIBUTES}
    result["all"] = sum(all(s[a] == getattr(sc, a) for a in ATTRIBUTES) for s, sc in zip(seen, scenes)) / count
    return result


@dataclass
class HeadData:
    """What the heads are fine-tuned on: the frozen trunk's features of ``copies`` views of each labelled image
    (view ``c`` of image ``n`` at row ``c × images + n``) with the eye's class indices (−1 where unsure, left out of
    the loss), and of fresh generator renders with their exact labels. Where the trunk's last ``blocks`` blocks are
    tuned too, the maps that enter them (``labelled_maps``, ``generated_maps``, rows as above)."""

    labelled: torch.Tensor
    labelled_targets: torch.Tensor
    generated: torch.Tensor
    generated_targets: torch.Tensor
    copies: int
    blocks: int = 0
    labelled_maps: torch.Tensor | None = None
    generated_maps: torch.Tensor | None = None

    @property
    def images(self) -> int:
        """How many labelled images (each in ``copies`` views)."""
        return self.labelled.shape[0] // self.copies

    def subset(self, indices: list[int]) -> HeadData:
        """The same data for the labelled images at ``indices`` only (every view of each); renders kept."""
        rows = [copy * self.images + i for copy in range(self.copies) for i in indices]
        maps = None if self.labelled_maps is None else self.labelled_maps[rows]
        return replace(
            self, labelled=self.labelled[rows], labelled_targets=self.labelled_targets[rows], labelled_maps=maps
        )


def head_data(
    judge: Judge,
    images: torch.Tensor,
    targets: torch.Tensor,
    copies: int = 4,
    renders: int = 1024,
    seed: int = 0,
    blocks: int = 0,
) -> HeadData:
    """The trunk's features of ``images`` (N, 3, 64, 64) in [0, 1] labelled by eye — ``targets`` (N, 6) class
    indices in :data:`ATTRIBUTES` order, −1 where the eye was unsure — in ``copies`` views (as drawn, mirrored, and
    augmented, every other one mirrored), and of ``renders`` fresh generator images of the whole vocabulary; with
    ``blocks`` > 0, also the maps that enter the trunk's last ``blocks`` blocks (for :func:`train_heads` to tune
    them). The views and renders do not depend on ``blocks``."""
    if images.shape[0] != targets.shape[0] or targets.shape[1:] != (len(ATTRIBUTES),):
        raise TrainingError(
            f"{images.shape[0]} images and targets of shape {tuple(targets.shape)} do not match",
            hint="one row of six class indices (−1 where unsure) per image",
        )
    if copies < 1:
        raise TrainingError(f"copies {copies} must be at least 1", hint="1 reads each image once, as drawn")
    if not 0 <= blocks < len(judge.trunk):
        raise TrainingError(
            f"blocks {blocks} must be in [0, {len(judge.trunk)})", hint="0 tunes the heads alone, 1 the last block too"
        )
    rng = WorldRandom(seed)
    judge = judge.eval()
    tail = judge.last_blocks(blocks)

    def read(batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        maps = judge.entering(batch, blocks)
        return judge.pool(tail(maps)), maps

    with torch.no_grad():
        views = []
        for copy in range(copies):
            view = images.flip(3) if copy % 2 else images
            views.append(read(augment(view, rng.layout) if copy > 1 else view))
        scenes = [sample_any_scene(rng.content) for _ in range(renders)]
        generated = read(augment(render(scenes, sample_layout(renders, rng.layout)), rng.layout))
    return HeadData(
        labelled=torch.cat([features for features, _ in views]),
        labelled_targets=targets.repeat(copies, 1),
        generated=generated[0],
        generated_targets=torch.tensor([s.labels() for s in scenes]),
        copies=copies,
        blocks=blocks,
        labelled_maps=torch.cat([maps for _, maps in views]) if blocks else None,
        generated_maps=generated[1] if blocks else None,
    )


def _head_loss(logits: dict[str, torch.Tensor], targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy summed over the heads, rows whose target is −1 left out (a head with none adds nothing)."""
    loss = torch.zeros(())
    for i, attr in enumerate(ATTRIBUTES):
        target = targets[:, i]
        if bool((target >= 0).any()):
            loss = loss + F.cross_entropy(logits[attr], target, ignore_index=-1)
    return loss


def train_heads(
    judge: Judge,
    data: HeadData,
    steps: int = 400,
    lr: float = 3e-3,
    trunk_steps: int = 0,
    trunk_lr: float = 3e-4,
    trunk_batch: int = 64,
    seed: int = 0,
    render_weight: float = 1.0,
    kept_for: tuple[str, ...] = (),
) -> Judge:
    """A copy of ``judge`` whose heads are fine-tuned on ``data`` (full batches, AdamW, cosine schedule; per head,
    the renders' loss weighs ``render_weight`` times the labelled views'), its trunk kept. Then, where ``data`` holds
    the maps entering the trunk's last ``data.blocks`` blocks and ``trunk_steps`` > 0, those blocks and the heads are
    fine-tuned together for ``trunk_steps`` steps (AdamW at ``trunk_lr``, cosine schedule), each on ``trunk_batch``
    labelled views and as many renders drawn at random (seeded by ``seed``), the renders' loss again weighed
    ``render_weight`` times the views': the renders keep the generator's world — a style plainly drawn — in the
    network while the labels teach it the model's. The heads named in ``kept_for`` then go back to their fine-tune
    of the first stage and read the trunk's last blocks as ``judge`` has them (:attr:`Judge.kept_tail`); every head's
    loss, theirs included, shaped the tuned blocks. Deterministic."""
    if render_weight < 0:
        raise TrainingError(f"render_weight {render_weight} must not be negative", hint="1 weighs the two alike")
    if trunk_steps and (data.labelled_maps is None or data.generated_maps is None):
        raise TrainingError(
            "trunk_steps > 0 needs the maps entering the tuned blocks", hint="build the data with head_data(blocks=1)"
        )
    if judge.kept_tail is not None:
        raise TrainingError("a fine-tune starts from a judge without a kept tail", hint="give the generator's judge")
    if kept_for:
        _check_kept(data.blocks, kept_for)
    if kept_for and not trunk_steps:
        raise TrainingError(
            f"kept_for {kept_for!r} keeps the generator's last blocks, but no block is tuned",
            hint="give trunk_steps > 0, or leave kept_for empty",
        )
    if trunk_batch < 1:
        raise TrainingError(f"trunk_batch {trunk_batch} must be at least 1", hint="64 views and 64 renders a step")
    width = judge.trunk[0][0].out_channels
    tuned = Judge(width)
    tuned.load_state_dict(judge.state_dict())
    heads = list(tuned.heads.values())
    weight = nn.Parameter(torch.cat([head.weight.detach() for head in heads]))
    bias = nn.Parameter(torch.cat([head.bias.detach() for head in heads]))
    ends = torch.tensor([head.out_features for head in heads]).cumsum(0).tolist()
    spans = list(zip([0, *ends[:-1]], ends))
    features = torch.cat([data.labelled, data.generated])
    labels = torch.cat([data.labelled_targets, data.generated_targets])
    first = data.labelled.shape[0]
    parts = [(slice(0, first), 1.0), (slice(first, features.shape[0]), render_weight)]
    optimizer = torch.optim.AdamW([weight, bias], lr=lr, weight_decay=1e-3)
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = lr * 0.5 * (1 + math.cos(math.pi * step / steps))
        logits = F.linear(features, weight, bias)
        loss = torch.zeros(())
        for i, (start, end) in enumerate(spans):
            for part, weight_of_part in parts:
                target = labels[part, i]
                if bool((target >= 0).any()):
                    loss = loss + weight_of_part * F.cross_entropy(logits[part, start:end], target, ignore_index=-1)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        for head, (start, end) in zip(heads, spans):
            head.weight.copy_(weight[start:end])
            head.bias.copy_(bias[start:end])
    if trunk_steps:
        sources = (
            (data.labelled_maps, data.labelled_targets, 1.0),
            (data.generated_maps, data.generated_targets, render_weight),
        )
        kept_heads = {attr: deepcopy(tuned.heads[attr]) for attr in kept_for}
        _tune_last_blocks(tuned, data.blocks, sources, trunk_steps, trunk_lr, trunk_batch, seed)
        if kept_for:
            branched = Judge(width, data.blocks, kept_for)
            generator_tail = judge.last_blocks(data.blocks).state_dict()
            branched.load_state_dict(tuned.state_dict() | {f"kept_tail.{k}": v for k, v in generator_tail.items()})
            for attr, head in kept_heads.items():
                branched.heads[attr].load_state_dict(head.state_dict())
            tuned = branched
    return tuned.eval()


def _check_kept(blocks: int, kept_for: tuple[str, ...]) -> None:
    """Refuse a kept tail that is not some blocks (> 0) read by distinct named heads, or a head list without blocks."""
    if (
        bool(blocks > 0) != bool(kept_for)
        or not set(kept_for) <= set(ATTRIBUTES)
        or len(set(kept_for)) != len(kept_for)
    ):
        raise TrainingError(
            f"kept_blocks {blocks} and kept_for {kept_for!r} do not make a kept tail",
            hint=f"both empty, or blocks > 0 with distinct attributes from {ATTRIBUTES}",
        )


def _tune_last_blocks(
    judge: Judge,
    blocks: int,
    sources: tuple[tuple[torch.Tensor, torch.Tensor, float], ...],
    steps: int,
    lr: float,
    batch: int,
    seed: int,
) -> None:
    """Fine-tune ``judge``'s last ``blocks`` trunk blocks and its heads in place on ``sources`` (maps entering the
    blocks, class indices, the weight of their loss), ``batch`` rows of each a step (see :func:`train_heads`)."""
    tail = judge.last_blocks(blocks)
    optimizer = torch.optim.AdamW([*tail.parameters(), *judge.heads.parameters()], lr=lr, weight_decay=1e-4)
    draws = torch.Generator().manual_seed(seed)
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = lr * 0.5 * (1 + math.cos(math.pi * step / steps))
        loss = torch.zeros(())
        for maps, targets, weight in sources:
            rows = torch.randint(0, maps.shape[0], (batch,), generator=draws)
            pooled = judge.pool(tail(maps[rows]))
            logits = {attr: head(pooled) for attr, head in judge.heads.items()}
            loss = loss + weight * _head_loss(logits, targets[rows])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
