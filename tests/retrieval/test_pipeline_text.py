"""A pipeline's own CLIP text encoder as the learned retriever's text tower: embeddings, spec checks, the whole path."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from retrieval_helpers import CONCEPTS, make_library
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from composer.smoke_presets.tokenizers import build_clip_tokenizer
from retrieval.learned_index import LearnedIndex
from retrieval.pipeline_text import PipelineTextEmbedder, pipeline_name
from retrieval.retriever import Retriever
from retrieval.text import TextModelError
from retrieval.training import TrainingConfig, train_retriever

QUICK = TrainingConfig(steps=40, dim=32, heads=2, depth=1, probes=4, lr=3e-3)


def _clip_config() -> CLIPTextConfig:
    return CLIPTextConfig(
        vocab_size=49408,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        max_position_embeddings=16,
        projection_dim=24,
    )


def _pipe(seed: int = 0, projected: bool = False) -> SimpleNamespace:
    torch.manual_seed(seed)
    cls = CLIPTextModelWithProjection if projected else CLIPTextModel
    encoder = cls(_clip_config()).eval()
    return SimpleNamespace(tokenizer=build_clip_tokenizer(model_max_length=16), text_encoder=encoder)


def test_embeddings_are_unit_vectors_of_the_pipelines_width_with_either_pooling() -> None:
    pipe = _pipe()
    eos = PipelineTextEmbedder(pipe, name="tiny")
    mean = PipelineTextEmbedder(pipe, name="tiny", pooling="mean")
    prompts = ["a red circle on the grass", "a blue square at night", "a red circle on the grass"]
    vectors = eos.encode(prompts)
    assert vectors.shape == (3, 32)
    assert eos.dim == 32
    assert torch.allclose(vectors.norm(dim=-1), torch.ones(3), atol=1e-5)
    assert torch.allclose(vectors[0], vectors[2])
    assert not torch.allclose(vectors[0], vectors[1], atol=1e-3)
    assert not torch.allclose(vectors, mean.encode(prompts), atol=1e-3)
    assert eos.encode([]).shape == (0, 32)
    projected = PipelineTextEmbedder(_pipe(projected=True), name="tiny-projected")
    assert projected.dim == 24
    assert projected.encode(prompts).shape == (3, 24)


def test_unsupported_pipelines_and_foreign_specs_are_typed_errors() -> None:
    with pytest.raises(TextModelError, match="no tokenizer and text_encoder"):
        PipelineTextEmbedder(SimpleNamespace(tokenizer=None, text_encoder=None), name="none")
    with pytest.raises(TextModelError, match="not a CLIP text model"):
        PipelineTextEmbedder(SimpleNamespace(tokenizer=object(), text_encoder=torch.nn.Linear(2, 2)), name="odd")
    with pytest.raises(TextModelError, match="unknown pooling"):
        PipelineTextEmbedder(_pipe(), name="tiny", pooling="max")
    spec = PipelineTextEmbedder(_pipe(0), name="tiny").spec
    assert PipelineTextEmbedder.from_spec(spec, _pipe(0)).spec == spec
    with pytest.raises(TextModelError, match="trained against 'tiny'"):
        PipelineTextEmbedder.from_spec(spec, _pipe(1))
    assert pipeline_name("pipeline:toy-sd") == "toy-sd"
    assert pipeline_name("ViT-B-32") is None
    with pytest.raises(TextModelError, match="empty pipeline name"):
        pipeline_name("pipeline:")


def test_training_against_a_pipeline_text_tower_and_querying_with_that_pipeline(tmp_path: Path) -> None:
    library = make_library(tmp_path / "lib")
    with pytest.raises(TextModelError, match="pass it as text="):
        train_retriever(library, config=TrainingConfig(text_model="pipeline:tiny"), progress=False)
    pipe = _pipe()
    report = train_retriever(library, config=QUICK, text=PipelineTextEmbedder(pipe, name="tiny"), progress=False)
    assert report.final_loss < report.first_loss

    without = LearnedIndex.open(library, "sd1")
    assert without is not None
    assert "trained against 'tiny'" in (without.text_problem() or "")
    assert LearnedIndex.open(library, "sd1", pipe=_pipe(1)).text_problem() is not None
    index = LearnedIndex.open(library, "sd1", pipe=pipe)
    assert index.text_problem() is None
    names = {e.id: e.name for e in library.entries()}
    top = [names[index.query(f"{trigger}, {tags}", 1)[0][0]] for trigger, tags, _ in CONCEPTS.values()]
    assert sum(found == name for found, name in zip(top, CONCEPTS)) >= 4

    retriever = Retriever(library, scan=False)
    assert any("trained against 'tiny'" in note and "left out" in note for note in retriever.notes)
    assert not retriever._learned_signal("anything", None)
