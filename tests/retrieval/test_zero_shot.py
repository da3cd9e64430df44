"""Cross-attention zero-shot scorer: exact response bases, neutral normalisation, pipeline token states."""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import StableDiffusionPipeline, UNet2DConditionModel
from retrieval_helpers import SELF_Q, aligned_lora, make_library, random_lora, word_encoder

from composer.presets import preset_family
from retrieval.retriever import Retriever
from retrieval.zero_shot import (
    NEUTRAL_PROMPTS,
    ZeroShotScorer,
    mean_response,
    pipeline_token_encoder,
    reads_text_states,
    response_basis,
)
from weights_index.families import pipeline_family


def test_basis_reproduces_the_cross_attention_response_exactly() -> None:
    adapter = random_lora("a", 0, rank=3)
    states = torch.randn(7, 32, dtype=torch.float64)
    expected = sum(
        (update.delta(torch.float64) @ states.T).pow(2).sum(0)
        for key, update in adapter.layers.items()
        if reads_text_states(key)
    ).mean()
    basis = response_basis(adapter)
    assert basis is not None
    assert basis.shape == (6, 32)
    assert torch.allclose(mean_response(basis[None].double(), states)[0], expected, rtol=1e-4)


def test_basis_truncation_and_adapters_without_cross_attention() -> None:
    assert response_basis(random_lora("a", 0, rank=8), max_rank=5).shape == (5, 32)
    assert response_basis(random_lora("s", 0, shapes={SELF_Q: (32, 32)})) is None


def test_scorer_prefers_the_adapter_trained_on_the_prompts_words() -> None:
    encode = word_encoder()
    vocabulary = encode.vocabulary
    scorer = ZeroShotScorer(encode)
    corgi = torch.stack([vocabulary["corgi"], vocabulary["astronaut"]])
    castle = torch.stack([vocabulary["castle"], vocabulary["ocean"]])
    assert scorer.add("corgi", aligned_lora("corgi", corgi))
    assert scorer.add("castle", aligned_lora("castle", castle))
    assert not scorer.add("self-only", random_lora("s", 0, shapes={SELF_Q: (32, 32)}))
    scores = scorer.scores("a photo of a corgi astronaut")
    assert scores["corgi"] > 3.0
    assert scores["corgi"] > scores["castle"] + 3.0
    assert max(scorer.scores("a castle by the ocean").items(), key=lambda kv: kv[1])[0] == "castle"
    scorer.remove("corgi")
    assert scorer.names == ["castle"]


def test_sd_pipeline_token_states_feed_cross_attention(tiny_sd) -> None:
    assert pipeline_family(tiny_sd) == "sd1"
    encode = pipeline_token_encoder(tiny_sd)
    states = encode("a corgi astronaut")
    assert states.shape == (tiny_sd.tokenizer.model_max_length - 1, tiny_sd.unet.config.cross_attention_dim)
    full = tiny_sd.encode_prompt("a corgi astronaut", "cpu", 1, False)[0][0]
    assert torch.allclose(states, full[1:])
    words = len(tiny_sd.tokenizer("a corgi astronaut").input_ids) - 2
    assert encode.summary_start("a corgi astronaut") == words
    assert encode.summary_start("a corgi") == words - 1
    scorer = ZeroShotScorer(encode)
    assert scorer.prompt_states("a corgi astronaut").shape[0] == len(states) - words
    assert scorer.add("a", random_lora("a", 0))
    neutral = [scorer.scores(prompt)["a"] for prompt in NEUTRAL_PROMPTS]
    assert abs(sum(neutral) / len(neutral)) < 1e-3  # z-scores against the neutral prompts average to zero


def test_sdxl_and_flux_token_states_have_the_cross_attention_width(tiny_sdxl, tiny_flux) -> None:
    sdxl_states = pipeline_token_encoder(tiny_sdxl)("a castle")
    assert pipeline_family(tiny_sdxl) == "sdxl"
    assert sdxl_states.shape[1] == tiny_sdxl.unet.config.cross_attention_dim
    assert pipeline_family(tiny_flux) == "flux"
    flux_states = pipeline_token_encoder(tiny_flux, max_sequence_length=32)("a castle by the sea")
    inner = tiny_flux.transformer.context_embedder.out_features
    assert flux_states.shape == (32, inner)
    flux_encoder = pipeline_token_encoder(tiny_flux, max_sequence_length=32)
    assert (
        flux_encoder.summary_start("a castle by the sea")
        == len(tiny_flux.tokenizer_2("a castle by the sea").input_ids) - 1
    )
    assert torch.allclose(flux_states.mean(-1), torch.zeros(len(flux_states)), atol=1e-5)


def test_an_sd2_pipeline_is_sd2_for_the_zero_shot_signal(tiny_sd, tmp_path: Path) -> None:
    unet = UNet2DConditionModel.from_config({**dict(tiny_sd.unet.config), "cross_attention_dim": 1024})
    sd2 = StableDiffusionPipeline(**{**tiny_sd.components, "unet": unet})
    assert pipeline_family(sd2) == preset_family(sd2) == "sd2"
    assert pipeline_token_encoder(sd2).family == "sd2"
    retriever = Retriever(make_library(tmp_path / "lib"), pipe=sd2)
    assert retriever.zero_shot_family == "sd2"
    assert retriever.rank("a crgastro", family="sd2") == []  # the SD 1 adapters are not scored for an SD 2 model
