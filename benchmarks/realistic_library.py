"""`--loras auto` on libraries shaped like downloaded ones: exact sets, precision and recall of ``Retriever.select``.

``python -m benchmarks.realistic_library [--quick]`` prints ONE JSON document.

A seeded generator writes a library of metadata-only adapters (tiny safetensors files: the selection reads no
tensor) the way people collect them:

- concepts of five categories with invented names (characters, "<name> Style"), descriptive titles ("Cyberpunk
  Jacket", some exactly a popular tag such as "Film Grain") and optional parenthesised series names;
- tags drawn from a Zipf distribution over a vocabulary of generic tags ("1girl", "long hair", "film grain", …),
  so a few tags are on most adapters; generic tags also appear among trigger words, and a few concepts share their
  identity token with another concept (the same character by two authors);
- each file's metadata from one main source: kohya, ModelSpec, ``.civitai.info``, A1111 ``name.json``, or nothing at
  all. kohya files are spread as they come from trainers: ``ss_output_name``, ``ss_tag_frequency`` with the trigger
  token in every caption (in most captions for a few sloppy datasets) among generic tags at realistic counts (a
  character's "1girl" and "solo" in nearly every caption, other tags in a skewed share of them), a dataset folder
  named after the trigger, generically (``10_img``, ``5_data``) or after the concept's title, ``ss_dataset_dirs``
  image counts for most files, and a Civitai or A1111 sidecar beside some files only;
- versions (``_v1``, ``-v2``, ``v1.5`` …), duplicate downloads (``name (1)``, identical bytes), re-saved copies
  (same tensors, edited metadata) and an SDXL edition of some concepts (the query family is SD 1.x);
- file names in every style: snake_case, camelCase, spaces, hyphens.

Prompts name 1–3 concepts, mixed with generic filler tags: by their trigger words (all of them, as users paste them;
only concepts whose metadata states trigger words, not all of them generic tags), by their titles (whole, without
the parenthesised part, or as the file name; any case), and by paraphrase (the title's words reordered with a word
inserted, or a character's first name alone — reported, no target). No concept's title, whole or without its
parenthesised part, is another concept's (equal titles are versions by definition; a prompt could not tell them
apart). A pick is right when it holds the tensors of the concept's newest SD 1.x version (the file itself, a
duplicate download or a re-saved copy). Exact-set accuracy, precision (right picks / picks) and recall (right picks
/ named concepts) are reported per prompt kind.

Two generator configurations: ``tuned`` (the one looked at while building the selector) and ``held_out`` (another
seed and other parameters: heavier tag sharing, more versions and collisions, another source mix), never used for
tuning. Latency: ``select`` p50/p99 on a library of 10,000 concepts (about 14,000 files; metadata signals only, no
weight signal runs). ``--quick`` (what ``make bench`` runs): 400 concepts, fewer prompts, latency at 2,000.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import random
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import save_file

from retrieval.retriever import Retriever
from weights_index.catalog import Library

CATEGORIES = ("character", "clothing", "style", "background", "object")
SOURCES = ("kohya", "modelspec", "civitai", "a1111", "none")
_COMMON_TAGS = (
    "1girl, solo, long hair, looking at viewer, smile, short hair, blush, open mouth, black hair, brown hair, "
    "blonde hair, blue eyes, simple background, white background, school uniform, dress, jacket, outdoors, "
    "upper body, full body, red eyes, hat, skirt, shirt, long sleeves, holding, standing, sky, day, night, "
    "film grain, masterpiece, best quality, highly detailed, realistic, photorealistic, anime, sketch, "
    "watercolor, oil painting, cityscape, forest, beach, indoors, window, flower, tree, water, cloud, building"
)
_ADJECTIVE_TEXT = (
    "red blue green golden silver dark bright tiny giant ancient neon wooden glass velvet frozen misty rusty pastel "
    "gothic floral striped royal cosmic desert arctic cyberpunk steampunk retro vintage soft sharp"
)
_ADJECTIVES = _ADJECTIVE_TEXT.split()
_NOUN_TEXT = {
    "clothing": "jacket kimono armor hoodie dress scarf boots cloak uniform gown sweater coat",
    "style": "style aesthetic look painting lighting render",
    "background": "alley city forest shrine beach station library harbor garden cavern skyline",
    "object": "sword lantern teapot motorcycle guitar camera crown staff robot clock",
    "character": "girl knight witch detective pilot",
}
_NOUNS = {category: text.split() for category, text in _NOUN_TEXT.items()}
_FILLER_TEXT = "hair eyes background lighting sky street room field"
_FILLER_NOUNS = _FILLER_TEXT.split()
_SYLLABLE_TEXT = "ka ri mo sa ne lu vi ta ro ze mi ha el ya no ku shi ra ve do an is or"
_SYLLABLES = _SYLLABLE_TEXT.split()
_SD1_KEY = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k"
_SDXL_KEY = "unet.down_blocks.1.attentions.0.transformer_blocks.1.attn2.to_k"


@dataclass(frozen=True)
class GeneratorConfig:
    """The parameters of a generated library (see the module docstring)."""

    seed: int
    concepts: int
    tag_vocabulary: int = 300
    zipf_exponent: float = 1.1
    tags_per_adapter: tuple[int, int] = (6, 20)
    generic_trigger_share: float = 0.35
    """Share of concepts whose trigger words include one or two generic tags."""
    no_trigger_share: float = 0.15
    """Share of (style/background) concepts without any trigger word."""
    descriptive_title_share: float = 0.35
    tag_title_share: float = 0.05
    """Share of titles that are exactly a popular generic tag ("Film Grain")."""
    series_share: float = 0.3
    collision_share: float = 0.03
    version_share: float = 0.2
    copy_share: float = 0.05
    resaved_share: float = 0.03
    sdxl_share: float = 0.1
    source_weights: tuple[float, ...] = (0.3, 0.15, 0.25, 0.15, 0.15)
    """Weights of kohya, ModelSpec, Civitai, A1111 and no metadata."""
    kohya_folder_weights: tuple[float, float, float] = (0.4, 0.35, 0.25)
    """How kohya dataset folders are named: after the trigger, generically (``10_img``), after the title."""
    kohya_sidecar_share: float = 0.3
    """Share of kohya files with a Civitai or A1111 sidecar beside them."""
    dataset_dirs_share: float = 0.8
    """Share of kohya files that record ``ss_dataset_dirs`` (image counts per folder)."""
    sloppy_trigger_share: float = 0.1
    """Share of kohya datasets whose trigger token is missing from some captions (in 75–97% of them)."""
    extra_tags: tuple[str, ...] = ()
    """Generic tags added to the vocabulary after the common ones (another library's own generic vocabulary)."""
    rare_tags: tuple[str, ...] = ()
    """Generic but rarely used tags, placed at the tail of the Zipf distribution."""


TUNED = GeneratorConfig(seed=1, concepts=1000)
HELD_OUT = GeneratorConfig(
    seed=7177,
    concepts=1000,
    tag_vocabulary=200,
    zipf_exponent=1.3,
    tags_per_adapter=(10, 30),
    generic_trigger_share=0.5,
    no_trigger_share=0.2,
    descriptive_title_share=0.5,
    tag_title_share=0.08,
    series_share=0.4,
    collision_share=0.06,
    version_share=0.3,
    copy_share=0.08,
    resaved_share=0.05,
    sdxl_share=0.15,
    source_weights=(0.2, 0.1, 0.35, 0.2, 0.15),
    kohya_folder_weights=(0.25, 0.5, 0.25),
    kohya_sidecar_share=0.4,
    dataset_dirs_share=0.6,
    sloppy_trigger_share=0.15,
)


@dataclass
class Concept:
    """One LoRA concept of the generated library and the files that hold it."""

    index: int
    category: str
    title: str
    triggers: list[str]
    tags: list[str]
    files: list[tuple[str, str, tuple[int, ...] | None]] = field(default_factory=list)
    """(file stem, family, version) of every file of this concept."""
    truth: str = ""
    """Stem of the newest SD 1.x file (the right pick)."""
    equivalents: set[str] = field(default_factory=set)
    """Stems of the files holding exactly the truth's tensors (the truth, its duplicate downloads, re-saved copies)."""
    states_triggers: bool = False


def _pseudo(rng: random.Random, syllables: int) -> str:
    return "".join(rng.choice(_SYLLABLES) for _ in range(syllables))


class LibraryGenerator:
    """Writes one library for a :class:`GeneratorConfig` and remembers the truth about it."""

    def __init__(self, config: GeneratorConfig) -> None:
        self.config = config
        self.rng = random.Random(config.seed)
        rng = self.rng
        common = [t.strip() for t in _COMMON_TAGS.split(",")]
        extra = [f"{a} {n}" for a in _ADJECTIVES for n in _FILLER_NOUNS]
        rng.shuffle(extra)
        vocabulary = list(dict.fromkeys(common + list(config.extra_tags) + extra))
        vocabulary = [t for t in vocabulary if t not in config.rare_tags]
        self.vocabulary = vocabulary[: config.tag_vocabulary - len(config.rare_tags)] + list(config.rare_tags)
        weights = [1.0 / (rank**config.zipf_exponent) for rank in range(1, len(self.vocabulary) + 1)]
        total = sum(weights)
        self.tag_weights = [w / total for w in weights]
        self.titles: set[str] = set()
        self.concepts = [self._concept(i) for i in range(config.concepts)]
        self.tensor_seeds: dict[str, int] = {}

    def tags(self, count: int) -> list[str]:
        """``count`` distinct generic tags drawn from the Zipf distribution."""
        chosen: dict[str, None] = {}
        while len(chosen) < count:
            chosen.setdefault(self.rng.choices(self.vocabulary, self.tag_weights)[0])
        return list(chosen)

    def _title(self, category: str) -> tuple[str, str]:
        """(title, identity token) of a new concept."""
        rng, config = self.rng, self.config
        if rng.random() < config.tag_title_share and category in ("style", "background", "clothing"):
            tag = rng.choice(self.vocabulary[:40])
            return tag.title(), tag.replace(" ", "") + _pseudo(rng, 1) if rng.random() < 0.5 else tag
        if category == "character" or rng.random() >= config.descriptive_title_share:
            first, last = _pseudo(rng, rng.randint(2, 3)).title(), _pseudo(rng, rng.randint(2, 3)).title()
            if category == "character":
                title = f"{first} {last}"
            elif category == "style":
                title = f"{first} Style"
            else:
                title = f"{first} {rng.choice(_NOUNS[category])}".title()
            token = first.lower() + _pseudo(rng, 2)
        else:
            title = f"{rng.choice(_ADJECTIVES)} {rng.choice(_NOUNS[category])}".title()
            token = title.lower().replace(" ", "")[:4] + _pseudo(rng, 3)
        if rng.random() < config.series_share:
            title += f" ({_pseudo(rng, 2).title()} {rng.choice(['Saga', 'Online', 'Chronicles', 'Gakuen'])})"
        return title, token

    def _concept(self, index: int) -> Concept:
        rng, config = self.rng, self.config
        category = CATEGORIES[rng.randrange(len(CATEGORIES))]
        title, token = self._title(category)
        while {title.lower(), title.split("(")[0].strip().lower()} & self.titles:
            title, token = self._title(category)  # equal titles are versions by definition; a title whose short
        self.titles.update({title.lower(), title.split("(")[0].strip().lower()})  # form is another's is ambiguous
        triggers = [token]
        if category in ("style", "background") and rng.random() < config.no_trigger_share:
            triggers = []
        elif rng.random() < config.generic_trigger_share:
            triggers += self.tags(rng.randint(1, 2))
        tags = self.tags(rng.randint(*config.tags_per_adapter))
        return Concept(index, category, title, triggers, tags)

    def collide(self) -> None:
        """Give some characters the identity token of an earlier character (the same person by two authors)."""
        characters = [c for c in self.concepts if c.category == "character" and c.triggers]
        for concept in characters[1:]:
            if self.rng.random() < self.config.collision_share:
                other = self.rng.choice(characters[: characters.index(concept)])
                concept.triggers[0] = other.triggers[0]

    # ------------------------------------------------------------------------------------------------ writing
    def write(self, root: Path) -> None:
        """Write every concept's files (versions, copies, SDXL editions) with metadata from a random source."""
        self.collide()
        rng, config = self.rng, self.config
        used: set[str] = set()
        for concept in self.concepts:
            versions: list[tuple[int, ...] | None] = [None]
            if rng.random() < config.version_share:
                versions = rng.choice([[(1,), (2,)], [(1,), (2,), (3,)], [(1,), (1, 5)], [(1, 0), (2, 0)]])
            for version in versions:
                stem = self._stem(concept.title, version, used)
                self._write_file(root, stem, concept, "sd1", version, weights_seed=len(used))
            concept.truth = concept.files[-1][0]
            concept.equivalents = {concept.truth}
            if rng.random() < config.copy_share:
                source = root / f"{concept.truth}.safetensors"
                copy = f"{concept.truth} (1)"
                (root / f"{copy}.safetensors").write_bytes(source.read_bytes())
                concept.files.append((copy, "sd1", versions[-1]))
                concept.equivalents.add(copy)
            if rng.random() < config.resaved_share:
                stem = self._stem(concept.title, versions[-1], used)
                seed = self.tensor_seeds[concept.truth]
                self._write_file(root, stem, concept, "sd1", versions[-1], weights_seed=seed, resaved=True)
                concept.equivalents.add(stem)
            if rng.random() < config.sdxl_share:
                stem = self._stem(concept.title + " XL", None, used)
                self._write_file(root, stem, concept, "sdxl", None, weights_seed=len(used))

    def _stem(self, title: str, version: tuple[int, ...] | None, used: set[str]) -> str:
        rng = self.rng
        words = title.replace("(", "").replace(")", "").split()
        style = rng.randrange(4)
        if style == 0:
            stem = "_".join(w.lower() for w in words)
        elif style == 1:
            stem = words[0].lower() + "".join(w.title() for w in words[1:])
        elif style == 2:
            stem = " ".join(words)
        else:
            stem = "-".join(w.lower() for w in words)
        if version is not None:
            stem += rng.choice(["_v", "-v", " v", "_V"]) + ".".join(map(str, version))
        while stem in used:
            stem += "_" + _pseudo(rng, 1)
        used.add(stem)
        return stem

    def _kohya_header(self, root: Path, stem: str, concept: Concept, family: str, version_text: str) -> dict[str, str]:
        """A kohya header as trainers leave it (see the module docstring), and a sidecar beside some files."""
        rng, config = self.rng, self.config
        images = rng.randint(12, 60)
        counts = {tag: max(1, round(images * rng.betavariate(0.7, 1.6))) for tag in concept.tags}
        if concept.category == "character" and rng.random() < 0.8:
            counts |= {tag: images - rng.randint(0, 1) for tag in ("1girl", "solo")}
        counts |= dict.fromkeys(concept.triggers, images)
        trigger = concept.triggers[0] if concept.triggers else ""
        if trigger and rng.random() < config.sloppy_trigger_share:
            counts[trigger] = round(images * rng.uniform(0.75, 0.97))
        naming = rng.choices(("trigger", "generic", "title"), config.kohya_folder_weights)[0]
        if naming == "trigger" and trigger:
            name = trigger
        elif naming == "title":
            name = rng.choice(["_", " "]).join(concept.title.replace("(", "").replace(")", "").lower().split())
        else:
            name = rng.choice(["img", "data", "images", "train"])
        folder = f"{rng.randint(5, 20)}_{name}"
        header = {
            "ss_output_name": stem,
            "ss_base_model_version": {"sd1": "sd_v1", "sdxl": "sdxl_base_v1-0"}[family],
            "ss_tag_frequency": json.dumps({folder: counts}),
            "ss_num_train_images": str(images),
        }
        if rng.random() < config.dataset_dirs_share:
            header["ss_dataset_dirs"] = json.dumps(
                {folder: {"n_repeats": int(folder.split("_")[0]), "img_count": images}}
            )
        if rng.random() < config.kohya_sidecar_share:
            if rng.random() < 0.5:
                info = {
                    "id": rng.randint(10_000, 999_999),
                    "modelId": 1000 + concept.index,
                    "name": version_text.strip() or "v1.0",
                    "baseModel": {"sd1": "SD 1.5", "sdxl": "SDXL 1.0"}[family],
                    "trainedWords": concept.triggers,
                    "model": {"name": concept.title, "type": "LORA", "tags": [concept.category, *concept.tags[:4]]},
                }
                (root / f"{stem}.civitai.info").write_text(json.dumps(info), encoding="utf-8")
            else:
                settings = {"activation text": ", ".join(concept.triggers), "preferred weight": 0}
                (root / f"{stem}.json").write_text(json.dumps(settings), encoding="utf-8")
        return header

    def _write_file(
        self,
        root: Path,
        stem: str,
        concept: Concept,
        family: str,
        version: tuple[int, ...] | None,
        *,
        weights_seed: int,
        resaved: bool = False,
    ) -> None:
        """Write one file with tensors from ``weights_seed`` (``resaved``: a copy of other tensors, new metadata)."""
        rng = self.rng
        self.tensor_seeds[stem] = weights_seed
        sources = SOURCES[:-1] if resaved else SOURCES
        source = rng.choices(sources, self.config.source_weights[: len(sources)])[0]
        header: dict[str, str] = {}
        base = {"sd1": ("sd_v1", "stable-diffusion-v1/lora", "SD 1.5"), "sdxl": ("sdxl_base_v1-0", "x", "SDXL 1.0")}
        kohya_version, architecture, civitai_base = base[family]
        if family == "sdxl":
            architecture = "stable-diffusion-xl-v1-base/lora"
        weights_hash = f"{weights_seed:032x}"
        version_text = "" if version is None else " v" + ".".join(map(str, version))
        if source == "kohya":
            header |= self._kohya_header(root, stem, concept, family, version_text)
            concept.states_triggers |= bool(concept.triggers) and family == "sd1"
        elif source == "modelspec":
            header |= {
                "modelspec.sai_model_spec": "1.0.0",
                "modelspec.architecture": architecture,
                "modelspec.title": concept.title + version_text,
                "modelspec.trigger_phrase": ", ".join(concept.triggers),
                "modelspec.tags": ", ".join([concept.category, *concept.tags[:3]]),
                "modelspec.hash_sha256": weights_hash,
            }
            concept.states_triggers |= bool(concept.triggers) and family == "sd1"
        elif source == "civitai":
            info = {
                "id": rng.randint(10_000, 999_999),
                "modelId": 1000 + concept.index,
                "name": version_text.strip() or "v1.0",
                "baseModel": civitai_base,
                "trainedWords": concept.triggers,
                "model": {"name": concept.title, "type": "LORA", "tags": [concept.category, *concept.tags[:4]]},
            }
            (root / f"{stem}.civitai.info").write_text(json.dumps(info), encoding="utf-8")
            header["ss_base_model_version"] = kohya_version
            concept.states_triggers |= bool(concept.triggers) and family == "sd1"
        elif source == "a1111":
            settings = {"activation text": ", ".join(concept.triggers), "preferred weight": 0, "sd version": "Unknown"}
            settings["sd version"] = "SD1" if family == "sd1" else "SDXL"
            (root / f"{stem}.json").write_text(json.dumps(settings), encoding="utf-8")
            header["ss_base_model_version"] = kohya_version
            concept.states_triggers |= bool(concept.triggers) and family == "sd1"
        elif family == "sdxl":
            header["ss_base_model_version"] = kohya_version
        if source != "none":  # files trained with kohya keep its tensor hash whatever else describes them
            header["sshs_model_hash"] = weights_hash
        key = _SD1_KEY if family == "sd1" else _SDXL_KEY
        values = np.random.default_rng(weights_seed).standard_normal((2, 1, 4)).astype(np.float32)
        tensors = {f"{key}.lora_A.weight": values[0], f"{key}.lora_B.weight": values[1].T.copy()}
        save_file(tensors, str(root / f"{stem}.safetensors"), metadata=header)
        concept.files.append((stem, family, version))


# ------------------------------------------------------------------------------------------------------ prompts
@dataclass(frozen=True)
class Prompt:
    """A generated prompt, its kind and the file stems it names."""

    kind: str
    text: str
    truth: frozenset[int]
    """Indexes of the concepts named."""


def _trigger_form(concept: Concept, rng: random.Random) -> str:
    words = list(concept.triggers)
    rng.shuffle(words)
    text = ", ".join(words)
    return text.upper() if rng.random() < 0.1 else text


def _title_form(concept: Concept, stems: list[str], rng: random.Random) -> str:
    title = concept.title
    choice = rng.randrange(4)
    if choice == 1 and "(" in title:
        title = title.split("(")[0].strip()
    elif choice == 2:
        return rng.choice(stems)
    return title.lower() if rng.random() < 0.5 else title


def _paraphrase_form(concept: Concept, rng: random.Random) -> str:
    words = concept.title.split("(")[0].split()
    if concept.category == "character" and len(words) > 1 and rng.random() < 0.5:
        return words[0]
    rng.shuffle(words)
    words.insert(rng.randrange(len(words) + 1), rng.choice(["detailed", "beautiful", "classic", "new"]))
    return " ".join(words).lower()


_TEMPLATES = ("{}", "{} wearing {}", "{} in {}", "{} with {}, {}")


def make_prompts(generator: LibraryGenerator, kind: str, count: int, seed: int) -> list[Prompt]:
    """``count`` prompts of one kind ("trigger", "title", "paraphrase") naming 1–3 concepts each."""
    rng = random.Random(seed)
    generic = set(generator.vocabulary)
    named = [c for c in generator.concepts if c.states_triggers and any(t not in generic for t in c.triggers)]
    pool = named if kind == "trigger" else generator.concepts
    prompts = []
    for _ in range(count):
        targets = rng.sample(pool, rng.choice((1, 1, 2, 2, 3)))
        parts = []
        for concept in targets:
            if kind == "trigger":
                parts.append(_trigger_form(concept, rng))
            elif kind == "title":
                parts.append(_title_form(concept, [s for s, f, _ in concept.files if f == "sd1"], rng))
            else:
                parts.append(_paraphrase_form(concept, rng))
        filler = generator.tags(rng.randint(2, 5))
        if kind == "trigger" or rng.random() < 0.5:
            mixed = parts + filler
            rng.shuffle(mixed)
            text = ", ".join(mixed)
        else:
            template = rng.choice([t for t in _TEMPLATES if t.count("{}") >= len(parts)] or ["{}"])
            slots = parts + filler[: template.count("{}") - len(parts)]
            text = template.format(*slots[: template.count("{}")]) + ", " + ", ".join(filler[:2])
        prompts.append(Prompt(kind, text, frozenset(c.index for c in targets)))
    return prompts


# --------------------------------------------------------------------------------------------------- measuring
def _score(retriever: Retriever, prompts: list[Prompt], generator: LibraryGenerator) -> dict[str, Any]:
    """Exact sets, precision and recall; a pick is right when it holds the named concept's truth tensors."""
    holds = {stem: concept.index for concept in generator.concepts for stem in concept.equivalents}
    exact = picked = right = named = 0
    latencies: list[float] = []
    failures: list[dict[str, Any]] = []
    for prompt in prompts:
        tick = time.perf_counter()
        picks = retriever.select(prompt.text, family="sd1")
        latencies.append(time.perf_counter() - tick)
        got = {holds.get(p.name, p.name) for p in picks}
        truth = set(prompt.truth)
        exact += got == truth
        picked += len(got)
        right += len(got & truth)
        named += len(truth)
        if got != truth and len(failures) < 6:
            failures.append(
                {
                    "prompt": prompt.text,
                    "expected": sorted(generator.concepts[i].truth for i in prompt.truth),
                    "got": sorted(p.name for p in picks),
                }
            )
    return {
        "prompts": len(prompts),
        "exact_set_accuracy": round(exact / len(prompts), 4),
        "precision": round(right / picked, 4) if picked else 1.0,
        "recall": round(right / named, 4),
        "select_ms_p50": round(1000 * statistics.median(latencies), 2),
        "failures": failures,
    }


def _build(config: GeneratorConfig, root: Path) -> tuple[LibraryGenerator, Library, dict[str, float]]:
    start = time.perf_counter()
    generator = LibraryGenerator(config)
    generator.write(root)
    written = time.perf_counter()
    library = Library(root)
    library.scan()
    scanned = time.perf_counter()
    return generator, library, {"write_s": written - start, "scan_s": scanned - written}


def evaluate(config: GeneratorConfig, prompts_per_kind: int) -> dict[str, Any]:
    """Accuracy of ``select`` on one generated library, per prompt kind."""
    with tempfile.TemporaryDirectory() as tmp:
        generator, library, times = _build(config, Path(tmp))
        tick = time.perf_counter()
        retriever = Retriever(library, scan=False)
        times["retriever_build_s"] = time.perf_counter() - tick
        files = len(library.entries())
        kinds = {}
        for offset, kind in enumerate(("trigger", "title", "paraphrase")):
            prompts = make_prompts(generator, kind, prompts_per_kind, config.seed * 10 + offset)
            kinds[kind] = _score(retriever, prompts, generator)
    return {
        "config": {k: v for k, v in config.__dict__.items()},
        "concepts": config.concepts,
        "files": files,
        "concepts_with_stated_triggers": sum(c.states_triggers for c in generator.concepts),
        "timings_s": {k: round(v, 2) for k, v in times.items()},
        **kinds,
    }


def latency(config: GeneratorConfig, queries: int) -> dict[str, Any]:
    """``select`` latency (metadata signals) on a library of ``config.concepts`` concepts."""
    with tempfile.TemporaryDirectory() as tmp:
        generator, library, times = _build(config, Path(tmp))
        tick = time.perf_counter()
        retriever = Retriever(library, scan=False)
        times["retriever_build_s"] = time.perf_counter() - tick
        prompts = make_prompts(generator, "trigger", queries // 2, 1) + make_prompts(
            generator, "title", queries // 2, 2
        )
        retriever.select(prompts[0].text, family="sd1")
        samples = []
        for prompt in prompts:
            tick = time.perf_counter()
            retriever.select(prompt.text, family="sd1")
            samples.append(1000 * (time.perf_counter() - tick))
        samples.sort()
        adapters = len(library.entries())
    return {
        "adapters": adapters,
        "queries": len(samples),
        "select_ms_p50": round(statistics.median(samples), 2),
        "select_ms_p99": round(samples[min(len(samples) - 1, math.ceil(0.99 * len(samples)) - 1)], 2),
        "timings_s": {k: round(v, 2) for k, v in times.items()},
    }


def main() -> int:
    """Run the evaluation on both configurations and the latency measurement; print one JSON document."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="400-adapter libraries, latency at 2,000")
    args = parser.parse_args()
    concepts, prompts, latency_concepts = (400, 100, 2000) if args.quick else (1000, 300, 10_000)
    result: dict[str, Any] = {
        "benchmark": "realistic_library",
        "quick": args.quick,
        "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine()},
        "targets": {"trigger_exact": 0.95, "title_exact": 0.9, "precision": 0.98, "select_ms_p50_10k": 20},
    }
    for name, config in (("tuned", TUNED), ("held_out", HELD_OUT)):
        result[name] = evaluate(replace(config, concepts=concepts), prompts)
    result["latency"] = latency(replace(TUNED, seed=99, concepts=latency_concepts), 200)
    json.dump(result, sys.stdout, indent=2)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
