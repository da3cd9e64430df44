"""Every name the package exports lazily resolves to the object of that name."""

from __future__ import annotations

import pytest

import retrieval


@pytest.mark.parametrize("name", retrieval.__all__)
def test_every_exported_name_resolves(name: str) -> None:
    value = getattr(retrieval, name)
    assert getattr(value, "__name__", name) == name
