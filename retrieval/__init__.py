"""Floor 3: prompt → ranked adapters (weight features, encoders, zero-shot scorer, hybrid ranking).

Public names are imported lazily: open_clip and the encoder load only when a caller asks for them.
"""

from __future__ import annotations

from fusion.lazy_exports import lazy_getattr

_EXPORTS = {
    "Retriever": "retrieval.retriever",
    "RankedHit": "retrieval.ranking",
    "Selection": "retrieval.picks",
    "insert_triggers": "retrieval.picks",
    "reciprocal_rank_fusion": "retrieval.ranking",
    "train_retriever": "retrieval.training",
    "TrainingConfig": "retrieval.training",
    "fit_encoder": "retrieval.training",
    "descriptions": "retrieval.training",
    "TextEmbedder": "retrieval.text",
    "TINY_MODEL": "retrieval.text",
    "ZeroShotScorer": "retrieval.zero_shot",
    "pipeline_token_encoder": "retrieval.zero_shot",
    "ProbeEncoder": "retrieval.encoder",
    "LearnedIndex": "retrieval.learned_index",
    "spectral_features": "retrieval.features",
}

__all__ = sorted(_EXPORTS)

__getattr__ = lazy_getattr(__name__, _EXPORTS)
