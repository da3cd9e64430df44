"""Hybrid retrieval: trigger/FTS/learned/zero-shot fusion, selection rules, graceful degradation, rescans."""

from __future__ import annotations

from pathlib import Path

import torch
from retrieval_helpers import CONCEPTS, aligned_lora, make_library, random_lora, word_encoder, write_peft

from retrieval.encoder import ProbeEncoder
from retrieval.learned_index import LearnedIndex, checkpoint_path
from retrieval.retriever import DEFAULT_WEIGHT, Retriever, insert_triggers, robust_z
from retrieval.text import TINY_MODEL
from retrieval.training import TrainingConfig, train_retriever
from weights_index.catalog import Library

QUICK = TrainingConfig(steps=60, dim=32, heads=2, depth=1, probes=4, text_model=TINY_MODEL, lr=3e-3)


def test_metadata_only_selection_picks_exactly_the_triggered_adapters(tmp_path: Path) -> None:
    library = make_library(tmp_path / "lib")
    retriever = Retriever(library)
    assert any("no trained checkpoint" in note for note in retriever.notes)
    assert any("no pipeline" in note for note in retriever.notes)
    picks = retriever.select("a CRGASTRO wearing a redscarf, castle in the distance")
    assert {p.name for p in picks} == {"corgi", "scarf"}
    assert all(p.weight == DEFAULT_WEIGHT and p.missing_triggers == [] for p in picks)
    assert all(any("trigger word in prompt" in r for r in p.reasons) for p in picks)
    assert all(any(r.startswith("not used:") for r in p.reasons) for p in picks)
    hits = retriever.rank("castle ocean cliff")
    assert hits[0].name == "castle"
    assert "metadata" in hits[0].signals
    assert "trigger" not in hits[0].signals
    assert retriever.select("castle ocean cliff") == []  # word overlap alone is not a pick
    assert retriever.select("crgastroid") == []  # triggers match whole words only
    assert retriever.rank("crgastro", family="sdxl") == []


def test_a_prompt_naming_several_adapters_of_one_category_gets_them_up_to_max_adapters(tmp_path: Path) -> None:
    # The prompt names three backgrounds by their own trigger words: "at most one per category" applies unless the
    # prompt names two or more of a category, so all three are picked.
    retriever = Retriever(make_library(tmp_path / "lib"))
    picks = retriever.select("neoncity and mossyforest and cstlsea with a gldteapot and crgastro in a redscarf")
    assert [p.name for p in picks] == ["neon", "forest", "castle", "teapot", "corgi"]  # the first five named
    assert [(r.name, r.reason) for r in retriever.rejected] == [("scarf", "limit of 5 adapters reached")]
    assert len(retriever.select("neoncity gldteapot crgastro redscarf", k=2)) == 2


def _zero_shot_library(root: Path) -> Library:
    encode = word_encoder()
    corgi = torch.stack([encode.vocabulary["corgi"], encode.vocabulary["astronaut"]])
    write_peft(root / "mystery.safetensors", aligned_lora("mystery", corgi))
    for seed in range(7):
        write_peft(root / f"random{seed}.safetensors", random_lora(f"random{seed}", seed))
    library = Library(root)
    library.scan()
    return library


def test_zero_shot_finds_and_selects_an_adapter_without_metadata(tmp_path: Path) -> None:
    library = _zero_shot_library(tmp_path / "lib")
    retriever = Retriever(library, token_encoder=word_encoder(), zero_shot_family="sd1")
    hits = retriever.rank("a photo of a corgi astronaut")
    assert hits[0].name == "mystery"
    assert hits[0].signals["zero_shot"].score > 1.0
    picks = retriever.select("a photo of a corgi astronaut")
    assert [p.name for p in picks] == ["mystery"]
    assert "weights single it out" in picks[0].reasons[0]
    assert retriever.select("a castle by the ocean") == []

    write_peft(tmp_path / "lib" / "mystery.safetensors", random_lora("mystery", 42))  # same name, new content
    retriever.refresh()
    assert retriever.select("a photo of a corgi astronaut") == []


def test_zero_shot_with_a_real_pipeline(tmp_path: Path, tiny_sd) -> None:
    library = make_library(tmp_path / "lib")
    retriever = Retriever(library, pipe=tiny_sd)
    assert retriever.zero_shot_family == "sd1"
    hits = retriever.rank("a crgastro", k=10)
    assert len(hits) == len(CONCEPTS)
    assert all("zero_shot" in hit.signals for hit in hits)
    assert hits[0].name == "corgi"


def test_learned_signal_and_rescans_keep_everything_consistent(tmp_path: Path) -> None:
    root = tmp_path / "lib"
    library = make_library(root)
    train_retriever(library, config=QUICK, progress=False)
    retriever = Retriever(library, token_encoder=word_encoder(), zero_shot_family="sd1")
    assert not any("no trained checkpoint" in note for note in retriever.notes)
    hits = retriever.rank("space suit astronaut corgi")
    assert hits[0].name == "corgi"
    assert "learned" in hits[0].signals

    (root / "teapot.safetensors").unlink()
    (root / "castle.safetensors").rename(root / "seaside_castle.safetensors")
    retriever.refresh()
    ids = {e.id for e in library.entries()}
    index = LearnedIndex.open(library, "sd1")
    assert set(index.store.ids.tolist()) == ids
    names = {hit.name for hit in retriever.rank("teapot castle ocean gold", k=10)}
    assert "teapot" not in names
    assert "seaside_castle" in names
    assert all(int(name) in ids for name in retriever._zero_shot_scorer().names)


def test_an_unreliable_learned_encoder_is_left_out_with_a_note(tmp_path: Path) -> None:
    library = make_library(tmp_path / "lib")
    train_retriever(library, config=QUICK, progress=False)
    path = checkpoint_path(library, "sd1")
    encoder, extra = ProbeEncoder.load(path)
    failed = {"recall_at_3": 0.05, "chance_at_3": 0.1, "threshold": 0.3, "held_out": 4, "queries": 32}
    encoder.save(path, extra=extra | {"validation": failed | {"reliable": False}})
    retriever = Retriever(library, token_encoder=word_encoder(), zero_shot_family="sd1")
    assert any("left out of the ranking" in note for note in retriever.notes)
    hits = retriever.rank("space suit astronaut corgi", k=10)
    assert hits
    assert not any("learned" in hit.signals for hit in hits)


def test_robust_z_and_trigger_insertion() -> None:
    z = robust_z({i: float(i % 3) for i in range(20)} | {99: 50.0})
    assert z[99] > 10
    assert max(v for k, v in z.items() if k != 99) < 2
    assert robust_z({1: 1.0, 2: 5.0}) == {1: 0.0, 2: 0.0}
    retriever_pick = type("P", (), {"missing_triggers": ["crgastro"]})()
    assert insert_triggers("a dog", [retriever_pick]) == "a dog, crgastro"
    assert insert_triggers("a dog", []) == "a dog"
