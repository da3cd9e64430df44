"""Weight-only retrieval on the toy LoRA library: the learned encoder with toy-sd's own text tower, and zero-shot.

``python -m benchmarks.toy_retrieval [--quick]`` prints ONE JSON document. The library is the toy world's eleven
trained concept adapters in their mixed formats and metadata (``composer.toyworld.library``); the model is
``toy-sd``.

- ``learned``: the AutoLoRA probe encoder trained against toy-sd's trained CLIP text encoder (EOS state,
  :class:`retrieval.pipeline_text.PipelineTextEmbedder`), **leave-one-adapter-out**: for each adapter, an encoder is
  trained on the other ten adapters' descriptions (built from the library's metadata only: titles, trigger words,
  tags, categories and the sidecars' descriptions, :func:`retrieval.training.descriptions`), then the held-out
  adapter's queries rank all eleven adapters. Chance recall@k = k/11.
- ``zero_shot``: the cross-attention response scorer (:mod:`retrieval.zero_shot`) with toy-sd's token states, on
  the same queries (it reads no metadata, so it needs no folds).
- ``fused``: both by reciprocal rank, as the retriever fuses them: the learned signal only when its training run's
  own held-out check (:func:`retrieval.training.validate_encoder` on that fold's ten adapters) does not reject it.

Queries (``descriptive``): the held-out concept's own description sentence from the world
(``composer.toyworld.world``), and world captions of random base scenes in which the concept is named by that
description instead of its trigger ("a purple star creature wearing a hat in the snow"). None of the held-out
adapter's metadata is seen in its fold's training, and no query names a trigger word: a trigger word in the prompt is
found by the retriever's trigger signal, not by weights. ``trigger_captions`` (reported beside, for the weight signals
only) are the same captions with the trigger phrases the adapters were trained on.

``--quick`` (``make bench``): 3 captions per concept and 30 encoder steps per fold instead of 8 and 100 (on 10
adapters the contrastive loss is near its floor after ~60 steps; each step costs ~0.5 s on 2 shared CPU cores).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from composer.presets import load_preset
from composer.toyworld.library import build_toy_library
from composer.toyworld.world import CONCEPTS, Concept, caption, sample_scene
from retrieval.pipeline_text import PipelineTextEmbedder
from retrieval.retriever import reciprocal_rank_fusion
from retrieval.training import TrainingConfig, descriptions, fit_encoder, validate_encoder
from retrieval.zero_shot import ZeroShotScorer, pipeline_token_encoder
from weights_index.catalog import Library

QUERY_SEED = 1234
"""Seed of the query captions' scenes (fixed before any result was seen)."""

_DESCRIBED_PHRASE = {
    "character": "{}",
    "clothing": "{}",
    "style": "in {}",
    "background": "in front of {}",
    "object": "{}",
}


def described(concept: Concept) -> Concept:
    """The concept with its caption phrase made of its description instead of its trigger word."""
    return dataclasses.replace(concept, phrase=_DESCRIBED_PHRASE[concept.category].format(concept.description))


def queries(concept: Concept, captions: int) -> dict[str, list[str]]:
    """The concept's descriptive queries (its description, then captions naming it by it) and trigger captions."""
    rng = random.Random(f"{QUERY_SEED}-{concept.name}")
    scenes = [sample_scene(rng) for _ in range(captions)]
    seeds = [rng.random() for _ in scenes]
    return {
        "descriptive": [concept.description]
        + [caption(s, random.Random(seed), (described(concept),)) for s, seed in zip(scenes, seeds)],
        "trigger_captions": [caption(s, random.Random(seed), (concept,)) for s, seed in zip(scenes, seeds)],
    }


def metrics(rankings: list[list[int]], truths: list[int], adapters: int) -> dict[str, float]:
    """recall@1, recall@3, MRR of ranked index lists against the true index per query, with chance beside."""
    positions = [ranking.index(truth) + 1 for ranking, truth in zip(rankings, truths)]
    n = len(positions)
    return {
        "recall@1": sum(p == 1 for p in positions) / n,
        "recall@3": sum(p <= 3 for p in positions) / n,
        "mrr": sum(1.0 / p for p in positions) / n,
        "chance_recall@1": 1 / adapters,
        "chance_recall@3": 3 / adapters,
        "chance_mrr": sum(1.0 / r for r in range(1, adapters + 1)) / adapters,
        "queries": n,
    }


def order(scores: dict[int, float]) -> list[int]:
    """Keys by descending score."""
    return [key for key, _ in sorted(scores.items(), key=lambda kv: -kv[1])]


def evaluate(captions: int, steps: int, pooling: str) -> dict[str, Any]:
    """Build the library, run leave-one-adapter-out for the learned encoder and zero-shot on the same queries."""
    start = time.perf_counter()
    pipe = load_preset("toy-sd")
    with tempfile.TemporaryDirectory() as tmp:
        build_toy_library(Path(tmp) / "library", pipe=pipe)
        library = Library(Path(tmp) / "library")
        library.scan()
        entries = sorted((e for e in library.entries() if e.ok), key=lambda e: e.name)
        adapters = [library.read(e.id) for e in entries]
    names = [entry.path.stem for entry in entries]
    config = TrainingConfig(steps=steps, batch_size=16, lr=1e-3, dim=64, variants=8, validate=True)
    texts = [descriptions(e.metadata, config.variants, seed=config.seed + i) for i, e in enumerate(entries)]
    text = PipelineTextEmbedder(pipe, name="toy-sd", pooling=pooling)
    sets = {name: queries(CONCEPTS[name], captions) for name in names}
    kinds = ("descriptive", "trigger_captions")
    setup_seconds = time.perf_counter() - start

    start = time.perf_counter()
    scorer = ZeroShotScorer(pipeline_token_encoder(pipe))
    scorable = [scorer.add(str(i), adapter) for i, adapter in enumerate(adapters)]
    zero_shot: dict[str, list[dict[int, float]]] = {kind: [] for kind in kinds}
    learned: dict[str, list[dict[int, float]]] = {kind: [] for kind in kinds}
    fused_in: dict[str, list[bool]] = {kind: [] for kind in kinds}
    truths: dict[str, list[int]] = {kind: [] for kind in kinds}
    folds = []
    for held, name in enumerate(names):
        train = [i for i in range(len(names)) if i != held and texts[i]]
        fold_texts = [texts[i] for i in train]
        validation = validate_encoder(adapters, fold_texts, text, config, family="sd1", described=train)
        encoder, losses = fit_encoder(adapters, fold_texts, text, config, family="sd1", described=train)
        vectors = encoder.embed(adapters)
        reliable = validation is None or validation.reliable
        folds.append(
            {
                "held_out": name,
                "final_loss": losses[-1],
                "validation": validation.to_json() if validation else None,
                "learned_fused": reliable,
            }
        )
        for kind in kinds:
            prompts = sets[name][kind]
            cosines = vectors @ text.encode(prompts).T
            for q, prompt in enumerate(prompts):
                learned[kind].append(dict(enumerate(cosines[:, q].tolist())))
                zero_shot[kind].append({int(k): v for k, v in scorer.scores(prompt).items()})
                fused_in[kind].append(reliable)
                truths[kind].append(held)
    seconds = time.perf_counter() - start

    result: dict[str, Any] = {}
    for kind in kinds:
        fused = [
            reciprocal_rank_fusion([z, lr] if use else [z])
            for z, lr, use in zip(zero_shot[kind], learned[kind], fused_in[kind])
        ]
        result[kind] = {
            signal: metrics([order(s) for s in scores], truths[kind], len(names))
            for signal, scores in (("learned", learned[kind]), ("zero_shot", zero_shot[kind]), ("fused", fused))
        }
    return {
        "adapters": names,
        "zero_shot_scorable": sum(scorable),
        "fold_scheme": f"leave-one-adapter-out ({len(names)} folds)",
        "text_tower": text.spec,
        "encoder": {"steps": steps, "dim": config.dim, "batch_size": config.batch_size, "variants": config.variants},
        "examples": {name: sets[name]["descriptive"][:2] for name in names[:3]},
        "setup_seconds": setup_seconds,
        "seconds": seconds,
        "folds": folds,
        **result,
    }


def main() -> int:
    """Run the evaluation and print one JSON document."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer captions and encoder steps (make bench)")
    parser.add_argument("--pooling", choices=("eos", "mean"), default="eos", help="text-tower pooling")
    args = parser.parse_args()
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    captions, steps = (3, 30) if args.quick else (8, 100)
    result = {
        "benchmark": "toy_retrieval",
        "quick": args.quick,
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__},
        "targets": {"learned_recall@3": 0.5},
        **evaluate(captions, steps, args.pooling),
    }
    json.dump(result, sys.stdout, indent=2)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
