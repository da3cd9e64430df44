"""User weights outside the documented range are refused where they are parsed (a finite 1e38 draws black)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from composer.prompts import adapter_request, extract_lora_tags, parse_lora_list
from fusion.errors import CompositionError
from fusion.schedules import parse_spec
from fusion.weight_range import WEIGHT_LIMIT, checked_weight
from weights_index.metadata import read_metadata

HUGE = ("1e38", "1e20", "-1e5", "1e308", "21")


@pytest.mark.parametrize("text", HUGE)
def test_prompt_tags_refuse_weights_outside_the_range(text: str) -> None:
    for prompt in (f"a cat <lora:zorbex:{text}>", f"a cat <lora:zorbex:0.5:te={text}>", "<lora:z:0@0,25@1>"):
        with pytest.raises(CompositionError, match="outside"):
            extract_lora_tags(prompt)


@pytest.mark.parametrize("text", HUGE)
def test_lists_specs_and_forms_refuse_weights_outside_the_range(text: str) -> None:
    with pytest.raises(CompositionError, match="outside"):
        parse_lora_list(f"zorbex:{text}")
    for spec in (float(text), text, f"1,{text},1", {"weight": float(text)}, [1.0, float(text)]):
        with pytest.raises(CompositionError, match="outside"):
            parse_spec(spec)
    with pytest.raises(CompositionError, match="outside"):
        adapter_request("zorbex", weight=float(text))


def test_the_range_itself_is_accepted() -> None:
    assert checked_weight(WEIGHT_LIMIT, "w") == WEIGHT_LIMIT
    assert checked_weight(-WEIGHT_LIMIT, "w") == -WEIGHT_LIMIT
    assert parse_spec(-2.5).weight == -2.5
    assert extract_lora_tags(f"<lora:a:{WEIGHT_LIMIT}:te=-1>")[1][0].weight == WEIGHT_LIMIT


def test_a_sidecar_preferred_weight_outside_the_range_is_refused_with_a_warning(tmp_path: Path) -> None:
    path = tmp_path / "a.safetensors"
    path.write_bytes(b"")
    (tmp_path / "a.json").write_text(json.dumps({"preferred weight": 1e30, "activation text": "zz"}))
    meta = read_metadata(path, {})
    assert meta.preferred_weight is None
    assert meta.trigger_words == ("zz",)
    assert any("preferred weight" in warning and "outside" in warning for warning in meta.warnings)
