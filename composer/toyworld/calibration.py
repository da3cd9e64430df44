"""Fit the reader's thresholds (:class:`composer.toyworld.reader.Calibration`) to images labelled by eye.

Each threshold is chosen on the labelled images it is given alone, attribute by attribute, to maximise
``agreements − cost × disagreements − abstain × unsure readings`` over the images whose label is not ``unsure``: a
wrong reading costs ``cost`` right ones, and leaving a value the eye names unread costs :data:`ABSTAIN` (½). The cost
may depend on what the wrong reading claims: a reading that says something is there (a value some concept sets, any
clothing, style or object but ``none``, or a bare head) costs :data:`PENALTY`, any other :data:`PLAIN_PENALTY`. Both
are 1. Cross-fitted on the five labelled sets (thresholds fitted on some folds, read on another), the cost of an
unsure reading moves colour from 94.5% (free) to 96.5% (½ or 1) of the fills the eye names; at 1 it also answers
doubtful concepts and precision falls from 97.1% to 96.3%, under its 97% target (docs/judge.md).

A style that has a measure (:data:`composer.toyworld.reader.STYLE_GATES`) gets its probability floor and the
measure it needs chosen together: fitted one after the other, a floor set high against confident wrong answers the
measure would have ruled out shuts out the right answers too, and the measure, with nothing read, never moves.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from composer.toyworld.measures import NAMED_HUES
from composer.toyworld.reader import STYLE_GATES, UNSURE, Calibration, colour_names
from composer.toyworld.world import ATTRIBUTES, CONCEPTS, VOCABULARY

PENALTY = 1.0
"""What a wrong strict reading (:func:`is_strict`) costs, in right readings."""
PLAIN_PENALTY = 1.0
"""What any other wrong reading costs, in right readings."""
ABSTAIN = 0.5
"""What an unsure reading costs where the eye names a value, in right readings."""
FLOORS = (0.0, 0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95, 0.98, 0.99, 0.995, 0.999)
COLOUR_RULES = ("agree", "hue")
BANDS = (0.0, 2.0, 4.0, 6.0, 8.0, 12.0)
PURITIES = (0.0, 0.4, 0.5, 0.6, 0.7, 0.8)
PIXELS = (0.0, 30.0, 60.0, 100.0, 150.0)
BOUNDARY_SHARES = (0.5, 0.45, 0.55, 0.4, 0.6, 0.35, 0.65, 0.3, 0.7, 0.2, 0.8)
"""Where between two neighbouring named hues a boundary may sit, as the share of the way from the first; nearest
the midpoint first, so that where the labels do not decide, the boundary stays at the midpoint."""
QUANTILES = tuple(i / 40 for i in range(1, 40))


def _score(readings: Sequence[str], labels: Sequence[str], cost: Callable[[str], float], abstain: float) -> float:
    total = 0.0
    for seen, label in zip(readings, labels):
        if label == UNSURE:
            continue
        if seen == UNSURE:
            total -= abstain
        else:
            total += 1.0 if seen == label else -cost(seen)
    return total


def _argmax_value(row: dict[str, Any], attr: str) -> tuple[str, float]:
    probabilities = row["probabilities"][attr]
    best = max(range(len(probabilities)), key=probabilities.__getitem__)
    return VOCABULARY[attr][best], probabilities[best]


def _best(options: Sequence[Any], score: Callable[[Any], float]) -> Any:
    """The option with the highest score (the first among equals: options go from lenient to strict)."""
    return max(options, key=lambda option: (score(option), -options.index(option)))


def fit(
    rows: Sequence[dict[str, Any]],
    labels: Sequence[dict[str, str]],
    penalty: float = PENALTY,
    plain_penalty: float = PLAIN_PENALTY,
    abstain: float = ABSTAIN,
) -> Calibration:
    """Thresholds for evidence ``rows`` (:meth:`Evidence.row`) against eye ``labels`` (attribute → value or unsure):
    each maximises agreements − cost × disagreements − ``abstain`` × unsure readings where the eye names a value,
    the cost being ``penalty`` for a wrong reading that :func:`is_strict` and ``plain_penalty`` for any other; a
    gated style's floor and the least measure it needs are chosen together. Deterministic; every choice is on the
    given images only."""
    from composer.toyworld.reader import Evidence, read_column

    calibration = Calibration()
    evidence = Evidence.from_rows(rows)

    def agreement(attr: str) -> float:
        readings = read_column(evidence, calibration, attr)

        def cost(seen: str) -> float:
            return penalty if is_strict(attr, seen) else plain_penalty

        return _score(readings, [label[attr] for label in labels], cost, abstain)

    names = colour_names()
    calibration.boundaries = {
        f"{a}|{b}": _midpoint(NAMED_HUES[a], NAMED_HUES[b]) for a, b in zip(names, names[1:] + names[:1])
    }
    for _round in range(2):
        for attr in ATTRIBUTES:
            for value in VOCABULARY[attr]:

                def with_floor(floor: float, attr: str = attr, value: str = value) -> float:
                    calibration.floor[attr][value] = floor
                    return agreement(attr)

                calibration.floor[attr][value] = _best(FLOORS, with_floor)
        for pair in list(calibration.boundaries):
            low, high = (NAMED_HUES[name] for name in pair.split("|"))
            span = (high - low) % 360
            candidates = tuple((low + span * share) % 360 for share in BOUNDARY_SHARES)

            def with_boundary(value: float, pair: str = pair) -> float:
                calibration.boundaries[pair] = value
                return agreement("colour")

            calibration.boundaries[pair] = _best(candidates, with_boundary)
        for name, options in (
            ("colour_rule", COLOUR_RULES),
            ("band", BANDS),
            ("min_purity", PURITIES),
            ("min_pixels", PIXELS),
        ):

            def with_setting(value: float, name: str = name) -> float:
                setattr(calibration, name, value)
                return agreement("colour")

            setattr(calibration, name, _best(options, with_setting))
        for style, measure in STYLE_GATES.items():
            values = sorted(row[measure] for row in rows)
            needs = tuple(dict.fromkeys((0.0, *(values[round(q * (len(values) - 1))] for q in QUANTILES))))

            def with_gate(pair: tuple[float, float], style: str = style) -> float:
                calibration.floor["style"][style], calibration.style_needs[style] = pair
                return agreement("style")

            pairs = [(floor, need) for need in needs for floor in FLOORS]
            calibration.floor["style"][style], calibration.style_needs[style] = _best(pairs, with_gate)
    return calibration


def _midpoint(a: float, b: float) -> float:
    return (a + ((b - a) % 360) / 2) % 360


_CONCEPT_VALUES = frozenset(item for concept in CONCEPTS.values() for item in concept.sets.items())
"""Every (attribute, value) some concept sets."""


def is_strict(attr: str, value: str) -> bool:
    """Whether a wrong reading of ``value`` costs :data:`PENALTY`: it says something is there (a value a concept
    sets, or any clothing, style or object other than ``none``) or that the head is bare (clothing ``none``)."""
    if attr == "clothing":
        return True
    if attr in ("style", "object"):
        return value != "none"
    return (attr, value) in _CONCEPT_VALUES
