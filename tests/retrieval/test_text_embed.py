"""open_clip text embeddings, offline: deterministic random towers, registered tiny configs, typed errors."""

from __future__ import annotations

import pytest
import torch

from retrieval.text import TINY_MODEL, TextEmbedder, TextModelError


def test_tiny_embedder_is_deterministic_normalised_and_text_sensitive() -> None:
    first = TextEmbedder(TINY_MODEL, seed=3)
    second = TextEmbedder.from_spec(first.spec)
    vectors = first.encode(["a corgi astronaut", "a castle by the sea", "a corgi astronaut"])
    assert vectors.shape == (3, first.dim) == (3, 32)
    assert torch.allclose(vectors.norm(dim=-1), torch.ones(3), atol=1e-5)
    assert torch.allclose(vectors, second.encode(["a corgi astronaut", "a castle by the sea", "a corgi astronaut"]))
    assert torch.allclose(vectors[0], vectors[2])
    assert not torch.allclose(vectors[0], vectors[1], atol=1e-3)
    assert not torch.allclose(vectors, TextEmbedder(TINY_MODEL, seed=4).encode(["a corgi astronaut"] * 3), atol=1e-3)
    assert first.encode([]).shape == (0, 32)


def test_unknown_architecture_and_missing_weights_are_typed_errors(tmp_path) -> None:
    with pytest.raises(TextModelError, match="unknown open_clip architecture"):
        TextEmbedder("no-such-model")
    with pytest.raises(TextModelError, match="not found"):
        TextEmbedder(TINY_MODEL, tmp_path / "missing.safetensors")


def test_random_init_warning_is_silenced_only_when_intended(caplog: pytest.LogCaptureFixture) -> None:
    import logging

    from retrieval.text import random_init_is_intended

    with caplog.at_level(logging.WARNING), random_init_is_intended():
        logging.getLogger().warning("No pretrained weights loaded for model 'x'. Model initialized randomly.")
        logging.getLogger().warning("something else")
    assert [r.getMessage() for r in caplog.records] == ["something else"]
    caplog.clear()
    with caplog.at_level(logging.WARNING), random_init_is_intended(False):
        logging.getLogger().warning("No pretrained weights loaded for model 'x'.")
    assert len(caplog.records) == 1
