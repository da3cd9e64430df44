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


def _others(root: Path, count: int) -> None:
    """``count`` adapters with their own distinct trigger token and no word of the tests' prompts."""
    for i in range(count):
        _write(root, f"other_{i}", 500 + i, _kohya(f"other_{i}", "10_img", {f"oth{i}zq": 20, "outdoors": 9}, 20))


def test_a_common_word_in_every_caption_beside_a_token_names_nothing(tmp_path: Path) -> None:
    _others(tmp_path, 6)
    _write(tmp_path, "person_lora", 1, _kohya("person_lora", "10_img", {"ohwx": 20, "woman": 20}, 20))
    library = Library(tmp_path)
    library.scan()
    retriever = Retriever(library)
    assert retriever.select("a woman walking in a park", family="sd1") == []
    assert [p.name for p in retriever.select("ohwx, walking in a park", family="sd1")] == ["person_lora"]


def test_a_common_word_in_every_caption_of_a_small_library_names_nothing(tmp_path: Path) -> None:
    _others(tmp_path, 2)
    _write(tmp_path, "plain_lora", 1, _kohya("plain_lora", "10_img", {"woman": 20, "smiling": 20}, 20))
    library = Library(tmp_path)
    library.scan()
    assert Retriever(library).select("a woman walking in a park", family="sd1") == []


def test_a_phrase_other_adapters_use_as_a_tag_beside_a_token_of_its_own_folder_is_a_tag(tmp_path: Path) -> None:
    _others(tmp_path, 6)
    _write(tmp_path, "dress_tagged", 2, _kohya("dress_tagged", "10_img", {"qrst": 20, "red gown": 6}, 20))
    _write(tmp_path, "person_lora", 1, _kohya("person_lora", "10_img", {"ohwx": 20, "red gown": 20}, 20))
    library = Library(tmp_path)
    library.scan()
    retriever = Retriever(library)
    assert retriever.select("red gown, walking in a park", family="sd1") == []
    picks = retriever.select("ohwx, red gown", family="sd1")
    assert [p.name for p in picks] == ["person_lora"]
    assert picks[0].explains == ["ohwx"]


def test_a_regularization_folder_names_nothing(tmp_path: Path) -> None:
    _others(tmp_path, 6)
    header = {
        "ss_output_name": "person_lora",
        "ss_tag_frequency": json.dumps({"10_ohwx": {"ohwx": 20, "smiling": 5}, "1_librarian": {"librarian": 200}}),
        "ss_dataset_dirs": json.dumps({"10_ohwx": {"n_repeats": 10, "img_count": 20}}),
        "ss_reg_dataset_dirs": json.dumps({"1_librarian": {"n_repeats": 1, "img_count": 200}}),
    }
    _write(tmp_path, "person_lora", 1, header)
    library = Library(tmp_path)
    library.scan()
    retriever = Retriever(library)
    assert retriever.select("a librarian walking in a park", family="sd1") == []
    entry = next(e for e in library.entries() if e.name == "person_lora")
    assert entry.metadata.dataset_triggers == ("ohwx",)
    assert entry.metadata.dataset_folders == ("ohwx",)
    assert "librarian" not in entry.metadata.caption_presence
    assert [p.name for p in retriever.select("ohwx in a park", family="sd1")] == ["person_lora"]


def test_a_title_ending_like_a_packaging_word_is_found_as_written(tmp_path: Path) -> None:
    _others(tmp_path, 3)
    _write(tmp_path, "angelora_v1", 1, _kohya("Angelora", "10_img", {"1girl": 20}, 20))
    _write(tmp_path, "umbrellalora", 2, _kohya("umbrellalora", "10_img", {"rain": 20}, 20))
    library = Library(tmp_path)
    library.scan()
    retriever = Retriever(library)
    assert [p.name for p in retriever.select("angelora, on a beach", family="sd1")] == ["angelora_v1"]
    assert [p.name for p in retriever.select("an umbrella in the rain", family="sd1")] == ["umbrellalora"]
