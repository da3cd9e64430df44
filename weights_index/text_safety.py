"""Text from files made storable: strings decoded from JSON can hold lone surrogates (``"\\udc80"``), and names
read from disk can hold undecodable bytes; neither can be written to SQLite or printed as UTF-8.

Every such code point is replaced (by ``?``) where text enters the library from a header or a sidecar, so the
catalog, the terminal and the app only ever see valid Unicode.
"""

from __future__ import annotations

import json
from typing import Any

REPLACEMENT = "?"


def is_valid_unicode(text: str) -> bool:
    """True when ``text`` encodes to UTF-8 (no lone surrogates, no undecodable-byte escapes)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def storable_text(text: str) -> str:
    """``text`` with every lone surrogate replaced by ``?`` (unchanged, and not copied, when already valid)."""
    if is_valid_unicode(text):
        return text
    return text.encode("utf-8", "replace").decode("utf-8")


def storable_json(value: Any) -> Any:
    """A parsed JSON value with every string in it (keys too) made storable; ``value`` itself when already clean.

    Goes through one serialisation instead of a recursive walk, so depth is bounded by what :func:`json.loads`
    already accepted.
    """
    text = json.dumps(value, ensure_ascii=False)
    if is_valid_unicode(text):
        return value
    return json.loads(storable_text(text))
