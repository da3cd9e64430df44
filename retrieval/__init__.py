"""Floor 3: prompt → ranked adapters (weight features, encoders, zero-shot scorer, hybrid ranking).

Public names are imported lazily: open_clip and the encoder load only when a caller asks for them.
"""

from __future__ import annotations

from fusion.lazy_exports import lazy_exports

__all__, __getattr__ = lazy_exports(
    __name__,
    {
        ".retriever": ("Retriever",),
        ".ranking": ("RankedHit", "reciprocal_rank_fusion"),
        ".picks": ("Selection", "insert_triggers"),
        ".training": ("train_retriever", "TrainingConfig", "fit_encoder", "descriptions"),
        ".text": ("TextEmbedder", "TINY_MODEL"),
        ".zero_shot": ("ZeroShotScorer", "pipeline_token_encoder"),
        ".encoder": ("ProbeEncoder",),
        ".learned_index": ("LearnedIndex",),
        ".features": ("spectral_features",),
    },
)
