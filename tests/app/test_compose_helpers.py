"""The Compose tab's editor table ↔ adapter requests, and the service's request checks (no server needed)."""

from __future__ import annotations

import pytest

from composer.facade import ChosenAdapter, CompositionResult, RejectedAdapter
from composer.service import ComposerError, CompositionService, LoraTag, adapter_request


def test_editor_rows_become_requests() -> None:
    from app.compose_tab import adapter_requests

    rows = [
        ["corgi_astronaut", 0.7, "", "OUTALL", "", "0.5"],
        ["", 1.0, "", "", "", ""],
        ["watercolor", None, "0@0, 1@0.5", "", "2", ""],
    ]
    first, second = adapter_requests(rows)
    assert first == LoraTag("corgi_astronaut", 0.7, block_weights="OUTALL", stop=0.5)
    assert second == LoraTag("watercolor", "0@0,1@0.5", start=2.0), "the schedule replaces the weight"


def test_editor_rejects_non_numbers() -> None:
    from app.compose_tab import adapter_requests

    with pytest.raises(ComposerError, match="start 'soon' is not a number"):
        adapter_requests([["corgi_astronaut", 0.8, "", "", "soon", ""]])


def test_schedule_must_be_keyframes() -> None:
    with pytest.raises(ComposerError, match="not a keyframe list"):
        adapter_request("x", schedule="fast")


def test_sync_editor_keeps_edits_and_follows_the_picker() -> None:
    from app.compose_tab import sync_editor

    rows = [["a", 0.3, "0@0,1@1", "", "", ""], ["b", 0.9, "", "", "", ""]]
    assert sync_editor(["b", "c"], rows) == [["b", 0.9, "", "", "", ""], ["c", 0.8, "", "", "", ""]]
    assert sync_editor([], rows) == []


def test_service_rejects_empty_prompt_and_zero_workers(tmp_path) -> None:
    with pytest.raises(ComposerError, match="workers must be at least 1"):
        CompositionService(out=tmp_path, workers=0)
    with pytest.raises(ComposerError, match="prompt is empty"):
        CompositionService(out=tmp_path).compose("  ", None)
    assert CompositionService(out=tmp_path).library_root is None


def test_why_table_lists_what_the_automatic_pick_left_out() -> None:
    from app.compose_tab import why_rows

    used = ChosenAdapter(LoraTag("corgi", 0.8), source="auto", score=1.0, reasons=["trigger word in prompt"])
    rejected = [
        RejectedAdapter("teapot", "limit of 1 adapters reached", capped=True),
        RejectedAdapter("pup", "same words", "corgi"),
    ]
    result = CompositionResult([], "p", [used], "merge", 0, 1, 0.1, rejected=rejected)
    rows = why_rows(result)
    assert rows[0][:3] == ["corgi", 0.8, "auto"]
    assert rows[1] == [
        "teapot",
        None,
        "left out",
        None,
        "limit of 1 adapters reached; raise 'Most adapters' to include it",
    ]
    assert rows[2] == ["pup", None, "left out", None, "same words (kept corgi)"]
    assert result.as_dict()["rejected"] == [
        {"name": "teapot", "reason": "limit of 1 adapters reached", "capped": True},
        {"name": "pup", "reason": "same words", "lost_to": "corgi", "capped": False},
    ]


def test_the_cap_hint_follows_the_capped_field_not_the_wording() -> None:
    from app.compose_tab import left_out_reason

    assert left_out_reason(RejectedAdapter("a", "too many", capped=True)) == (
        "too many; raise 'Most adapters' to include it"
    )
    assert left_out_reason(RejectedAdapter("b", "limit of words", "c")) == "limit of words (kept c)"


def test_the_slider_default_is_the_composers_and_caps_only_the_automatic_pick() -> None:
    from app import compose_tab
    from composer.service import AUTO, DEFAULT_MAX_LORAS

    assert compose_tab.DEFAULT_MAX_LORAS == DEFAULT_MAX_LORAS == 5
    assert compose_tab.auto_cap(AUTO, 3) == 3
    assert compose_tab.auto_cap(AUTO, None) == DEFAULT_MAX_LORAS
    assert compose_tab.auto_cap("manual", 3) is None


def test_a_cap_without_auto_is_a_typed_error(tmp_path) -> None:
    from composer.facade import Composer
    from fusion.errors import CompositionError

    for loras in ("corgi", None, ["corgi"], {"corgi": 0.5}):
        with pytest.raises(CompositionError, match="only applies with --loras auto"):
            Composer(library=tmp_path).choose("a dog", loras, max_loras=2)
    assert Composer(library=tmp_path).choose("a dog", "corgi")[1][0].request.name == "corgi"


def test_a_cap_below_one_is_a_typed_error(tmp_path) -> None:
    from composer.facade import Composer

    with pytest.raises(ComposerError, match="max_loras must be a whole number"):
        Composer(library=tmp_path).choose("a dog", "auto", max_loras=0)
