"""Floor 1: the adapter math inside a denoiser — canonical adapter kinds, composed layers, weight tables, strategies."""

from fusion.adapters import FAMILIES, Adapter, AdapterKind, Dense, LowRank, Sparse
from fusion.errors import ComposerError

__all__ = ["FAMILIES", "Adapter", "AdapterKind", "ComposerError", "Dense", "LowRank", "Sparse"]
