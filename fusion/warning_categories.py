"""Warning categories: what LoRA Composer reports through :mod:`warnings` when it goes on rather than refuses.

Filter them like any other category, e.g. ``warnings.simplefilter("ignore", ComposerWarning)``; ``compose -q``
silences them.
"""

from __future__ import annotations


class ComposerWarning(UserWarning):
    """Base of every warning LoRA Composer issues."""


class MeaninglessScoreWarning(ComposerWarning):
    """A score was computed by machinery without the weights that give it meaning (e.g. CLIP-IQA on random CLIP)."""
