"""Floor 1: the adapter math inside a denoiser — canonical adapter kinds, composed layers, weight tables, strategies.

Public names are imported lazily so that light entry points (``compose --help``, ``compose index``) that only need
:mod:`fusion.errors` do not import torch.
"""

from __future__ import annotations

from fusion.lazy_exports import lazy_exports

__all__, __getattr__ = lazy_exports(
    __name__,
    {
        ".adapters": ("FAMILIES", "Adapter", "AdapterKind", "Dense", "LowRank", "Sparse"),
        ".errors": ("ComposerError",),
    },
)
