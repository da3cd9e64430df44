"""Composition quality on the toy world, scored by its judge: the ComposLoRA protocol on a model trained here.

Protocol (ComposLoRA, Zhong et al. 2024, adapted): one character adapter plus 1–4 adapters of other categories
(clothing, style, background, object), every adapter at weight 0.8, prompt = a world caption naming each element
by its trigger phrase, several seeds; every method composes the same sets through the public API
(``pipe.set_composition``). Each image is read by the judge: per-element presence, all-elements success, and
win/tie/lose against merge on the number of elements present (ties counted as ties). The reference row is each
LoRA alone on base-vocabulary scenes (its concept present; the prompt's other attributes kept), at the protocol's
weight and at the weight the library's cards recommend (``PREFERRED_WEIGHT``, 1.0: what a user types).

``--branches both,conditional`` adds rows with every adapter on CFG's conditional branch only
(``set_composition(..., branches="conditional")``: the unconditional prediction from the base model), labelled
``<method> (cond)``; win/tie/lose is always against plain merge on both branches, the protocol's baseline.
``mixed`` chooses per adapter (``branches={name: "conditional"}``): background adapters on both branches, every other
adapter on the conditional branch only, labelled ``<method> (mixed)``. The rule comes from the tuning scenes in
``composer/toyworld/weights/README.md`` (seed 99, and k = 2 seeds 10–12), not from the benchmark's own. ``shared``
keeps backgrounds on both branches too and gives the unconditional half of every other adapter a share of its weight
(``branches={name: share}``, :data:`UNCONDITIONAL_SHARE` for every adapter) and runs every adapter at its calibrated
default weight (:mod:`composer.calibration`, from the adapter file and the base model alone, stored in the library's
catalog), labelled ``<method> (shared)``. ``--default-path`` adds the rows of what a user gets with no options:
``Composer(model="toy-sd", library=LIB).run(prompt, loras="auto", seed=s)`` (retrieval and the facade's defaults),
labelled ``default path``, and the same with ``calibrated_defaults=True``, labelled ``default path (calibrated)``.
The LoRA-alone table gets a column pair for each of those settings too, or for those given to ``--alone-branches``
(a ``mixed`` alone column beside the protocol's rows, without the mixed compositions). ``--compositions-only --name
NAME`` runs the composition rows alone into ``docs/NAME.md`` (a branch setting added
to a full run's rows without repeating them; the library and every other row unchanged); ``--extra-only`` does the
same with the LoRA-alone columns of ``--alone-branches`` kept (no base-model or protocol LoRA-alone rows);
``--alone-only`` keeps those columns alone (no compositions). The LoRA-alone scenes are drawn with seed 7
(``--alone-seed`` draws another held-out set).

``--image-cache DIR`` keeps every drawn image under a fingerprint of the code and weights that draw it (the judge's
left out) and re-reads it on a later run with the same recipe, so a rerun after a judge-only change judges without
drawing (``make quality`` uses it); the docs then say how many images were re-read.

``--quick`` (for ``make bench`` / CI) runs one set at k=2 with one seed at 8 steps (``--steps`` overrides). The full
run samples ``--sets`` combinations per k (seeded), composes every combination for the k listed in ``--every-set-k``
(the protocol's own rule, affordable on a CPU for k=2), and writes docs/composition_quality.md and an image grid.
"""

from __future__ import annotations

import argparse
import itertools
import json
import random
import sys
import time
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks._common import cpu_hardware
from benchmarks._image_cache import ImageCache, drawing_fingerprint
from weights_index.hashing import file_sha256

METHODS = ("merge", "switch", "composite", "cmlora", "klora", "ties", "gated")
"""Every method; ``gated`` runs with the library's trained gates (``--gates``) and is left out when there are none."""
WEIGHT = 0.8
BRANCHES = ("both", "conditional", "mixed", "shared")
EXTRA_BRANCHES = BRANCHES[1:]
"""The settings that add rows (and LoRA-alone columns) beside the protocol's both-branch ones."""
UNCONDITIONAL_SHARE = 0.5
"""Under ``shared``: the share of its weight that a non-background adapter carries on CFG's unconditional half (one
number for every adapter). Backgrounds stay on both branches, as under ``mixed``: at 0.5 they lost the scene's other
attributes."""
DEFAULT_PATH = "default path"
"""The row label of ``Composer(model="toy-sd", library=LIB).run(prompt, loras="auto", seed=s)``, every other argument
at its default."""
GUIDANCE = 3.0
"""CFG scale of every image (toy-sd's default)."""
REPOSITORY = Path(__file__).resolve().parents[1]
"""The checkout whose packages draw the images (what the image cache's fingerprint covers)."""
ALONE_SEED = 7
"""The LoRA-alone scene seed the benchmark uses by default (held out from every choice of files, gates and rules)."""
COND_NOTE = (
    ' Rows and columns marked (cond): the same composition with `branches="conditional"` (adapters on CFG\'s'
    " conditional branch only, the unconditional prediction from the base model); win/tie/lose is always against"
    " plain merge."
)
MIXED_NOTE = (
    " Rows marked (mixed): background adapters on both CFG branches, every other adapter on the conditional branch"
    ' only (`branches={name: "conditional"}` for each non-background adapter); the rule was chosen on tuning scenes'
    " and seeds the benchmark does not use."
)
SHARED_NOTE = (
    " Rows and columns marked (shared): every adapter at its calibrated default weight (measured from the adapter"
    " file and the base model alone, docs/methods.md#calibration), background adapters on both CFG branches, every"
    " other adapter on the conditional branch at its weight and on the unconditional one at half of it"
    " (`branches={name: 0.5}`). Every method runs on both halves, the unconditional one at the share."
)
_SUFFIX = {"both": "", "conditional": " (cond)", "mixed": " (mixed)", "shared": " (shared)"}


def variant(method: str, branches: str) -> str:
    """The row label of ``method`` composed on the branch setting ``branches``: the method's name,
    ``"<method> (cond)"`` for the conditional branch only, ``"<method> (mixed)"`` and ``"<method> (shared)"`` for
    the per-adapter rules."""
    return method + _SUFFIX[branches]


def branch_choice(setting: str, combo: tuple[str, ...]) -> str | dict[str, str | float]:
    """What ``set_composition(branches=...)`` gets for ``combo`` under a branch setting: ``mixed`` puts every
    non-background adapter on the conditional branch only, ``shared`` gives its unconditional half
    :data:`UNCONDITIONAL_SHARE` of its weight (backgrounds, unnamed, act on both)."""
    if setting not in ("mixed", "shared"):
        return setting
    from composer.toyworld.world import CONCEPTS

    categories = {name: CONCEPTS[name].category for name in combo if CONCEPTS[name].category != "background"}
    if setting == "mixed":
        return dict.fromkeys(categories, "conditional")
    return dict.fromkeys(categories, UNCONDITIONAL_SHARE)


def setting_weights(
    setting: str, combo: tuple[str, ...], weight: float, calibrated: dict[str, float] | None
) -> dict[str, float]:
    """The weights ``combo`` composes at under a branch setting: the calibrated ones under ``shared``, else
    ``weight`` for every adapter."""
    if setting == "shared":
        if calibrated is None:
            raise ValueError("the shared setting needs the library's calibrated weights")
        return {name: calibrated[name] for name in combo}
    return dict.fromkeys(combo, weight)


def calibrated_weights(pipe: Any, library: Path, names: list[str]) -> dict[str, float]:
    """Each library adapter's calibrated default weight on ``pipe`` (stored in the library's catalog; measured there
    first when missing)."""
    from composer.calibration import Calibrator, catalog_calibration
    from composer.calibration_store import model_identity
    from weights_index.catalog import Library

    catalog = Library(library)
    catalog.scan()
    calibrator = Calibrator(pipe)
    identity = model_identity(pipe, "toy-sd")
    return {name: catalog_calibration(calibrator, catalog, catalog.get(name), identity).weight for name in names}


def toy_pipeline(library: Path) -> tuple[Any, list[str]]:
    """toy-sd, composable, with every adapter of the toy library (built into ``library``) registered by file stem."""
    from composer import load_preset, make_composable
    from composer.toyworld.library import build_toy_library

    files = build_toy_library(library)
    pipe = make_composable(load_preset("toy-sd"))
    pipe.set_progress_bar_config(disable=True)
    with torch.no_grad():
        for path in files:
            pipe.add_adapter_file(path, name=path.stem)
    return pipe, [path.stem for path in files]


def composition_sets(names: list[str], k: int) -> list[tuple[str, ...]]:
    """Every set of one character plus k−1 concepts of distinct other categories, among the shipped concepts."""
    from composer.toyworld.world import OTHER_CATEGORIES, concepts_by_category

    by_category = {c: [concept.name for concept in group] for c, group in concepts_by_category(names).items()}
    others = [c for c in OTHER_CATEGORIES if c in by_category]
    sets = []
    for character in by_category.get("character", []):
        for categories in itertools.combinations(others, k - 1):
            for picks in itertools.product(*(by_category[c] for c in categories)):
                sets.append((character, *picks))
    return sets


def chosen_sets(every: list[tuple[str, ...]], count: int | None, picker: random.Random) -> list[tuple[str, ...]]:
    """``count`` sets drawn from ``every`` with ``picker``, or every one of them (``None``, or ``count`` ≥ all)."""
    if count is None or count >= len(every):
        return every
    return picker.sample(every, count)


def sample_images(pipe: Any, prompts: str | list[str], seed: int, steps: int) -> torch.Tensor:
    """Images (B, 3, 64, 64) in [0, 1] for the prompts, at CFG :data:`GUIDANCE`, from one seeded generator."""
    with torch.inference_mode():
        return pipe(
            prompts,
            num_inference_steps=steps,
            guidance_scale=GUIDANCE,
            output_type="pt",
            generator=torch.Generator().manual_seed(seed),
        ).images


def _drawn(
    cache: ImageCache | None, pipe: Any, prompts: str | list[str], seed: int, steps: int, **choices: Any
) -> tuple[torch.Tensor, float]:
    """:func:`sample_images` through ``cache`` (none: drawn), its recipe the prompts, seed, steps and CFG plus
    ``choices`` (what else the pipeline was set to draw with): the images and the seconds drawing them took."""
    recipe = {
        **choices,
        "prompt" if isinstance(prompts, str) else "prompts": prompts,
        "seed": seed,
        "steps": steps,
        "guidance": GUIDANCE,
    }
    return (cache or ImageCache(None, "")).draw(recipe, partial(sample_images, pipe, prompts, seed, steps))


def composition_prompt(combo: tuple[str, ...], seed: int) -> str:
    """A world caption naming every concept of ``combo`` by its trigger phrase, on a scene drawn with ``seed``."""
    from composer.toyworld.world import CONCEPTS, caption, sample_scene

    rng = random.Random(seed)
    concepts = tuple(CONCEPTS[name] for name in combo)
    scene = sample_scene(rng, optional=0.0).with_concepts(*concepts)
    return caption(scene, rng, concepts)


def run_compositions(
    pipe: Any,
    names: list[str],
    ks: list[int],
    sets_per_k: int,
    seeds: list[int],
    steps: int,
    methods: tuple[str, ...],
    weight: float = WEIGHT,
    gates: Path | None = None,
    every_set_k: tuple[int, ...] = (),
    branches: tuple[str, ...] = ("both",),
    cache: ImageCache | None = None,
    calibrated: dict[str, float] | None = None,
) -> dict[str, Any]:
    """For each k and method (on each of ``branches``, see :func:`variant`): element presence, all-elements success,
    win/tie/lose vs merge, seconds per image.

    Each k composes ``sets_per_k`` sets drawn with one seeded picker, or all of them for the k in ``every_set_k``.
    ``gated`` composes with the trained ``gates`` checkpoint (learned mode), read once and passed to every
    ``set_composition`` (a name or path there would be read again for each image). Images come through ``cache``
    (none: every one drawn)."""
    from composer.toyworld.verdict import judge_images
    from composer.training.gates import load_gates
    from fusion.strategies import get_strategy

    bank = load_gates(gates) if gates is not None and "gated" in methods else None
    gates_digest = file_sha256(gates) if bank is not None else None

    table: dict[str, Any] = {}
    picker = random.Random(0)
    samples: dict[str, dict[str, torch.Tensor]] = {}
    for k in ks:
        every = composition_sets(names, k)
        chosen = chosen_sets(every, sets_per_k if k not in every_set_k else None, picker)
        trials = [(combo, seed) for combo in chosen for seed in seeds]
        found: dict[str, list[int]] = {}
        row: dict[str, Any] = {"sets": len(chosen), "sets_possible": len(every), "images_per_method": len(trials)}
        for method, branch in itertools.product(methods, branches):
            if branch != "both" and get_strategy(method).fused_only:
                continue  # its fused weights serve both branches: the per-branch rules cannot apply to it
            label = variant(method, branch)
            counts, successes, seconds = [], 0, 0.0
            for combo, seed in trials:
                prompt = composition_prompt(combo, seed)
                options = {"gates": bank} if method == "gated" else {}
                choice = branch_choice(branch, combo)
                weights = setting_weights(branch, combo, weight, calibrated)
                pipe.set_composition(weights, method=method, branches=choice, **options)
                image, per_image = _drawn(
                    cache,
                    pipe,
                    prompt,
                    seed,
                    steps,
                    draw="composition",
                    weights=weights,
                    method=method,
                    branches=choice,
                    gates=gates_digest if method == "gated" else None,
                )
                pipe.clear_composition()
                verdict = judge_images(image, [prompt], [list(combo)])[0]
                samples.setdefault(f"k={k}: {prompt}", {}).setdefault(label, image[0])
                present = sum(verdict.concepts.values())
                counts.append(present)
                successes += present == len(combo)
                seconds += per_image
            found[label] = counts
            row[label] = {
                "element_presence": round(sum(counts) / (len(trials) * k), 3),
                "all_elements": round(successes / len(trials), 3),
                "seconds_per_image": round(seconds / len(trials), 2),
            }
        for label in found:
            if label == "merge" or "merge" not in found:
                continue
            pairs = list(zip(found[label], found["merge"]))
            row[label]["vs_merge"] = {
                "win": sum(a > b for a, b in pairs),
                "tie": sum(a == b for a, b in pairs),
                "lose": sum(a < b for a, b in pairs),
            }
        table[f"k={k}"] = row
    table["_samples"] = samples
    return table


def run_default_path(
    library: Path,
    names: list[str],
    ks: list[int],
    sets_per_k: int,
    seeds: list[int],
    every_set_k: tuple[int, ...] = (),
    cache: ImageCache | None = None,
    *,
    calibrated: bool = True,
    samples: dict[str, dict[str, torch.Tensor]] | None = None,
) -> dict[str, Any]:
    """For each k, the :data:`DEFAULT_PATH` row: ``Composer(model="toy-sd", library=library).run(prompt,
    loras="auto", seed=s)`` on the same sets, prompts and seeds as :func:`run_compositions` (same seeded picker),
    every other argument at its default, and beside it (``calibrated``) the same with ``calibrated_defaults=True``;
    element presence
    and all-elements success by the judge, and how often retrieval picked exactly the named adapters. Images go
    through ``cache`` like every other row's and into ``samples`` (the docs' grid) when given."""
    from composer.facade import Composer

    composers = {DEFAULT_PATH: Composer(model="toy-sd", library=library)}
    if calibrated:
        composers[f"{DEFAULT_PATH} (calibrated)"] = Composer(model="toy-sd", library=library, calibrated_defaults=True)
    table: dict[str, Any] = {}
    picker = random.Random(0)
    for k in ks:
        every = composition_sets(names, k)
        chosen = chosen_sets(every, sets_per_k if k not in every_set_k else None, picker)
        trials = [(combo, seed) for combo in chosen for seed in seeds]
        table[f"k={k}"] = {"sets": len(chosen), "sets_possible": len(every), "images_per_method": len(trials)}
        for label, composer in composers.items():
            table[f"k={k}"][label] = _default_path_cell(composer, label, trials, k, cache, samples)
    return table


def _default_path_cell(
    composer: Any,
    label: str,
    trials: list[tuple[tuple[str, ...], int]],
    k: int,
    cache: ImageCache | None,
    samples: dict[str, dict[str, torch.Tensor]] | None = None,
) -> dict[str, Any]:
    """One default-path row cell: ``composer.run(prompt, loras="auto", seed=seed)`` on every trial, judged."""
    from composer.toyworld.verdict import judge_images

    def draw(prompt: str, seed: int) -> torch.Tensor:
        image = composer.run(prompt, loras="auto", seed=seed).images[0]
        return torch.from_numpy(np.array(image)).permute(2, 0, 1)[None].float() / 255.0

    counts, successes, exact, seconds = [], 0, 0, 0.0
    for combo, seed in trials:
        prompt = composition_prompt(combo, seed)
        recipe = {"row": label, "prompt": prompt, "seed": seed, "guidance": GUIDANCE}
        images, spent = (cache or ImageCache(None, "")).draw(recipe, partial(draw, prompt, seed))
        exact += {adapter.name for adapter in composer.choose(prompt, "auto")[1]} == set(combo)
        verdict = judge_images(images, [prompt], [list(combo)])[0]
        if samples is not None:
            samples.setdefault(f"k={k}: {prompt}", {}).setdefault(label, images[0])
        present = sum(verdict.concepts.values())
        counts.append(present)
        successes += present == len(combo)
        seconds += spent
    return {
        "element_presence": round(sum(counts) / (len(trials) * k), 3),
        "all_elements": round(successes / len(trials), 3),
        "seconds_per_image": round(seconds / len(trials), 2),
        "retrieved_exactly": exact,
    }


def alone_scenes(name: str, images: int, scene_seed: int = ALONE_SEED) -> tuple[list[Any], list[str]]:
    """The LoRA-alone row's scenes for the concept ``name`` (base-vocabulary scenes with the concept applied) and
    their captions, drawn with ``scene_seed``: the same for every run, method and branch setting."""
    from composer.toyworld.world import CONCEPTS, caption, sample_scene

    concept = CONCEPTS[name]
    rng = random.Random(scene_seed)
    scenes = [sample_scene(rng).with_concepts(concept) for _ in range(images)]
    return scenes, [caption(scene, rng, (concept,)) for scene in scenes]


def others_kept(seen: dict[str, str], scene: Any, concept: Any) -> bool:
    """Whether the judge's reading ``seen`` shows every attribute of ``scene`` that ``concept`` does not set."""
    return all(value == getattr(scene, attr) for attr, value in seen.items() if attr not in concept.sets)


def run_alone(
    pipe: Any,
    names: list[str],
    images: int,
    steps: int,
    weight: float = WEIGHT,
    branches: str = "both",
    scene_seed: int = ALONE_SEED,
    cache: ImageCache | None = None,
    calibrated: dict[str, float] | None = None,
) -> dict[str, Any]:
    """Each LoRA alone at ``weight`` (its calibrated weight under ``shared``; on the branch setting ``branches``,
    ``mixed`` as in compositions) on base scenes drawn with ``scene_seed``: its concept present, and the prompt's
    other attributes kept. Images come through ``cache`` (none: every one drawn)."""
    from composer.toyworld.verdict import judge_images
    from composer.toyworld.world import CONCEPTS

    rows = {}
    for name in names:
        concept = CONCEPTS[name]
        scenes, prompts = alone_scenes(name, images, scene_seed)
        choice = branch_choice(branches, (name,))
        weights = setting_weights(branches, (name,), weight, calibrated)
        pipe.set_composition(weights, method="merge", branches=choice)
        out, _ = _drawn(cache, pipe, prompts, 0, steps, draw="alone", weights=weights, method="merge", branches=choice)
        pipe.clear_composition()
        verdicts = judge_images(out, prompts, [[name]] * images)
        kept = [others_kept(v.seen, s, concept) for v, s in zip(verdicts, scenes)]
        rows[name] = {
            "concept_present": round(sum(v.concepts[name] for v in verdicts) / images, 3),
            "others_kept": round(sum(kept) / images, 3),
        }
    return rows


def run_base(pipe: Any, images: int, steps: int, cache: ImageCache | None = None) -> dict[str, float]:
    """The base model alone on base-vocabulary captions: every attribute of the scene right (judge). Images come
    through ``cache`` (none: every one drawn)."""
    from composer.toyworld.verdict import shipped_judge
    from composer.toyworld.world import ATTRIBUTES, caption, sample_scene

    rng = random.Random(11)
    scenes = [sample_scene(rng) for _ in range(images)]
    prompts = [caption(scene, rng) for scene in scenes]
    out, _ = _drawn(cache, pipe, prompts, 0, steps, draw="base")
    seen = shipped_judge().read(out)
    right = [all(s[a] == getattr(sc, a) for a in ATTRIBUTES) for s, sc in zip(seen, scenes)]
    per = {a: round(sum(s[a] == getattr(sc, a) for s, sc in zip(seen, scenes)) / images, 3) for a in ATTRIBUTES}
    return {"all_attributes": round(sum(right) / images, 3), **per, "images": images}


def write_docs(
    result: dict[str, Any], samples: dict[str, dict[str, torch.Tensor]], folder: Path, name: str = "composition_quality"
) -> None:
    """docs/NAME.md (the tables), docs/NAME.json (the measurements behind them) and docs/images/NAME.png (every set
    and seed by method); the base-model, LoRA-alone and composition tables where the run measured them."""
    from PIL import Image, ImageDraw

    from composer.facade import DEFAULT_STEPS

    methods = list(
        dict.fromkeys(
            label for row in result["compositions"].values() for label, cell in row.items() if isinstance(cell, dict)
        )
    )
    protocol = any(not label.startswith(DEFAULT_PATH) for label in methods) or not methods
    setting = (
        f"{result['steps']} steps, CFG 3, every adapter at weight {result['weight']}"
        if protocol
        else 'the default path only: `Composer(model="toy-sd", library=LIB).run(prompt, loras="auto", seed=s)`, every '
        f"other argument at its default ({DEFAULT_STEPS['sd1']} steps, CFG 3, the cards' weights, both CFG branches)"
    )
    lines = [
        "# Composition quality on the toy world (generated by benchmarks/composition_quality.py)",
        "",
        f"toy-sd, {setting}; judged by the toy world's judge; {result['hardware']}; {result['seconds']} s in all."
        + _reuse_note(result.get("images", {})),
        f"Adapters: {', '.join(result['adapters'])}."
        + (f" Gated: learned mode with the gates in `{result['gates']}`." if "gates" in result else "")
        + (COND_NOTE if any("(cond)" in label for label in methods) else "")
        + (MIXED_NOTE if any("(mixed)" in label for label in methods) else "")
        + (SHARED_NOTE if "alone_shared" in result or any("(shared)" in label for label in methods) else ""),
        "",
    ]
    lines += _alone_lines(result)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
    if not result["compositions"]:
        (folder / f"{name}.md").write_text("\n".join(lines))
        return
    lines += [
        "## Compositions (one character + k−1 other categories)",
        "",
        "| k | sets (of possible) × seeds | method | element presence | all elements | vs merge (w/t/l) | s/image |",
        "|---|---|---|---|---|---|---|",
    ]
    for k, row in result["compositions"].items():
        for method in methods:
            cell = row.get(method)
            if cell is None:
                continue
            versus = cell.get("vs_merge")
            wtl = f"{versus['win']}/{versus['tie']}/{versus['lose']}" if versus else "—"
            seeds = row["images_per_method"] // max(row["sets"], 1)
            lines.append(
                f"| {k[2:]} | {row['sets']} ({row['sets_possible']}) × {seeds} | {method} | "
                f"{cell['element_presence']:.0%} | {cell['all_elements']:.0%} | {wtl} | "
                f"{cell['seconds_per_image']} |"
            )
    lines += ["", f"![every composition set and seed, one column per method](images/{name}.png)", ""]
    (folder / f"{name}.md").write_text("\n".join(lines))
    cell, label = 128, 260
    canvas = Image.new("RGB", (label + cell * len(methods), 20 + cell * len(samples)), "white")
    draw = ImageDraw.Draw(canvas)
    for j, method in enumerate(methods):
        draw.text((label + j * cell + 4, 4), method, fill="black")
    for i, (title, images) in enumerate(samples.items()):
        draw.text((4, 24 + i * cell), "\n".join(title[n : n + 40] for n in range(0, len(title), 40)), fill="black")
        for j, method in enumerate(methods):
            if method in images:
                tile = Image.fromarray((images[method].permute(1, 2, 0) * 255).round().byte().numpy())
                canvas.paste(tile.resize((cell, cell), Image.NEAREST), (label + j * cell, 20 + i * cell))
    (folder / "images").mkdir(exist_ok=True)
    # a 256-colour palette: the toy world's flat colours survive it, and the grid is a quarter of the size
    canvas.quantize(colors=256).save(folder / "images" / f"{name}.png", optimize=True)


def _reuse_note(images: dict[str, int]) -> str:
    """What the docs say when a run re-read images from its image cache (nothing when it drew every one)."""
    if not images.get("reused"):
        return ""
    total = images["reused"] + images["drawn"]
    return (
        f" {images['reused']} of its {total} images were re-read from the image cache, drawn before by the same code,"
        " weights and recipe (only the judge differs); their seconds per image are those measured when drawn."
    )


def _alone_lines(result: dict[str, Any]) -> list[str]:
    """The base model's line and the each-LoRA-alone table with a column pair per weight and branch setting the
    run measured (none: no lines)."""
    weight = result["weight"]
    columns = [
        (key, f"concept present at {at} | other attributes kept at {at}")
        for key, at in [("alone", weight), ("alone_preferred", result.get("preferred_weight"))]
        if key in result
    ] + [
        (f"alone_{s}", f"concept present at {at}{_SUFFIX[s]} | others kept at {at}{_SUFFIX[s]}")
        for s, at in ((s, "calibrated weight" if s == "shared" else weight) for s in EXTRA_BRANCHES)
        if f"alone_{s}" in result
    ]
    if not columns:
        return []
    lines = []
    if "base" in result:
        lines += [
            f"Base model alone on {result['base']['images']} base-vocabulary captions: all attributes right in "
            f"{result['base']['all_attributes']:.0%} of images; per attribute: "
            + ", ".join(f"{a} {v:.0%}" for a, v in result["base"].items() if a not in ("all_attributes", "images")),
            "",
        ]
    return [
        *lines,
        f"## Each LoRA alone ({result['alone_images']} scenes each"
        + (f", scene seed {result['alone_seed']}" if result.get("alone_seed", ALONE_SEED) != ALONE_SEED else "")
        + ")",
        "",
        "| adapter | " + " | ".join(header for _, header in columns) + " |",
        "|---|" + "---|---|" * len(columns),
        *(
            f"| {n} |"
            + "".join(
                f" {result[key][n]['concept_present']:.0%} | {result[key][n]['others_kept']:.0%} |"
                for key, _ in columns
            )
            for n in result[columns[0][0]]
        ),
        "",
    ]


def _comma_list(text: str) -> tuple[str, ...]:
    """The non-empty items of a comma-separated option value."""
    return tuple(item for item in text.split(",") if item)


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and print one JSON document."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--sets", type=int, default=6, help="composition sets sampled per k (full mode)")
    parser.add_argument(
        "--every-set-k", default="", help="comma-separated k composed on every combination instead of --sets"
    )
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=None, help="denoising steps (default 20; 8 with --quick)")
    parser.add_argument("--alone-images", type=int, default=32, help="scenes per adapter in the LoRA-alone rows")
    parser.add_argument("--base-images", type=int, default=48)
    parser.add_argument("--library", type=Path, default=Path(".cache/bench/toy_library"))
    parser.add_argument(
        "--adapters",
        default="",
        help="comma-separated adapters of the library to measure (default: all); compositions are drawn from them",
    )
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--gates", type=Path, default=None, help="gates for gated (default: the toy library's)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (timings in the docs: 1)")
    parser.add_argument("--weight", type=float, default=WEIGHT, help="every adapter's weight (protocol: 0.8)")
    parser.add_argument(
        "--branches",
        default="both",
        help="comma-separated CFG branch settings to compose on: both (the protocol), conditional, mixed and/or "
        "shared (extra rows)",
    )
    parser.add_argument(
        "--alone-branches",
        default=None,
        help="comma-separated extra branch settings (conditional, mixed, shared) for the LoRA-alone table "
        "(default: those of --branches)",
    )
    parser.add_argument(
        "--compositions-only", action="store_true", help="full mode: skip the base-model and LoRA-alone rows"
    )
    parser.add_argument(
        "--extra-only",
        action="store_true",
        help="full mode: skip the base-model rows and the protocol's LoRA-alone columns (keep --alone-branches')",
    )
    parser.add_argument(
        "--alone-only", action="store_true", help="full mode: only the LoRA-alone columns of --alone-branches"
    )
    parser.add_argument(
        "--alone-seed",
        type=int,
        default=ALONE_SEED,
        help="seed of the LoRA-alone scenes (default: the benchmark's held-out set)",
    )
    parser.add_argument(
        "--default-path",
        nargs="?",
        const="both",
        choices=("both", "plain"),
        default=None,
        help='add the "default path" rows: Composer(model="toy-sd", library=LIB).run(prompt, loras="auto", seed=s), '
        "and the same with calibrated_defaults=True unless `plain`",
    )
    parser.add_argument("--name", default="composition_quality", help="file stem of the docs written by --docs")
    parser.add_argument(
        "--image-cache",
        type=Path,
        default=None,
        help="keep drawn images here and re-read those drawn before under the same code, weights and recipe "
        "(after a judge-only change a rerun judges without drawing)",
    )
    parser.add_argument("--out", type=Path, default=None, help="write the JSON here too")
    parser.add_argument("--docs", type=Path, default=None, help="full mode: write the Markdown table and grid here")
    args = parser.parse_args(argv)
    branches = _comma_list(args.branches)
    alone_branches = branches if args.alone_branches is None else _comma_list(args.alone_branches)
    for flag, settings in (("--branches", branches), ("--alone-branches", alone_branches)):
        unknown = [b for b in settings if b not in BRANCHES]
        if unknown:
            parser.error(f"{flag} takes {', '.join(BRANCHES)}; got {', '.join(unknown)}")
    from composer.toyworld.library import LIBRARY_GATES, PREFERRED_WEIGHT, available_concepts

    asked = _comma_list(args.adapters)
    shipped = set(available_concepts())
    unknown = [name for name in asked if name not in shipped]
    if unknown:  # refused before the model loads or the library is built
        parser.error(f"--adapters names adapters the library does not hold: {', '.join(unknown)}")
    torch.set_num_threads(args.threads)
    pipe, names = toy_pipeline(args.library)
    if asked:
        names = [name for name in names if name in asked]
    fingerprint = "" if args.image_cache is None else drawing_fingerprint(REPOSITORY)
    cache = ImageCache(args.image_cache, fingerprint)
    calibrated = calibrated_weights(pipe, args.library, names) if "shared" in branches + alone_branches else None
    gates = args.gates or LIBRARY_GATES
    methods = tuple(m for m in args.methods.split(",") if m and (m != "gated" or gates.is_file()))
    started = time.perf_counter()
    if args.steps is None:
        args.steps = 8 if args.quick else 20
    if args.quick:
        result = {
            "mode": "quick",
            "compositions": run_compositions(
                pipe,
                names,
                [2],
                1,
                [0],
                args.steps,
                methods,
                gates=gates,
                branches=branches,
                cache=cache,
                calibrated=calibrated,
            ),
        }
    else:
        result = {"mode": "full", "steps": args.steps, "weight": args.weight}
        if not args.compositions_only:
            result["alone_images"] = args.alone_images
            result["alone_seed"] = args.alone_seed
            if not (args.extra_only or args.alone_only):
                result |= {
                    "base": run_base(pipe, args.base_images, args.steps, cache),
                    "alone": run_alone(
                        pipe, names, args.alone_images, args.steps, args.weight, scene_seed=args.alone_seed, cache=cache
                    ),
                    "preferred_weight": PREFERRED_WEIGHT,
                    "alone_preferred": run_alone(
                        pipe,
                        names,
                        args.alone_images,
                        args.steps,
                        PREFERRED_WEIGHT,
                        scene_seed=args.alone_seed,
                        cache=cache,
                    ),
                }
            for setting in EXTRA_BRANCHES:
                if setting in alone_branches:
                    result[f"alone_{setting}"] = run_alone(
                        pipe,
                        names,
                        args.alone_images,
                        args.steps,
                        args.weight,
                        setting,
                        args.alone_seed,
                        cache,
                        calibrated,
                    )
        result["compositions"] = {"_samples": {}}
    if not (args.quick or args.alone_only):
        result |= {
            "compositions": run_compositions(
                pipe,
                names,
                [2, 3, 4, 5],
                args.sets,
                list(range(args.seeds)),
                args.steps,
                methods,
                args.weight,
                gates,
                tuple(int(k) for k in args.every_set_k.split(",") if k),
                branches,
                cache,
                calibrated,
            ),
        }
        if args.default_path:
            default_rows = run_default_path(
                args.library,
                names,
                [2, 3, 4, 5],
                args.sets,
                list(range(args.seeds)),
                tuple(int(k) for k in args.every_set_k.split(",") if k),
                cache,
                calibrated=args.default_path == "both",
                samples=result["compositions"]["_samples"],
            )
            for k, row in default_rows.items():
                result["compositions"].setdefault(k, {}).update(
                    {label: cell for label, cell in row.items() if label.startswith(DEFAULT_PATH)}
                )
    samples = result["compositions"].pop("_samples")
    result["adapters"] = names
    if calibrated is not None:
        result["calibrated_weights"] = calibrated
    result["seconds"] = round(time.perf_counter() - started, 1)
    result["images"] = {"drawn": cache.drawn, "reused": cache.reused}
    result["hardware"] = cpu_hardware(args.threads)
    if "gated" in methods:
        here = Path.cwd().resolve()
        result["gates"] = str(gates.resolve().relative_to(here) if gates.resolve().is_relative_to(here) else gates)
    if args.docs is not None and not args.quick:
        write_docs(result, samples, args.docs, args.name)
    document = json.dumps(result, indent=2)
    if args.out is not None:
        args.out.write_text(document + "\n")
    sys.stdout.write(document + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
