"""Training batches drawn from the toy world: images rendered on the training device and tokenised captions."""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from composer.toyworld.world import Concept, Scene, caption, render, sample_layout, sample_scene


@dataclass
class WorldBatch:
    """Images in [-1, 1] (B, 3, 64, 64), their captions, and the scenes they were drawn from."""

    images: torch.Tensor
    captions: list[str]
    scenes: list[Scene]


class WorldRandom:
    """The two random streams of the world: Python's for scene content and captions, torch's for layouts."""

    def __init__(self, seed: int) -> None:
        self.content = random.Random(seed)
        self.layout = torch.Generator().manual_seed(seed)

    def get_state(self) -> dict:
        """JSON-able content state plus the layout generator's state tensor."""
        return {"content": self.content.getstate(), "layout": self.layout.get_state()}

    def set_state(self, state: dict) -> None:
        """Continue exactly where :meth:`get_state` was taken."""
        version, internal, gauss = state["content"]
        self.content.setstate((version, tuple(internal), gauss))
        self.layout.set_state(state["layout"])


def draw_batch(
    batch: int,
    rng: WorldRandom,
    device: torch.device | str,
    *,
    concepts: tuple[Concept, ...] = (),
    optional: float = 0.5,
) -> WorldBatch:
    """A batch of random scenes of the base vocabulary with ``concepts`` applied to every scene, and captions."""
    scenes = [sample_scene(rng.content, optional=optional).with_concepts(*concepts) for _ in range(batch)]
    captions = [caption(scene, rng.content, concepts) for scene in scenes]
    images = render(scenes, sample_layout(batch, rng.layout), device) * 2 - 1
    return WorldBatch(images, captions, scenes)


class CaptionTokens:
    """Token ids of captions, memoised (the world's captions repeat a lot and the CLIP tokenizer is slow)."""

    def __init__(self, tokenizer, max_length: int) -> None:
        self.tokenizer = tokenizer
        self.max_length = max_length
        self._cache: dict[str, torch.Tensor] = {}

    def __call__(self, captions: list[str], device: torch.device | str) -> torch.Tensor:
        """(B, max_length) int64 ids, padded and truncated as the pipeline does at inference."""
        missing = [text for text in dict.fromkeys(captions) if text not in self._cache]
        if missing:
            ids = self.tokenizer(
                missing, padding="max_length", max_length=self.max_length, truncation=True, return_tensors="pt"
            ).input_ids
            self._cache.update(zip(missing, ids))
        return torch.stack([self._cache[text] for text in captions]).to(device)
