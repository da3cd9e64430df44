"""Floor 1: the adapter math inside a denoiser — canonical adapter kinds, composed layers, weight tables, strategies.

Public names are imported lazily so that light entry points (``compose --help``, ``compose index``) that only need
:mod:`fusion.errors` do not import torch.
"""

from __future__ import annotations

from fusion.lazy_exports import lazy_getattr

_EXPORTS = {
    "FAMILIES": "fusion.adapters",
    "Adapter": "fusion.adapters",
    "AdapterKind": "fusion.adapters",
    "Dense": "fusion.adapters",
    "LowRank": "fusion.adapters",
    "Sparse": "fusion.adapters",
    "ComposerError": "fusion.errors",
}

__all__ = sorted(_EXPORTS)

__getattr__ = lazy_getattr(__name__, _EXPORTS)
