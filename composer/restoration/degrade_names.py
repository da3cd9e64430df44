"""The degradation names of :mod:`composer.restoration.degrade`, importable without torch (for CLI choices)."""

DEGRADATIONS = ("noise", "rain", "haze", "jpeg", "lowlight")
"""Names accepted by :func:`composer.restoration.degrade.degrade` and ``compose make-pairs --degrade``."""
