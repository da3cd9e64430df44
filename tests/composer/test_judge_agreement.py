"""The shipped judge against the held-out set: toy-sd images drawn on other seeds than the sets the judge was fitted
on and labelled blind by other readers, which no choice about the judge ever looked at. The judge must meet the
targets published in docs/judge.md there: per attribute it agrees with the eye (an unsure reading counts as
disagreeing) on at least 96% of the images the eye is sure of; a concept it says is present the eye sees in at
least 97% of cases, and it finds at least 85% of those the eye sees; it reports a style or object that nobody asked
for and the eye does not see in at most 2% of the images.

Where the shipped judge is still below a target, that check is a strict expected failure naming the measured value
(it turns into a failure the day the judge meets it, so the mark is removed with the change that does), and a floor
at the measured value keeps a later judge from doing worse unnoticed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from benchmarks.judge_labels import (
    FRESH_FOLDER,
    LABEL_VALUES,
    UNREAD_FOLDER,
    Recipe,
    agreement,
    consensus,
    labelled_sets,
    load_set,
)
from composer.toyworld.reader import UNSURE
from composer.toyworld.verdict import judge_images
from composer.toyworld.world import ATTRIBUTES

ATTRIBUTE_AGREEMENT = 0.96
CONCEPT_PRECISION = 0.97
CONCEPT_RECALL = 0.85
UNASKED_REPORTED = 0.02

SHIPPED_AGREEMENT = {
    "background": 0.990,
    "shape": 0.950,
    "colour": 0.992,
    "clothing": 0.956,
    "style": 0.946,
    "object": 0.980,
}
"""The shipped judge's agreement with the eye on the held-out set, per attribute (docs/judge_agreement.md)."""
SHIPPED_PRECISION, SHIPPED_RECALL = 0.951, 0.962


def _below_target(measured: float, target: float) -> pytest.MarkDecorator:
    """A strict expected failure when the shipped judge measured below ``target`` (no mark otherwise)."""
    reason = f"the shipped judge measures {measured:.1%}, the target is {target:.0%}"
    return pytest.mark.xfail(measured < target, strict=True, reason=reason)


held_out_labelled = pytest.mark.skipif(
    not (FRESH_FOLDER / "labels.json").is_file(),
    reason=f"the held-out set has no labels yet ({FRESH_FOLDER.name}/labels.json): it is labelled blind, by readers "
    "other than those of the sets the judge was fitted on, after the judge is fixed",
)


@pytest.fixture(scope="module")
def held_out() -> tuple[dict, list]:
    recipes, labels, images = load_set(FRESH_FOLDER)
    keep = [i for i, r in enumerate(recipes) if r["id"] in labels]
    chosen = [recipes[i] for i in keep]
    verdicts = judge_images(images[keep], [r["prompt"] for r in chosen], [r["adapters"] for r in chosen])
    return agreement(chosen, labels, [v.seen for v in verdicts]), verdicts


@held_out_labelled
@pytest.mark.parametrize("folder", [FRESH_FOLDER, UNREAD_FOLDER], ids=["held-out", "unread"])
def test_the_held_out_set_is_large_labelled_and_of_every_kind(folder: Path) -> None:
    """The shipped judge's held-out set, and the one kept unread for the next judge (checked here without a judge
    reading it)."""
    recipes, labels, _ = load_set(folder)
    assert len(recipes) >= 150
    assert all(r["id"] in labels for r in recipes)
    assert {"base", "alone", "k=2", "k=3", "k=4", "k=5"} <= {r["kind"] for r in recipes}


@held_out_labelled
@pytest.mark.parametrize(
    "attr", [pytest.param(a, marks=_below_target(SHIPPED_AGREEMENT[a], ATTRIBUTE_AGREEMENT)) for a in ATTRIBUTES]
)
def test_the_attribute_agrees_with_the_eye(held_out: tuple[dict, list], attr: str) -> None:
    row = held_out[0]["attributes"][attr]
    assert row["agree"] / row["labelled"] >= ATTRIBUTE_AGREEMENT, row


@held_out_labelled
@_below_target(SHIPPED_PRECISION, CONCEPT_PRECISION)
def test_a_concept_the_judge_finds_is_there(held_out: tuple[dict, list]) -> None:
    row = held_out[0]["concepts_all"]
    assert row["true_present"] / row["judge_present"] >= CONCEPT_PRECISION, row


@held_out_labelled
@_below_target(SHIPPED_RECALL, CONCEPT_RECALL)
def test_a_concept_the_eye_sees_is_found(held_out: tuple[dict, list]) -> None:
    row = held_out[0]["concepts_all"]
    assert row["true_present"] / row["eye_present"] >= CONCEPT_RECALL, row


@held_out_labelled
def test_the_judge_does_no_worse_than_the_shipped_one(held_out: tuple[dict, list]) -> None:
    result, _ = held_out
    for attr, floor in SHIPPED_AGREEMENT.items():
        row = result["attributes"][attr]
        assert row["agree"] / row["labelled"] >= floor - 5e-4, (attr, row)
    row = result["concepts_all"]
    assert row["true_present"] / row["judge_present"] >= SHIPPED_PRECISION - 5e-4, row
    assert row["true_present"] / row["eye_present"] >= SHIPPED_RECALL - 5e-4, row


@held_out_labelled
def test_unasked_styles_and_objects_are_rarely_reported(held_out: tuple[dict, list]) -> None:
    result, _ = held_out
    assert result["unasked_reported"] / result["images"] <= UNASKED_REPORTED, result["unasked_reported"]


@held_out_labelled
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


def _tiny_set(folder: Path, batches: list[int]) -> None:
    (folder / "images").mkdir(parents=True)
    recipes, labelled = [], {}
    for image_id, batch in enumerate(batches):
        Image.new("RGB", (64, 64), (image_id * 40, 0, 0)).save(folder / "images" / f"{image_id:04d}.png")
        recipes.append({"id": image_id, "batch": batch, "kind": "k=2", "prompt": "p", "adapters": []})
        reading = dict.fromkeys(ATTRIBUTES, "none") | {"background": "sky", "shape": "star", "colour": "red"}
        labelled[str(image_id)] = {"readings": [reading | {"reader": "a"}, reading | {"reader": "b"}]}
    (folder / "recipes.json").write_text(json.dumps({"images": recipes}))
    (folder / "labels.json").write_text(json.dumps({"images": labelled}))


def test_labelled_sets_number_ids_and_batches_on_per_set(tmp_path: Path) -> None:
    _tiny_set(tmp_path / "first", [0, 0, 1])
    _tiny_set(tmp_path / "second", [0, 1])
    recipes, labels, images = labelled_sets([tmp_path / "first", tmp_path / "second"])
    assert [r["id"] for r in recipes] == [0, 1, 2, 3, 4]
    assert [r["batch"] for r in recipes] == [0, 0, 1, 2, 3]
    assert sorted(labels) == [0, 1, 2, 3, 4]
    assert images.shape == (5, 3, 64, 64)
    assert float(images[3, 0].mean()) == 0.0
    assert float(images[4, 0].mean()) == pytest.approx(40 / 255)


def test_a_set_without_labels_is_refused_by_name(tmp_path: Path) -> None:
    _tiny_set(tmp_path / "first", [0, 1])
    _tiny_set(tmp_path / "unlabelled", [0])
    (tmp_path / "unlabelled" / "labels.json").write_text(json.dumps({"images": {}}))
    with pytest.raises(SystemExit, match=r"unlabelled.*no labelled image"):
        labelled_sets([tmp_path / "first", tmp_path / "unlabelled"])


def test_calibrate_fits_with_the_cost_the_command_line_gives(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """``calibrate --penalty`` reaches the thresholds' fit, so a variant's numbers reproduce from the command line."""
    from benchmarks import judge_labels

    fitted: list[Recipe] = []
    monkeypatch.setattr(judge_labels, "calibrate", lambda _folders, _weights, recipe: fitted.append(recipe) or 0)
    assert judge_labels.main(["calibrate", "--weights", str(tmp_path), "--penalty", "2"]) == 0
    assert judge_labels.main(["calibrate", "--weights", str(tmp_path)]) == 0
    assert [recipe.penalty for recipe in fitted] == [2.0, Recipe().penalty]
