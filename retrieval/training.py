"""Training the probe encoder from a library's own metadata (symmetric InfoNCE against open_clip text embeddings).

Every adapter of one base family that has something to say about itself (title, trigger words, caption tags,
labels, category, description) contributes several description variants — the full description and random
subsets of its words — embedded once by the frozen text tower. Each step draws a batch of adapters and one variant
each and pulls matching (adapter, text) pairs together, in both directions, with a learnable temperature. The
checkpoint is written beside the catalog, then every adapter of the family (with or without metadata) is embedded
into the FAISS vector store that the retriever queries.
"""

from __future__ import annotations

import math
import random
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import torch
from accelerate import Accelerator
from torch import nn
from tqdm.auto import tqdm

from fusion.adapters import Adapter
from fusion.errors import ComposerError
from retrieval.encoder import EncoderConfig, ProbeEncoder, layer_shapes
from retrieval.learned_index import LearnedIndex, checkpoint_path
from retrieval.pipeline_text import pipeline_name
from retrieval.text import DEFAULT_MODEL, TextEmbedder, TextModelError, TextTower
from weights_index.catalog import CatalogEntry, Library
from weights_index.metadata import AdapterMetadata

MAX_TAGS = 12
MIN_DESCRIBED = 2
VALIDATION_SHARE = 0.2
"""Share of the described adapters held out to validate a training run (the final encoder sees them all)."""
MIN_VALIDATION = 4
"""Fewest held-out adapters worth a validation; smaller libraries train unvalidated."""


@dataclass
class TrainingConfig:
    """Hyper-parameters of :func:`train_retriever` (defaults suit libraries of tens to thousands of adapters)."""

    steps: int = 400
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 0.01
    dim: int = 128
    depth: int = 2
    heads: int = 4
    probes: int = 16
    variants: int = 8
    text_model: str = DEFAULT_MODEL
    text_weights: str | None = None
    seed: int = 0
    validate: bool = True


@dataclass
class TrainingReport:
    """What a training run did: where the checkpoint went, on what, and how the loss moved."""

    family: str
    checkpoint: str
    adapters: int
    described: int
    steps: int
    first_loss: float
    final_loss: float
    seconds: float
    skipped: list[str] = field(default_factory=list)
    validation: dict[str, Any] | None = None

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return dict(self.__dict__)


def descriptions(metadata: AdapterMetadata, variants: int = 8, seed: int = 0) -> list[str]:
    """Description texts of one adapter: the full one first, then random subsets of its words; [] when none.

    Built from the title, trigger words, most frequent caption tags, curated labels, category and description.
    """
    triggers = list(metadata.trigger_words)
    tags = [tag for tag, _ in sorted(metadata.tags.items(), key=lambda kv: -kv[1])[:MAX_TAGS]]
    extra = [*metadata.labels, *([metadata.category] if metadata.category else [])]
    title = [metadata.title] if metadata.title else []
    words = list(dict.fromkeys([*title, *triggers, *tags, *extra]))
    if not words and not metadata.description:
        return []
    full = ", ".join(words)
    if metadata.description:
        full = f"{full}. {metadata.description}" if full else metadata.description
    out = [full]
    rng = random.Random(seed)
    pool = [w for w in words if w not in triggers] or words
    for _ in range(variants - 1):
        chosen = triggers[:] if triggers else []
        chosen += rng.sample(pool, k=min(len(pool), rng.randint(1, 4)))
        rng.shuffle(chosen)
        out.append(", ".join(dict.fromkeys(chosen)))
    return out


def _family(entries: list[CatalogEntry], family: str | None) -> str:
    if family is not None:
        return family
    counts = Counter(entry.family for entry in entries if entry.ok and entry.family != "unknown")
    if not counts:
        raise ComposerError("the library has no readable adapter of a known family", hint="run `compose index DIR`")
    return counts.most_common(1)[0][0]


def _vocabulary(adapters: list[Adapter]) -> dict[str, tuple[int, int]]:
    """Every layer key of the adapters with its most common (input, output) width."""
    seen: dict[str, Counter] = {}
    for adapter in adapters:
        for key, shape in layer_shapes(adapter).items():
            seen.setdefault(key, Counter())[shape] += 1
    return {key: counts.most_common(1)[0][0] for key, counts in seen.items()}


def contrastive_loss(
    adapter_vectors: torch.Tensor, text_vectors: torch.Tensor, logit_scale: torch.Tensor
) -> torch.Tensor:
    """Symmetric InfoNCE between matching rows of two batches of vectors (normalised here), CLIP's temperature."""
    a = nn.functional.normalize(adapter_vectors, dim=-1)
    t = nn.functional.normalize(text_vectors, dim=-1)
    logits = logit_scale.clamp(max=math.log(100.0)).exp() * a @ t.T
    target = torch.arange(len(a), device=a.device)
    return (nn.functional.cross_entropy(logits, target) + nn.functional.cross_entropy(logits.T, target)) / 2


def fit_encoder(
    adapters: list[Adapter],
    texts: list[list[str]],
    text: TextTower,
    config: TrainingConfig,
    *,
    family: str = "unknown",
    progress: bool = False,
    described: list[int] | None = None,
) -> tuple[ProbeEncoder, list[float]]:
    """Train a probe encoder so ``adapters[described[j]]`` embeds near the text embeddings of ``texts[j]``.

    ``texts[j]`` are description variants (padded with the first one to ``config.variants``); ``described``
    defaults to every adapter. The layer vocabulary covers all ``adapters``, so undescribed ones can be embedded
    afterwards. Returns the trained encoder (eval mode, CPU) and the per-step losses.
    """
    described = list(range(len(adapters))) if described is None else described
    variants = [group[: config.variants] + [group[0]] * (config.variants - len(group)) for group in texts]
    targets = text.encode([t for group in variants for t in group]).reshape(len(described), config.variants, -1)
    torch.manual_seed(config.seed)
    encoder_config = EncoderConfig(
        layers=_vocabulary(adapters),
        out_dim=text.dim,
        dim=config.dim,
        depth=config.depth,
        heads=config.heads,
        probes=config.probes,
        family=family,
        text=text.spec,
    )
    accelerator = Accelerator()
    model = ProbeEncoder(encoder_config)
    prepared = [model.prepare(adapters[i]).to(accelerator.device) for i in described]
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    model, optimizer = accelerator.prepare(model, optimizer)
    targets = targets.to(accelerator.device)
    generator = torch.Generator().manual_seed(config.seed)
    batch = min(config.batch_size, len(described))
    losses: list[float] = []
    model.train()
    bar = tqdm(range(config.steps), desc=f"training retriever ({family})", disable=not progress, unit="step")
    for _ in bar:
        chosen = torch.randperm(len(described), generator=generator)[:batch]
        variant = torch.randint(config.variants, (batch,), generator=generator)
        vectors = model([prepared[i] for i in chosen.tolist()])
        loss = contrastive_loss(vectors, targets[chosen, variant], accelerator.unwrap_model(model).logit_scale)
        optimizer.zero_grad()
        accelerator.backward(loss)
        optimizer.step()
        losses.append(float(loss.detach()))
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
    encoder: ProbeEncoder = accelerator.unwrap_model(model)
    return encoder.to("cpu").eval(), losses


@dataclass(frozen=True)
class Validation:
    """How well an encoder trained like this one names adapters it never saw described.

    ``recall_at_3``: share of held-out descriptions whose own adapter ranks in the top 3 of all adapters;
    ``chance_at_3`` = 3/N; ``threshold`` = chance + two binomial standard errors over the held-out adapters. The
    retriever fuses the learned signal only when it is ``reliable`` (recall above the threshold), so an encoder that
    does not generalise (e.g. a text tower with random weights) cannot drag the other signals down.
    """

    recall_at_3: float
    chance_at_3: float
    threshold: float
    held_out: int
    queries: int

    @property
    def reliable(self) -> bool:
        """True when held-out recall@3 is clearly above chance."""
        return self.recall_at_3 > self.threshold

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict (with ``reliable``)."""
        return {**self.__dict__, "reliable": self.reliable}


def validate_encoder(
    adapters: list[Adapter],
    texts: list[list[str]],
    text: TextTower,
    config: TrainingConfig,
    *,
    family: str = "unknown",
    described: list[int] | None = None,
) -> Validation | None:
    """Hold out a share of the described adapters, train on the rest, rank every adapter for each held-out text.

    Arguments as :func:`fit_encoder`. None when too few adapters are described to hold ``MIN_VALIDATION`` out.
    """
    described = list(range(len(adapters))) if described is None else described
    count = max(MIN_VALIDATION, round(VALIDATION_SHARE * len(described)))
    if len(described) - count < MIN_DESCRIBED or len(described) < MIN_VALIDATION / VALIDATION_SHARE:
        return None
    held = set(random.Random(config.seed).sample(range(len(described)), count))
    kept = [j for j in range(len(described)) if j not in held]
    encoder, _ = fit_encoder(
        adapters, [texts[j] for j in kept], text, config, family=family, described=[described[j] for j in kept]
    )
    vectors = encoder.embed(adapters)
    hits = queries = 0
    for j in sorted(held):
        cosines = vectors @ text.encode(texts[j]).T
        own = cosines[described[j]]
        hits += int(((cosines > own).sum(0) < 3).sum())
        queries += len(texts[j])
    chance = min(1.0, 3 / len(adapters))
    threshold = chance + 2 * math.sqrt(chance * (1 - chance) / count)
    return Validation(hits / max(1, queries), chance, threshold, count, queries)


def train_retriever(
    library: Library,
    *,
    family: str | None = None,
    config: TrainingConfig | None = None,
    text: TextTower | None = None,
    progress: bool = True,
) -> TrainingReport:
    """Train the probe encoder on ``library``'s adapters of ``family`` (default: its most common family).

    ``text`` is the text tower (default: the open_clip model ``config`` names; a ``pipeline:NAME`` text model must be
    passed in, built from the loaded pipeline).

    Writes the checkpoint beside the catalog and rebuilds the family's vectors. Needs at least two adapters with
    metadata to describe them; adapters that cannot be read are skipped (listed in the report).
    """
    config = config or TrainingConfig()
    start = time.perf_counter()
    entries = [e for e in library.entries() if e.ok]
    family = _family(entries, family)
    adapters: list[Adapter] = []
    kept: list[CatalogEntry] = []
    skipped: list[str] = []
    for entry in (e for e in entries if e.family == family):
        try:
            adapters.append(library.read(entry.id))
            kept.append(entry)
        except ComposerError as exc:
            skipped.append(f"{entry.name}: {exc}")
    texts = [descriptions(entry.metadata, config.variants, seed=config.seed + entry.id) for entry in kept]
    described = [i for i, variants in enumerate(texts) if variants]
    if len(described) < MIN_DESCRIBED:
        raise ComposerError(
            f"only {len(described)} {family} adapters have metadata to learn from; at least {MIN_DESCRIBED} needed",
            path=library.root,
            hint="add trigger words or tags (e.g. .civitai.info sidecars), or rely on metadata-free zero-shot",
        )
    if text is None:
        if pipeline_name(config.text_model) is not None:
            raise TextModelError(
                f"text model {config.text_model!r} is a pipeline's text encoder: pass it as text=",
                hint="build retrieval.pipeline_text.PipelineTextEmbedder(pipe, name=...) from the loaded pipeline",
            )
        text = TextEmbedder(config.text_model, config.text_weights, seed=config.seed)
    chosen = [texts[i] for i in described]
    validation = None
    if config.validate:
        validation = validate_encoder(adapters, chosen, text, config, family=family, described=described)
    encoder, losses = fit_encoder(adapters, chosen, text, config, family=family, progress=progress, described=described)
    path = checkpoint_path(library, family)
    extra = {"described": len(described), "steps": config.steps, "final_loss": losses[-1]}
    encoder.save(path, extra=extra | {"validation": validation.to_json() if validation else None})
    index = LearnedIndex(library, family, encoder, text=text, validation=validation.to_json() if validation else None)
    index.rebuild(dict(zip((e.id for e in kept), adapters)))
    return TrainingReport(
        family=family,
        checkpoint=str(path),
        adapters=len(kept),
        described=len(described),
        steps=config.steps,
        first_loss=losses[0] if losses else float("nan"),
        final_loss=losses[-1] if losses else float("nan"),
        seconds=time.perf_counter() - start,
        skipped=skipped,
        validation=validation.to_json() if validation else None,
    )
