"""A1111 prompt-tag parsing: weights, text-encoder overrides, block weights, schedules, bad tags."""

from __future__ import annotations

import pytest

from composer.prompts import LoraTag, extract_lora_tags, parse_lora_list, parse_tag
from fusion.errors import CompositionError


def test_plain_tags_are_removed_and_parsed() -> None:
    prompt, tags = extract_lora_tags("a corgi <lora:corgi:0.8>, film grain <lora:grain>")
    assert prompt == "a corgi, film grain"
    assert tags == [LoraTag("corgi", 0.8, 0.8), LoraTag("grain", 1.0, None, weight_given=False)]


def test_second_positional_overrides_denoiser_weight() -> None:
    tag = parse_tag("style:0.4:0.9")
    assert tag.text_encoder_weight == 0.4
    assert tag.weight == 0.9


def test_named_options() -> None:
    tag = parse_tag("char:1:lbw=INS:start=0.2:stop=15:te=0.5")
    assert tag.block_weights == "INS"
    assert (tag.start, tag.stop, tag.text_encoder_weight) == (0.2, 15.0, 0.5)
    assert parse_tag("x:lbw=1,0,0,1").block_weights == "1,0,0,1"


def test_keyframe_schedule_in_weight_position() -> None:
    tag = parse_tag("char:0@0,1@0.5")
    assert tag.weight == "0@0,1@0.5"
    assert tag.is_scheduled
    assert tag.text_encoder_weight is None


def test_repeated_name_keeps_last() -> None:
    _, tags = extract_lora_tags("<lora:a:0.1> x <lora:a:0.7>")
    assert [(t.name, t.weight) for t in tags] == [("a", 0.7)]


@pytest.mark.parametrize("body", ["", "x:abc", "x:1:2:3", "x:foo=1"])
def test_bad_tags_raise_typed_errors(body: str) -> None:
    with pytest.raises(CompositionError):
        parse_tag(body)


def test_cli_list_keeps_schedule_commas_together() -> None:
    tags = parse_lora_list("style:0.8, char:0@0,1@0.5,bg")
    assert [(t.name, t.weight) for t in tags] == [("style", 0.8), ("char", "0@0,1@0.5"), ("bg", 1.0)]
