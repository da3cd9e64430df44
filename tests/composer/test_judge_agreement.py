"""The shipped judge against images of toy-sd labelled by eye: the held-out part, which no choice about the judge
ever looked at, must keep the agreement published in docs/judge.md.

Concept presence (precision and recall) and unasked styles or objects meet their targets. Per attribute, the
judge's answers are right at least 96% of the time, but it is unsure often enough that plain agreement stays
under the 96% target for shape, colour, clothing and style; the floor below is what is measured today, so a
change that loses agreement fails here."""

from __future__ import annotations

import pytest

from benchmarks.judge_labels import LABEL_VALUES, agreement, consensus, load_set
from composer.toyworld.reader import UNSURE
from composer.toyworld.verdict import judge_images
from composer.toyworld.world import ATTRIBUTES

ATTRIBUTE_AGREEMENT = 0.87
RIGHT_WHEN_ANSWERED = 0.96
CONCEPT_PRECISION = 0.97
CONCEPT_RECALL = 0.85
UNASKED_REPORTED = 0.02


@pytest.fixture(scope="module")
def held_out() -> tuple[dict, list]:
    recipes, labels, images = load_set()
    keep = [i for i, r in enumerate(recipes) if r["part"] == "held_out" and r["id"] in labels]
    chosen = [recipes[i] for i in keep]
    verdicts = judge_images(images[keep], [r["prompt"] for r in chosen], [r["adapters"] for r in chosen])
    return agreement(chosen, labels, [v.seen for v in verdicts]), verdicts


def test_the_held_out_part_is_large_and_labelled_by_two_readers() -> None:
    recipes, labels, _ = load_set()
    held = [r for r in recipes if r["part"] == "held_out"]
    assert len(held) >= 150
    assert all(r["id"] in labels for r in held)
    kinds = {r["kind"] for r in held}
    assert {"base", "alone", "k=2", "k=3", "k=4", "k=5"} <= kinds


def test_every_attribute_agrees_with_the_eye(held_out: tuple[dict, list]) -> None:
    result, _ = held_out
    for attr in ATTRIBUTES:
        row = result["attributes"][attr]
        assert row["agree"] / row["labelled"] >= ATTRIBUTE_AGREEMENT, (attr, row)
        assert row["right_when_answered"] / row["answered"] >= RIGHT_WHEN_ANSWERED, (attr, row)


def test_concept_presence_is_precise_and_found(held_out: tuple[dict, list]) -> None:
    result, _ = held_out
    row = result["concepts_all"]
    assert row["true_present"] / row["judge_present"] >= CONCEPT_PRECISION, row
    assert row["true_present"] / row["eye_present"] >= CONCEPT_RECALL, row


def test_unasked_styles_and_objects_are_rarely_reported(held_out: tuple[dict, list]) -> None:
    result, _ = held_out
    assert result["unasked_reported"] / result["images"] <= UNASKED_REPORTED, result["unasked_reported"]


def test_an_unsure_reading_never_counts_as_found(held_out: tuple[dict, list]) -> None:
    _, verdicts = held_out
    for verdict in verdicts:
        for name, found in verdict.concepts.items():
            if verdict.concept_state(name) == "unsure":
                assert not found
        assert not verdict.all_found or not verdict.unsure


def test_consensus_needs_a_majority() -> None:
    first = dict.fromkeys(ATTRIBUTES, "none") | {"background": "sky", "shape": "star", "colour": "purple"}
    second = first | {"colour": "blue"}
    third = first | {"colour": "blue", "shape": UNSURE}
    assert consensus([first, first])["colour"] == "purple"
    assert consensus([first, second])["colour"] == UNSURE
    assert consensus([first, second, third])["colour"] == "blue"
    assert consensus([first, second, third])["shape"] == "star"
    assert set(LABEL_VALUES) == set(ATTRIBUTES)
