"""kohya files as they come: a trigger only in the caption counts names its adapter; a shared one names none."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from retrieval.retriever import Retriever
from weights_index.catalog import Library

SD1_KEY = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k"
GENERIC = ["1girl", "long hair", "smile", "outdoors", "wolf ears"]


def _write(root: Path, stem: str, seed: int, header: dict[str, str]) -> None:
    values = np.random.default_rng(seed).standard_normal((2, 1, 4)).astype(np.float32)
    tensors = {f"{SD1_KEY}.lora_A.weight": values[0], f"{SD1_KEY}.lora_B.weight": values[1].T.copy()}
    save_file(tensors, str(root / f"{stem}.safetensors"), metadata={"ss_base_model_version": "sd_v1", **header})


def _kohya(output: str, folder: str, counts: dict[str, int], images: int | None = None) -> dict[str, str]:
    header = {"ss_output_name": output, "ss_tag_frequency": json.dumps({folder: counts})}
    if images is not None:
        header["ss_dataset_dirs"] = json.dumps({folder: {"n_repeats": 10, "img_count": images}})
    return header


@pytest.fixture(scope="module")
def library(tmp_path_factory: pytest.TempPathFactory) -> Library:
    root = tmp_path_factory.mktemp("captions")
    for i in range(12):  # distractors with the generic tags at realistic counts
        counts = {tag: 3 + (i + j) % 15 for j, tag in enumerate(GENERIC)}
        _write(root, f"distractor_{i}", i, _kohya(f"distractor_{i}", "10_img", {f"dst{i}q": 20, **counts}, 20))
    texas = {"omertosa": 20, "1girl": 20, "wolf ears": 18, "long hair": 15, "smile": 5}
    _write(root, "arknightsTexas_v10", 100, _kohya("arknightsTexas_v10", "10_img", texas, 20))
    folder_title = {"plwtch": 15, "1girl": 15, "hat": 6}
    _write(root, "witch_lora", 101, _kohya("witch_lora", "8_Pale Witch", folder_title))
    for i in range(6):  # one token many trainers reuse, in every caption of six adapters
        _write(root, f"reused_{i}", 200 + i, _kohya(f"reused_{i}", "5_data", {"sks": 12, "smile": 4 + i}, 12))
    _write(root, "loose_token", 300, _kohya("loose_token", "10_img", {"vrkl": 8, "1girl": 20}, 20))
    _write(root, "tiny_set", 301, _kohya("tiny_set", "2_img", {"qzzt": 3, "1girl": 3}, 3))
    library = Library(root)
    library.scan()
    return library


def test_a_trigger_only_in_the_caption_counts_names_its_adapter(library: Library) -> None:
    retriever = Retriever(library)
    picks = retriever.select("masterpiece, best quality, omertosa, 1girl, wolf ears, long hair", family="sd1")
    assert [p.name for p in picks] == ["arknightsTexas_v10"]
    reasons = "\n".join(picks[0].reasons)
    assert "caption name 'omertosa' in prompt (as 'omertosa')" in reasons
    assert "'omertosa' from caption counts: in 20 of 20 captions of '10_img'" in reasons
    assert picks[0].sources == {"omertosa": "caption counts: in 20 of 20 captions of '10_img'"}


def test_a_generic_folder_name_is_no_name_and_a_folder_title_is(library: Library) -> None:
    retriever = Retriever(library)
    assert retriever.select("img, 1girl", family="sd1") == []
    picks = retriever.select("pale witch, smile", family="sd1")
    assert [p.name for p in picks] == ["witch_lora"]
    assert picks[0].sources["pale witch"] == "kohya dataset folder name"
    assert [p.name for p in retriever.select("plwtch", family="sd1")] == ["witch_lora"]


def test_a_token_in_every_caption_of_many_adapters_names_none_of_them(library: Library) -> None:
    retriever = Retriever(library)
    assert retriever.select("sks, smile, outdoors", family="sd1") == []
    assert any(phrase.startswith("'sks' is on 6 adapters") for phrase in retriever.generic)


def test_tags_in_some_captions_or_in_a_tiny_folder_name_nothing(library: Library) -> None:
    retriever = Retriever(library)
    assert retriever.select("vrkl", family="sd1") == []  # in 8 of 20 captions: a description of some images
    assert retriever.select("qzzt", family="sd1") == []  # a folder of three captions proves nothing
    assert retriever.select("1girl, long hair, wolf ears, smile", family="sd1") == []  # generic, even at 20 of 20


def test_each_pick_says_where_each_explained_word_came_from(tmp_path: Path) -> None:
    header = {
        "modelspec.title": "Scarlett Portrait",
        "modelspec.trigger_phrase": "scrlt9",
        "modelspec.architecture": "stable-diffusion-v1/lora",
    }
    _write(tmp_path, "scarlett_portrait", 1, header)
    _write(tmp_path, "texas", 2, _kohya("texas", "10_img", {"omertosa": 20, "1girl": 20}, 20))
    library = Library(tmp_path)
    library.scan()
    picks = Retriever(library).select("scrlt9, omertosa", family="sd1")
    assert {p.name: p.sources for p in picks} == {
        "scarlett_portrait": {"scrlt9": "trigger field (modelspec)"},
        "texas": {"omertosa": "caption counts: in 20 of 20 captions of '10_img'"},
    }
    picks = Retriever(library).select("scarlett portrait", family="sd1")
    assert picks[0].sources == {"scarlett portrait": "title"}
