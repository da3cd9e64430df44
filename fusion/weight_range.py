"""The range every user weight must lie in: a finite number within ±:data:`WEIGHT_LIMIT`.

Weights come from prompt tags, the CLI, the app's editor, API calls and sidecars' preferred weights; each is
checked here where it is parsed. Community LoRAs are used between about −5 and 5 (sliders at the ends); a weight
far outside that range only blows the image up (1e20 draws black, 1e38 overflows to NaN), so it is refused
instead. Block-weight entries and keyframe values are weights too and share the range.
"""

from __future__ import annotations

import math

from fusion.errors import CompositionError

WEIGHT_LIMIT = 20.0
"""The largest magnitude a weight, block weight or keyframe value may have."""


def weight_problem(value: float) -> str | None:
    """Why ``value`` is not an acceptable weight, or None when it is."""
    if not math.isfinite(value):
        return "is not a finite number"
    if abs(value) > WEIGHT_LIMIT:
        return f"is outside the range [-{WEIGHT_LIMIT:g}, {WEIGHT_LIMIT:g}]"
    return None


def checked_weight(value: float, what: str) -> float:
    """``value`` as a float when it is an acceptable weight; else :class:`CompositionError` naming ``what``."""
    value = float(value)
    problem = weight_problem(value)
    if problem is not None:
        raise CompositionError(
            f"{what} {value!r} {problem}", hint=f"use a weight between -{WEIGHT_LIMIT:g} and {WEIGHT_LIMIT:g}"
        )
    return value
