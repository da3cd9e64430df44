"""Spectral weight features: exact spectra without forming ΔW, fixed-size vectors, layer typing."""

from __future__ import annotations

import torch
from retrieval_helpers import CROSS_K, SELF_Q, random_lora

from fusion.adapters import Adapter, Dense, LowRank
from retrieval.features import FEATURE_DIM, GROUPS, layer_group, layer_type, singular_values, spectral_features


def test_low_rank_spectrum_matches_dense_svd() -> None:
    adapter = random_lora("a", 0, rank=4)
    for update in adapter.layers.values():
        dense = update.up.double() @ update.down.double() * update.scale
        exact = torch.linalg.svdvals(dense)[:4]
        assert torch.allclose(singular_values(update), exact, rtol=1e-9, atol=1e-9)


def test_dense_and_conv_updates_have_spectra() -> None:
    dense = Dense(torch.randn(6, 5), scale=2.0)
    assert torch.allclose(singular_values(dense), torch.linalg.svdvals(2.0 * dense.weight.double()))
    conv = LowRank(down=torch.randn(2, 3, 3, 3), up=torch.randn(4, 2, 1, 1))
    assert singular_values(conv).shape == (2,)


def test_features_are_fixed_size_and_invariant_to_factor_rescaling() -> None:
    adapter = random_lora("a", 1)
    rescaled = Adapter(
        "b",
        "sd1",
        {k: LowRank(down=u.down * 3.0, up=u.up / 3.0, alpha=u.alpha) for k, u in adapter.layers.items()},
    )
    features = spectral_features(adapter)
    assert features.shape == (FEATURE_DIM,)
    assert torch.allclose(features, spectral_features(rescaled), atol=1e-5)
    other = random_lora("c", 2, rank=2)
    assert not torch.allclose(features, spectral_features(other), atol=1e-3)


def test_empty_groups_are_zero_and_used_groups_are_not() -> None:
    features = spectral_features(random_lora("a", 0)).reshape(len(GROUPS), -1)
    used = {layer_group(CROSS_K), layer_group(SELF_Q)}
    for row, group in zip(features, GROUPS):
        assert bool(row.abs().sum() > 0) == (group in used)


def test_layer_types_and_groups() -> None:
    assert layer_type(CROSS_K) == "attn2.to_k"
    assert layer_type("up_blocks.1.attentions.2.transformer_blocks.0.attn1.to_out.0") == "attn1.to_out"
    assert layer_type("text_encoder.text_model.encoder.layers.0.self_attn.q_proj") == "text_encoder:self_attn.q_proj"
    assert layer_group(CROSS_K) == "cross_attn.kv"
    assert layer_group("transformer_blocks.0.attn.add_k_proj") == "cross_attn.kv"
    assert layer_group("transformer_blocks.0.attn.to_q") == "self_attn.qk"
    assert layer_group("single_transformer_blocks.3.proj_mlp") == "feed_forward"
    assert layer_group("down_blocks.0.resnets.1.conv2") == "convolution"
    assert layer_group("text_encoder_2.text_model.encoder.layers.0.mlp.fc1") == "text_encoder"
