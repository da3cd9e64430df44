"""Reading how consistently each kohya caption tag occurs in its dataset folder, and the folders' names."""

from __future__ import annotations

import json

from weights_index.kohya_captions import CaptionPresence, caption_presence, folder_names
from weights_index.metadata import AdapterMetadata, read_metadata


def test_share_of_captions_uses_the_declared_image_count() -> None:
    frequency = json.dumps({"10_img": {"omertosa": 20, "1girl": 20, "wolf ears": 17, "smile": 4}})
    dirs = json.dumps({"10_img": {"n_repeats": 10, "img_count": 20}})
    found = caption_presence(frequency, dirs)
    assert found["omertosa"] == CaptionPresence(20, 20, "10_img")
    assert found["wolf ears"].share == 0.85
    assert "smile" not in found  # in 4 of 20 captions: a description of some images, not kept
    assert found["omertosa"].describe() == "20 of 20 captions of '10_img'"


def test_without_image_counts_the_most_frequent_tag_sizes_the_folder() -> None:
    frequency = json.dumps({"5_data": {"ohwx": 12, "portrait": 11, "hat": 3}, "3_other": {"ohwx": 2, "hat": 2}})
    found = caption_presence(frequency)
    assert found["ohwx"] == CaptionPresence(12, 12, "5_data")  # the bigger folder wins a tie of shares
    assert found["hat"] == CaptionPresence(2, 2, "3_other")  # its most consistent folder


def test_declared_counts_never_shrink_a_folder_below_its_tags() -> None:
    frequency = json.dumps({"10_x": {"tok": 30}})
    assert caption_presence(frequency, json.dumps({"10_x": {"img_count": 10}}))["tok"].share == 1.0


def test_broken_or_odd_values_are_skipped() -> None:
    assert caption_presence("{not json") == {}
    assert caption_presence(json.dumps({"1_x": {"a": "many", "b": -3, "c": float("inf"), "d": True}})) == {}
    assert caption_presence(json.dumps([1, 2])) == {}


def test_folder_names_leave_out_generic_ones() -> None:
    frequency = json.dumps(
        {"10_img": {}, "5_Texas the Omertosa": {}, "2_data": {}, "reg": {}, "3_texas the omertosa": {}}
    )
    assert folder_names(frequency) == ("Texas the Omertosa",)


def test_metadata_carries_the_presence_and_survives_json() -> None:
    header = {
        "ss_tag_frequency": json.dumps({"10_img": {"omertosa": 20, "1girl": 20, "smile": 3}}),
        "ss_dataset_dirs": json.dumps({"10_img": {"n_repeats": 10, "img_count": 20}}),
    }
    meta = read_metadata("/nonexistent/texas.safetensors", header)
    assert meta.presence("Omertosa") == CaptionPresence(20, 20, "10_img")
    assert meta.presence("smile") is None
    assert meta.dataset_folders == ()  # "10_img" says nothing
    again = AdapterMetadata.from_json(json.loads(json.dumps(meta.to_json())))
    assert again.presence("omertosa") == CaptionPresence(20, 20, "10_img")
