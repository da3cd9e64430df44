"""`compose search` and `compose train-retriever` end to end, and selection on the demo library."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from retrieval_helpers import make_library

from composer.cli import main
from retrieval.learned_index import checkpoint_path
from retrieval.retriever import Retriever
from retrieval.text import TINY_MODEL
from weights_index.catalog import Library


def test_search_prints_ranking_and_picks(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    make_library(tmp_path / "lib")
    assert main(["search", "a crgastro in a redscarf", "--library", str(tmp_path / "lib")]) == 0
    out = capsys.readouterr().out
    assert "pick corgi @ 0.8" in out
    assert "pick scarf @ 0.8" in out
    assert "trigger word in prompt: 'crgastro'" in out
    assert "note: learned encoder: no trained checkpoint" in out
    assert main(["search", "a crgastro", "--library", str(tmp_path / "lib"), "--json", "-k", "2"]) == 0
    document = json.loads(capsys.readouterr().out)
    assert document["selection"][0]["name"] == "corgi"
    assert len(document["hits"]) <= 2
    assert document["hits"][0]["signals"]["trigger"]["rank"] == 1


def test_search_says_what_was_not_picked_and_why(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    make_library(tmp_path / "lib")
    prompt = "neoncity, mossyforest, cstlsea, gldteapot, crgastro, redscarf"
    assert main(["search", prompt, "--library", str(tmp_path / "lib")]) == 0
    assert "not picked: scarf: limit of 5 adapters reached" in capsys.readouterr().out
    assert main(["search", prompt, "--library", str(tmp_path / "lib"), "--json"]) == 0
    document = json.loads(capsys.readouterr().out)
    assert document["rejected"] == [{"name": "scarf", "reason": "limit of 5 adapters reached", "capped": True}]
    assert document["selection"][0]["explains"] == ["neoncity"]


def test_search_takes_the_cap_and_says_how_to_raise_it(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    make_library(tmp_path / "lib")
    prompt = "neoncity, mossyforest, cstlsea, gldteapot, crgastro, redscarf"
    assert main(["search", prompt, "--library", str(tmp_path / "lib")]) == 0
    assert "; raise the cap with --max-loras" in capsys.readouterr().out
    assert main(["search", prompt, "--library", str(tmp_path / "lib"), "--max-loras", "6", "--json"]) == 0
    document = json.loads(capsys.readouterr().out)
    assert len(document["selection"]) == 6
    assert document["rejected"] == []


def test_compose_auto_lists_what_the_cap_left_out(tmp_path: Path, capsys: pytest.CaptureFixture[str], tiny_sd) -> None:
    make_library(tmp_path / "lib")
    argv = ["crgastro in a redscarf by a gldteapot", "--loras", "auto", "--library", str(tmp_path / "lib")]
    argv += ["--model", "tiny-sd", "--steps", "1", "--out", str(tmp_path / "out"), "--max-loras", "2"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "left out teapot: limit of 2 adapters reached; raise the cap with --max-loras" in out
    assert main([*argv, "--json"]) == 0
    document = json.loads(capsys.readouterr().out)
    assert [a["name"] for a in document["adapters"]] == ["corgi", "scarf"]
    assert document["rejected"] == [{"name": "teapot", "reason": "limit of 2 adapters reached", "capped": True}]
    with pytest.raises(SystemExit) as exit_info:
        main([*argv[:-2], "--max-loras", "0"])
    assert exit_info.value.code == 2


def test_a_cap_without_auto_is_an_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    make_library(tmp_path / "lib")
    argv = ["a crgastro", "--loras", "corgi", "--library", str(tmp_path / "lib"), "--max-loras", "2"]
    assert main([*argv, "--model", "tiny-sd", "--out", str(tmp_path / "out")]) == 1
    assert "--max-loras only applies with --loras auto" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_train_retriever_command_then_search_uses_it(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    library = make_library(tmp_path / "lib")
    argv = ["train-retriever", "--library", str(library.root), "--steps", "30", "--dim", "32", "--json"]
    assert main([*argv, "--text-model", TINY_MODEL]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["described"] == 6
    assert report["validation"] is None
    assert Path(report["checkpoint"]) == checkpoint_path(library, "sd1")
    assert main(["search", "corgi astronaut", "--library", str(library.root), "--json"]) == 0
    document = json.loads(capsys.readouterr().out)
    assert all("learned" in hit["signals"] for hit in document["hits"])
    assert not any("no trained checkpoint" in note for note in document["notes"])


def test_train_retriever_says_whether_its_signal_was_validated(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    library = make_library(tmp_path / "lib")
    argv = ["train-retriever", "--library", str(library.root), "--steps", "10", "--dim", "32"]
    assert main([*argv, "--text-model", TINY_MODEL]) == 0
    out = capsys.readouterr().out
    assert "trained the sd1 retriever on 6 described adapters" in out
    assert "held-out check: too few described adapters" in out


def test_train_retriever_reports_a_library_without_metadata(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "empty").mkdir()
    assert main(["train-retriever", "--library", str(tmp_path / "empty"), "--text-model", TINY_MODEL]) == 1
    assert "error:" in capsys.readouterr().err


def test_demo_library_selects_the_adapters_named_by_trigger_words(example_library: Path, tiny_sd) -> None:
    for retriever in (Retriever(Library(example_library)), Retriever(Library(example_library), pipe=tiny_sd)):
        picks = retriever.select("a corgi astronaut wearing a red scarf, film grain")
        assert {p.name: p.weight for p in picks} == {"corgi_astronaut": 0.8, "red_scarf": 0.7, "film_grain": 0.8}
        picks = retriever.select("pxknight in a neoncity, wtrclr")
        assert {p.name for p in picks} == {"pixel_knight", "neon_city", "watercolor"}
        assert retriever.select("a plain photo of a cat") == []
    assert len(retriever.rank("a plain photo of a cat")) == 8  # zero-shot scores all eight demo adapters
