"""The ComposLoRA-style library: the testbed's compositions and its kohya-only files are as documented."""

from __future__ import annotations

from pathlib import Path

from benchmarks.composlora_library import TESTBED, compositions, write_testbed
from weights_index.catalog import Library


def test_the_testbed_has_240_compositions_per_style_each_with_one_character() -> None:
    for style in ("anime", "reality"):
        combos = compositions(style)
        assert len(combos) == 240
        assert all(c[0].category == "character" and len({lora.category for lora in c}) == len(c) for c in combos)
        assert sum(len(c) == 5 for c in combos) == 48


def test_kohya_only_files_state_their_triggers_only_in_caption_counts(tmp_path: Path) -> None:
    stems, carriers = write_testbed(tmp_path)
    assert len(stems) == len(TESTBED) == 22
    assert sorted(carriers.values()).count("kohya") == 6
    library = Library(tmp_path)
    library.scan()
    entries = {entry.name: entry for entry in library.entries()}
    for lora in TESTBED:
        entry = entries[stems[lora.title]]
        if carriers[lora.title] == "kohya":
            assert entry.trigger_words == ()
            assert entry.metadata.presence(lora.triggers[0]).share == 1.0
        else:
            assert lora.triggers[0] in entry.trigger_words
