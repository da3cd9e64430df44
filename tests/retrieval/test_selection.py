"""Selection on a library with shared tags, titles, versions and two families: specificity, names, reasons."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from retrieval.evidence import specificity
from retrieval.retriever import Retriever
from weights_index.catalog import Library

SD1_KEY = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k"
SDXL_KEY = "unet.down_blocks.1.attentions.0.transformer_blocks.1.attn2.to_k"
GENERIC = "1girl, long hair, film grain"


def _write(root: Path, stem: str, seed: int, header: dict[str, str], family: str = "sd1") -> None:
    values = np.random.default_rng(seed).standard_normal((2, 1, 4)).astype(np.float32)
    key = SD1_KEY if family == "sd1" else SDXL_KEY
    base = {"ss_base_model_version": "sd_v1" if family == "sd1" else "sdxl_base_v1-0"}
    tensors = {f"{key}.lora_A.weight": values[0], f"{key}.lora_B.weight": values[1].T.copy()}
    save_file(tensors, str(root / f"{stem}.safetensors"), metadata={**base, **header})


def _spec(title: str, triggers: str, tags: str, category: str) -> dict[str, str]:
    return {
        "modelspec.title": title,
        "modelspec.trigger_phrase": triggers,
        "modelspec.tags": f"{category}, {tags}",
    }


@pytest.fixture(scope="module")
def library(tmp_path_factory: pytest.TempPathFactory) -> Library:
    root = tmp_path_factory.mktemp("realistic")
    for i in range(12):  # many adapters share the generic tags, and some use one as a trigger word
        _write(root, f"girl_{i}", i, _spec(f"Zorvath Kel{i}", f"zrv{i}x, 1girl", GENERIC, "character"))
    _write(root, "makimaChainsawMan_v1", 100, _spec("Makima (Chainsaw Man) v1", "mkmcsm", "red hair", "character"))
    _write(root, "makima_chainsaw_man-v2", 101, _spec("Makima (Chainsaw Man) v2", "mkmcsm", "red hair", "character"))
    shutil.copy(root / "makima_chainsaw_man-v2.safetensors", root / "makima_chainsaw_man-v2 (1).safetensors")
    _write(root, "Makima XL", 102, _spec("Makima (Chainsaw Man) XL", "mkmcsm", "red hair", "character"), "sdxl")
    _write(root, "cyber_jacket", 200, _spec("Cyberpunk Jacket", "cybjkt", "jacket, neon", "clothing"))
    _write(root, "leather_jacket", 201, _spec("Leather Jacket", "", "jacket", "clothing"))
    counts = {"10_qwrtz": {"qwrtz": 20, "1girl": 20, "smile": 7}, "5_reg": {"woman": 5}}
    _write(root, "kohya_only", 300, {"ss_output_name": "Pale Witch", "ss_tag_frequency": json.dumps(counts)})
    library = Library(root)
    library.scan()
    return library


def test_specificity_falls_with_the_number_of_adapters_carrying_a_phrase() -> None:
    assert specificity(1, 0) == 1.0
    assert 1.0 > specificity(2, 0) > specificity(4, 0) > specificity(1, 20) > specificity(30, 0) >= 0.0
    assert specificity(60, 0) == 0.0
    assert specificity(1, 2) == specificity(2, 0)  # two tag carriers count as one naming carrier


def test_generic_tags_and_generic_trigger_words_pick_nothing(library: Library) -> None:
    retriever = Retriever(library)
    assert retriever.select("1girl, long hair, film grain, smile", family="sd1") == []
    assert "'1girl' is on 13 adapters: too generic to pick any" in retriever.generic
    picks = retriever.select("zrv3x, 1girl, long hair", family="sd1")
    assert [p.name for p in picks] == ["girl_3"]  # the identity trigger picks; the shared one does not
    assert "trigger word in prompt: 'zrv3x'" in picks[0].reasons


def test_titles_and_file_names_pick_whatever_their_spelling(library: Library) -> None:
    retriever = Retriever(library)
    for prompt in (
        "makima (chainsaw man) wearing cyberpunk jacket",
        "Makima, jacket cyberpunk",
        "MAKIMA_CHAINSAW_MAN v2 with Cyberpunk-Jacket",
        "chainsaw man makima, cyber_jacket",
    ):
        picks = retriever.select(prompt, family="sd1")
        assert {p.name for p in picks} == {"makima_chainsaw_man-v2", "cyber_jacket"}, prompt
        makima = next(p for p in picks if p.name.startswith("makima"))
        assert makima.missing_triggers == ["mkmcsm"]  # picked by its title: its trigger word is added
    assert retriever.select("a jacket", family="sd1") == []  # a one-word tag is no title
    assert retriever.select("leather jacket", family="sd1")[0].name == "leather_jacket"


def test_versions_and_copies_give_one_pick_that_names_the_others(library: Library) -> None:
    picks = Retriever(library).select("mkmcsm", family="sd1")
    assert [p.name for p in picks] == ["makima_chainsaw_man-v2"]
    reasons = "\n".join(picks[0].reasons)
    assert "preferred over makima_chainsaw_man-v2 (1): identical file (same SHA-256)" in reasons
    assert "preferred over makimaChainsawMan_v1: older version (v1 < v2)" in reasons


def test_only_the_pipelines_family_is_picked(library: Library) -> None:
    retriever = Retriever(library)
    assert [p.name for p in retriever.select("mkmcsm", family="sdxl")] == ["Makima XL"]
    assert [p.name for p in retriever.select("mkmcsm", family="sd1")] == ["makima_chainsaw_man-v2"]


def test_kohya_dataset_folder_token_names_the_adapter(library: Library) -> None:
    picks = Retriever(library).select("qwrtz, smile", family="sd1")
    assert [p.name for p in picks] == ["kohya_only"]
    assert "dataset trigger 'qwrtz' in prompt (as 'qwrtz')" in picks[0].reasons
    assert Retriever(library).select("pale witch", family="sd1")[0].name == "kohya_only"


def test_reasons_say_what_each_pick_explains_and_what_was_rejected(library: Library) -> None:
    retriever = Retriever(library)
    picks = retriever.select("zrv1x and zrv2x, cybjkt, film grain", family="sd1", k=2)
    assert [p.name for p in picks] == ["girl_1", "girl_2"]
    assert picks[0].explains == ["zrv1x"]
    assert "explains 'zrv1x' (specific: 'zrv1x' on 1 adapter)" in picks[0].reasons
    assert [(r.name, r.reason, r.capped) for r in retriever.rejected] == [
        ("cyber_jacket", "limit of 2 adapters reached", True)
    ]
    picks = retriever.select("mkmcsm, makima", family="sd1")
    assert len(picks) == 1
    assert retriever.rejected == []  # versions and copies are one candidate, not rivals


def test_a_second_adapter_of_a_category_needs_a_name_of_its_own(tmp_path: Path) -> None:
    _write(tmp_path, "harbor", 1, _spec("Night Harbor", "nbgx", "sea", "background"))
    for i in range(3):  # three backgrounds share one trigger word: it names none of them well enough for a second pick
        _write(tmp_path, f"dusk_{i}", 10 + i, _spec(f"Dusk Veil {i}", f"duskveil, dv{i}q", "sky", "background"))
    library = Library(tmp_path)
    library.scan()
    retriever = Retriever(library)
    assert [p.name for p in retriever.select("nbgx, duskveil")] == ["harbor"]
    assert retriever.rejected[0].reason == (
        "background already chosen; 'duskveil' is shared by 3 adapters, not specific enough to name a second"
    )
    assert retriever.rejected[0].lost_to == "harbor"
    assert [p.name for p in retriever.select("nbgx, dv1q")] == ["harbor", "dusk_1"]  # named: both backgrounds
