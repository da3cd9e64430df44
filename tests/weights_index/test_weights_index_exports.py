"""Every name the package exports lazily resolves to the object of that name."""

from __future__ import annotations

import pytest

import weights_index


@pytest.mark.parametrize("name", weights_index.__all__)
def test_every_exported_name_resolves(name: str) -> None:
    value = getattr(weights_index, name)
    assert getattr(value, "__name__", name) == name


def test_an_unknown_name_is_an_attribute_error() -> None:
    with pytest.raises(AttributeError, match="no attribute 'nothing'"):
        weights_index.nothing  # noqa: B018
