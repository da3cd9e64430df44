"""Training the probe encoder on a library's metadata, and keeping its FAISS vectors consistent with rescans."""

from __future__ import annotations

from pathlib import Path

import pytest
from retrieval_helpers import CONCEPTS, make_library, random_lora, write_peft

from fusion.errors import ComposerError
from retrieval.learned_index import LearnedIndex, checkpoint_path, vectors_path
from retrieval.text import TINY_MODEL, TextEmbedder
from retrieval.training import TrainingConfig, descriptions, train_retriever, validate_encoder
from weights_index.catalog import Library
from weights_index.metadata import AdapterMetadata

QUICK = TrainingConfig(steps=60, dim=32, heads=2, depth=1, probes=4, text_model=TINY_MODEL, lr=3e-3)


def test_descriptions_use_every_metadata_source() -> None:
    meta = AdapterMetadata(
        title="Corgi", trigger_words=("crgastro",), tags={"dog": 3, "space": 9}, category="character"
    )
    texts = descriptions(meta, variants=5)
    assert len(texts) == 5
    assert all(word in texts[0] for word in ("Corgi", "crgastro", "dog", "space", "character"))
    assert all("crgastro" in text for text in texts)
    assert descriptions(AdapterMetadata()) == []


def test_training_learns_the_library_and_vectors_follow_rescans(tmp_path: Path) -> None:
    library = make_library(tmp_path / "lib")
    report = train_retriever(library, config=QUICK, progress=False)
    assert report.family == "sd1"
    assert report.described == 6
    assert report.final_loss < report.first_loss
    assert checkpoint_path(library, "sd1").exists()
    assert vectors_path(library, "sd1").exists()
    index = LearnedIndex.open(library, "sd1")
    assert index is not None
    names = {e.id: e.name for e in library.entries()}
    hits = sum(
        names[index.query(f"{trigger}, {tags}", 1)[0][0]] == name for name, (trigger, tags, _) in CONCEPTS.items()
    )
    assert hits >= 5

    root = tmp_path / "lib"
    (root / "teapot.safetensors").unlink()
    (root / "castle.safetensors").rename(root / "renamed_castle.safetensors")
    write_peft(root / "new.safetensors", random_lora("new", 99), {"modelspec.title": "New"})
    library.scan()
    castle_id = library.get("renamed_castle").id
    before = index.store.vector(castle_id)
    counts = LearnedIndex.open(library, "sd1").sync()
    assert counts == {"removed": 1, "embedded": 1, "failed": 0}
    reopened = LearnedIndex.open(library, "sd1")
    assert sorted(reopened.store.ids.tolist()) == sorted(e.id for e in library.entries())
    assert (reopened.store.vector(castle_id) == before).all()
    assert reopened.sync() == {"removed": 0, "embedded": 0, "failed": 0}


def test_training_needs_described_adapters(tmp_path: Path) -> None:
    root = tmp_path / "bare"
    write_peft(root / "a.safetensors", random_lora("a", 0))
    write_peft(root / "b.safetensors", random_lora("b", 1))
    library = Library(root)
    library.scan()
    with pytest.raises(ComposerError, match="metadata to learn from"):
        train_retriever(library, config=QUICK, progress=False)


def test_validation_holds_out_adapters_and_flags_an_encoder_that_cannot_generalise() -> None:
    adapters = [random_lora(f"a{i}", i) for i in range(20)]
    texts = [[f"zq{i}x", f"zq{i}x style", f"zq{i}x art"] for i in range(20)]
    text = TextEmbedder(TINY_MODEL, seed=0)
    validation = validate_encoder(adapters, texts, text, QUICK)
    assert validation is not None
    assert validation.held_out == 4
    assert validation.queries == 12
    assert validation.chance_at_3 == pytest.approx(3 / 20)
    assert validation.threshold > validation.chance_at_3
    assert not validation.reliable
    assert validate_encoder(adapters[:6], texts[:6], text, QUICK) is None


def test_small_libraries_train_unvalidated_and_stay_in_the_ranking(tmp_path: Path) -> None:
    library = make_library(tmp_path / "lib")
    report = train_retriever(library, config=QUICK, progress=False)
    assert report.validation is None
    index = LearnedIndex.open(library, "sd1")
    assert index is not None
    assert index.validation is None
    assert index.reliable
