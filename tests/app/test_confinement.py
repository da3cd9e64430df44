"""When serving, adapters come from the library by name only: a path in a prompt tag or the editor is refused
before any file is touched, with the same words whether or not the file exists, and never quoting its bytes."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import OUTSIDE_TEXT

from composer.service import adapter_request
from fusion.errors import ComposerError


@pytest.fixture
def outside_files(demo_library: Path) -> dict[str, Path]:
    folder = demo_library.parent / "outside"
    key = folder / "keys.safetensors"
    key.write_bytes(b"API_KEY=sk-live-secret-value\n")
    return {"existing": key, "missing": folder / "nothing_here.safetensors"}


def _refusal(service: object, **kwargs: object) -> str:
    with pytest.raises(ComposerError) as caught:
        service.compose("a cat", steps=1, **kwargs)  # type: ignore[attr-defined]
    return str(caught.value)


@pytest.mark.parametrize("kind", ["existing", "missing"])
def test_paths_in_prompt_tags_and_the_editor_are_refused(
    running_app, outside_files: dict[str, Path], kind: str
) -> None:
    service = running_app.service
    target = outside_files[kind]
    relative = Path("..") / "outside" / target.name
    messages = []
    for spec in (str(target), str(relative), f"character/../../outside/{target.name}"):
        messages.append(_refusal(service, adapters=[adapter_request(spec, 0.5)]))
        with pytest.raises(ComposerError) as caught:
            service.compose(f"a cat <lora:{spec}:0.5>", None, steps=1)
        messages.append(str(caught.value))
    for message in messages:
        assert "API_KEY" not in message
        assert "sk-live" not in message
        assert OUTSIDE_TEXT not in message
        assert "library" in message


def test_existing_and_missing_files_get_the_same_refusal(running_app, outside_files: dict[str, Path]) -> None:
    service = running_app.service
    texts = []
    for kind in ("existing", "missing"):
        target = outside_files[kind]
        text = _refusal(service, adapters=[adapter_request(str(target), 0.5)])
        texts.append(text.replace(target.name, "NAME"))
    assert texts[0] == texts[1]


def test_library_adapters_by_name_still_compose(running_app) -> None:
    service = running_app.service
    name = service.adapter_names()[0]
    result = service.compose("a cat", [adapter_request(name, 0.5)], steps=1)
    assert [a.name for a in result.adapters] == [name]
