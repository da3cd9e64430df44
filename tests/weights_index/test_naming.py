"""Names reduced to comparable words; versions and copies read from names; prompts split into parts."""

from __future__ import annotations

import pytest

from weights_index.naming import content_words, is_copy_name, name_words, prompt_runs, version_of


@pytest.mark.parametrize(
    ("name", "expected", "version"),
    [
        ("Makima (Chainsaw Man) v2", ("makima", "chainsaw", "man"), (2,)),
        ("makima_chainsaw_man-v1.5", ("makima", "chainsaw", "man"), (1, 5)),
        ("MakimaChainsawMan_v20", ("makima", "chainsaw", "man"), (20,)),
        ("Film Grain LoRA SD1.5", ("film", "grain"), None),
        ("Ghibli Style XL", ("ghibli", "style"), None),
        ("Girl with a Pearl Earring ver 3", ("girl", "pearl", "earring"), (3,)),
        ("lora", ("lora",), None),
    ],
)
def test_name_words_and_versions(name: str, expected: tuple[str, ...], version: tuple[int, ...] | None) -> None:
    assert name_words(name) == expected
    assert version_of(name) == version


def test_parentheses_copies_and_prompts() -> None:
    assert name_words("Makima (Chainsaw Man)", keep_parentheses=False) == ("makima",)
    assert [is_copy_name(n) for n in ("x (1)", "x - Copy", "x copy 2", "Carbon Copy", "x")] == [
        True,
        True,
        True,
        False,
        False,
    ]
    assert name_words("makima (1)") == ("makima",)
    assert content_words("a brightHoodie on the Beach") == ["bright", "hoodie", "beach"]
    assert prompt_runs("a fox with a hat, film grain") == [
        [("fox", False), ("hat", True)],
        [("film", False), ("grain", False)],
    ]


def test_a_packaging_word_glued_to_a_name_is_cut_off() -> None:
    assert name_words("umbrellalora_v2") == ("umbrella",)
    assert name_words("scarlett-johanssonlora") == ("scarlett", "johansson")
    assert name_words("flora") == ("flora",)  # too little would stay: a word, not a glued name
    assert name_words("lora") == ("lora",)


def test_a_name_ending_like_a_packaging_word_still_matches_a_prompt_writing_it() -> None:
    assert content_words("an umbrellalora, in the rain") == ["umbrella", "rain"]
    assert content_words("angelora") == list(name_words("Angelora"))
    assert [word for word, _ in prompt_runs("angelora, on a beach")[0]] == list(name_words("Angelora"))
