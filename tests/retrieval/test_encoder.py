"""The probe encoder: factor-only computation, per-layer-type tokens, padding, checkpoints."""

from __future__ import annotations

import pytest
import torch
from retrieval_helpers import CROSS_K, random_lora

from fusion.adapters import Adapter, Dense
from retrieval.encoder import CheckpointError, EncoderConfig, ProbeEncoder, layer_shapes


def _encoder(adapter: Adapter, **kw) -> ProbeEncoder:
    torch.manual_seed(0)
    return ProbeEncoder(EncoderConfig(layers=layer_shapes(adapter), out_dim=24, dim=32, heads=2, **kw)).eval()


def test_factored_tokens_equal_tokens_of_the_dense_delta() -> None:
    adapter = random_lora("a", 0)
    dense = Adapter("d", "sd1", {k: Dense(u.delta()) for k, u in adapter.layers.items()})
    encoder = _encoder(adapter)
    tokens = encoder.tokens(encoder.prepare(adapter))
    assert tokens.shape == (1 + len(adapter.layers), 32)
    assert torch.allclose(tokens, encoder.tokens(encoder.prepare(dense)), atol=1e-4)


def test_batches_pad_adapters_with_fewer_layers_and_ignore_unknown_ones() -> None:
    full = random_lora("a", 0)
    partial = random_lora("b", 1, shapes={CROSS_K: (32, 32), "some.unknown.layer": (8, 8)})
    encoder = _encoder(full)
    assert len(encoder.prepare(partial).layers) == 1
    together = encoder([encoder.prepare(full), encoder.prepare(partial)])
    alone = encoder([encoder.prepare(partial)])
    assert together.shape == (2, 24)
    assert torch.allclose(together[1], alone[0], atol=1e-5)


def test_embeddings_depend_on_the_weights_and_gradients_reach_the_probes() -> None:
    encoder = _encoder(random_lora("a", 0)).train()
    vectors = encoder([encoder.prepare(random_lora("a", 0)), encoder.prepare(random_lora("b", 7))])
    assert not torch.allclose(vectors[0], vectors[1], atol=1e-3)
    vectors.sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in encoder.probes)


def test_checkpoint_round_trip(tmp_path) -> None:
    adapter = random_lora("a", 0)
    encoder = _encoder(adapter, family="sd1", text={"name": "x", "weights": None, "seed": 0})
    encoder.save(tmp_path / "ckpt.safetensors", extra={"steps": 3})
    loaded, extra = ProbeEncoder.load(tmp_path / "ckpt.safetensors")
    assert extra == {"steps": 3}
    assert loaded.config.family == "sd1"
    assert loaded.config.layers == encoder.config.layers
    assert torch.allclose(loaded.embed([adapter]), encoder.embed([adapter]))
    (tmp_path / "bad.safetensors").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError):
        ProbeEncoder.load(tmp_path / "bad.safetensors")
