"""The judge's labelled set: toy-sd images of every kind the benchmarks read, labelled by eye, to check the judge.

``python -m benchmarks.judge_labels draw`` draws the set into ``benchmarks/data/judge_labels/``: base-model images
on base-vocabulary captions, each LoRA alone, and compositions of k = 2…5 adapters with every method and branch
setting of the quality benchmark, on scene and generation seeds no benchmark uses (10 000 and up). Each image is a
64² PNG named by its id; ``recipes.json`` keeps what drew it (prompt, adapters, method, branches, weight, seed) and
which part of a split it belongs to (``merge --held-out-share``). The judge is fitted on every image of the sets in
:data:`TUNING_FOLDERS` (``calibrate``; more sets are drawn with ``--first-seed`` on other seeds) and checked on a
fresh set drawn the same way, held out whole (``merge --held-out-share 1``) and labelled by other readers
(``evaluate``), and on the labelled sets in :data:`CHECK_FOLDERS`, kept out of the fit.

Labels are written by a person looking at the 4× nearest-neighbour upscale with the recipe hidden (see
docs/judge.md for the protocol); ``sheets`` prints numbered contact sheets for that.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from benchmarks.composition_quality import (
    GUIDANCE,
    WEIGHT,
    branch_choice,
    composition_prompt,
    composition_sets,
    sample_images,
    toy_pipeline,
)

SET_FOLDER = Path(__file__).with_name("data") / "judge_labels"
"""Where the first labelled set the judge is fitted on lives: ``images/<id>.png``, ``recipes.json``,
``labels.json``."""
TUNING_FOLDERS = (
    SET_FOLDER,
    *(SET_FOLDER.with_name(f"judge_labels_{n}") for n in ("second", "third", "fourth", "fifth")),
)
"""The labelled sets the shipped judge is fitted on, in the order their ids are numbered on (:func:`labelled_sets`):
the first set, then four of the same layout drawn on seeds from 30 000, 70 000, 50 000 and 90 000."""
FRESH_FOLDER = SET_FOLDER.with_name("judge_labels_fresh")
"""Where the held-out set lives (the same layout): drawn on other seeds, labelled by other readers, never looked
at by any choice about the judge."""
UNREAD_FOLDER = SET_FOLDER.with_name("judge_labels_unread")
"""A labelled set (the same layout, seeds from 150 000) that no judge has read: the held-out set of the next judge,
chosen on every other labelled set. Only its completeness is tested; nothing reads it with a judge."""
CHECK_FOLDERS = (SET_FOLDER.with_name("judge_labels_sixth"),)
"""Labelled sets the shipped judge is not fitted on and no choice about it was made on, read beside the held-out set
(their disagreements with a judge were inspected, so they are checks, not unseen tests)."""
HELD_OUT = "held-out"
TUNING = "tuning (cross-fitted)"
FIRST_SEED = 10_000
"""Scene and generation seeds start here: above every seed a benchmark or the demo uses."""
HELD_OUT_SHARE = 0.4
"""Share of each kind kept out of every choice about the judge."""
SPLIT_SEED = 36
STEPS = 20
METHODS = ("merge", "switch", "composite", "cmlora", "gated")
BRANCHES = ("both", "conditional", "mixed", "shared")
PER_CELL = {2: 4, 3: 4, 4: 3, 5: 3}
"""Images per (k, method, branch setting) cell."""


def _save_png(image: torch.Tensor, path: Path) -> None:
    from diffusers.image_processor import VaeImageProcessor

    VaeImageProcessor.numpy_to_pil(VaeImageProcessor.pt_to_numpy(image[None].clamp(0, 1)))[0].save(path)


def plan(names: list[str], first_seed: int = FIRST_SEED) -> list[dict[str, Any]]:
    """Every batch to draw, in order: base, each LoRA alone, compositions per k, method and branch setting, and
    merges at the library cards' weight 1.0 (what ``--loras auto`` uses). Deterministic; scene and generation
    seeds count up from ``first_seed`` (a fresh set takes another start)."""
    from composer.toyworld.world import CONCEPTS, caption, sample_scene

    names = [name for name in CONCEPTS if name in names]
    picker = random.Random(SPLIT_SEED + first_seed - FIRST_SEED)
    seed = first_seed
    batches: list[dict[str, Any]] = []
    scene_rng = random.Random(seed)
    scenes = [sample_scene(scene_rng) for _ in range(48)]
    prompts = [caption(scene, scene_rng) for scene in scenes]
    batches.append({"kind": "base", "prompts": prompts, "adapters": [], "seed": seed})
    for name in names:
        for branch in ("both", "shared"):
            seed += 1
            rng = random.Random(seed)
            concept = CONCEPTS[name]
            scenes = [sample_scene(rng).with_concepts(concept) for _ in range(3)]
            prompts = [caption(scene, rng, (concept,)) for scene in scenes]
            batches.append(
                {"kind": "alone", "prompts": prompts, "adapters": [name], "method": "merge", "branches": branch}
                | {"weight": WEIGHT, "seed": seed}
            )
    for k, per_cell in PER_CELL.items():
        every = composition_sets(names, k)
        for method in METHODS:
            for branch in BRANCHES:
                combo = picker.choice(every)
                seed += 1
                prompts = [composition_prompt(combo, seed * 10 + i) for i in range(per_cell)]
                batches.append(
                    {"kind": f"k={k}", "prompts": prompts, "adapters": list(combo), "method": method}
                    | {"branches": branch, "weight": WEIGHT, "seed": seed}
                )
    for k in (2, 3, 4):
        every = composition_sets(names, k)
        for _ in range(4):
            combo = picker.choice(every)
            seed += 1
            prompts = [composition_prompt(combo, seed * 10 + i) for i in range(2)]
            batches.append(
                {"kind": f"k={k}", "prompts": prompts, "adapters": list(combo), "method": "merge"}
                | {"branches": "both", "weight": 1.0, "seed": seed}
            )
    return batches


def split(recipes: list[dict[str, Any]], held_out_share: float = HELD_OUT_SHARE) -> None:
    """Mark a seeded ``held_out_share`` of each kind ``held_out`` (in place); the rest is ``tuning``."""
    rng = random.Random(SPLIT_SEED)
    kinds = sorted({r["kind"] for r in recipes})
    for kind in kinds:
        ids = [r["id"] for r in recipes if r["kind"] == kind]
        rng.shuffle(ids)
        held = set(ids[: round(len(ids) * held_out_share)])
        for recipe in recipes:
            if recipe["kind"] == kind:
                recipe["part"] = "held_out" if recipe["id"] in held else "tuning"


def draw(folder: Path, library: Path, threads: int, shard: int, shards: int, first_seed: int = FIRST_SEED) -> int:
    """Draw every planned batch whose index ≡ ``shard`` (mod ``shards``) that is not on disk yet (resumable);
    the recipes of the drawn images go to ``recipes-<shard>.json``."""
    from composer.toyworld.library import LIBRARY_GATES
    from composer.training.gates import load_gates

    torch.set_num_threads(threads)
    pipe, names = toy_pipeline(library / f"shard{shard}")
    gates = load_gates(LIBRARY_GATES)
    images = folder / "images"
    images.mkdir(parents=True, exist_ok=True)
    out = folder / f"recipes-{shard}.json"
    done: list[dict[str, Any]] = json.loads(out.read_text()) if out.is_file() else []
    drawn = {r["batch"] for r in done}
    first_id = 0
    for index, batch in enumerate(plan(names, first_seed)):
        ids = range(first_id, first_id + len(batch["prompts"]))
        first_id += len(batch["prompts"])
        if index % shards != shard or index in drawn:
            continue
        if batch["adapters"]:
            combo = tuple(batch["adapters"])
            options = {"gates": gates} if batch["method"] == "gated" else {}
            pipe.set_composition(
                dict.fromkeys(combo, batch["weight"]),
                method=batch["method"],
                branches=branch_choice(batch["branches"], combo),
                **options,
            )
        try:
            out_images = sample_images(pipe, batch["prompts"], batch["seed"], STEPS)
        finally:
            if batch["adapters"]:
                pipe.clear_composition()
        for image_id, prompt, image in zip(ids, batch["prompts"], out_images):
            _save_png(image, images / f"{image_id:04d}.png")
            recipe = {k: v for k, v in batch.items() if k != "prompts"}
            done.append({"id": image_id, "batch": index, "prompt": prompt, **recipe})
        out.write_text(json.dumps(done, indent=1))
        print(f"batch {index} ({batch['kind']}) drawn: {len(done)} images in this shard", flush=True)
    return 0


def _tile(image: Any, scale: int) -> Any:
    from PIL import Image

    return image.resize((image.width * scale, image.height * scale), Image.Resampling.NEAREST)


def sheets(folder: Path, out: Path, exclude: list[Path], per_sheet: int = 12, columns: int = 4, scale: int = 4) -> int:
    """Numbered contact sheets of every image (but those on the sheets whose ``order.json`` files ``exclude``
    names) at ``scale``× nearest-neighbour, in a seeded shuffled order (so that neighbours on a sheet say nothing
    about how an image was made), into ``out``; ``order.json`` lists each sheet's ids. Only ids are shown."""
    from PIL import Image, ImageDraw

    done = {i for path in exclude for chunk in json.loads(path.read_text()).values() for i in chunk}
    ids = sorted(int(path.stem) for path in (folder / "images").glob("*.png") if int(path.stem) not in done)
    random.Random(SPLIT_SEED + 1).shuffle(ids)
    out.mkdir(parents=True, exist_ok=True)
    side, caption = 64 * scale, 22
    order = {}
    for number, start in enumerate(range(0, len(ids), per_sheet)):
        chunk = ids[start : start + per_sheet]
        rows = -(-len(chunk) // columns)
        sheet = Image.new("RGB", (columns * (side + 8), rows * (side + caption + 8)), "white")
        draw = ImageDraw.Draw(sheet)
        for i, image_id in enumerate(chunk):
            x, y = (i % columns) * (side + 8), (i // columns) * (side + caption + 8)
            draw.text((x + 4, y + 4), f"#{image_id}", fill="black", font_size=16)
            sheet.paste(_tile(Image.open(folder / "images" / f"{image_id:04d}.png"), scale), (x, y + caption))
        sheet.save(out / f"sheet{number:02d}.png")
        order[f"sheet{number:02d}"] = chunk
    (out / "order.json").write_text(json.dumps(order))
    print(f"{len(order)} sheets in {out}")
    return 0


def legend(out: Path, scale: int = 3) -> int:
    """The generator's clean render of every value of every attribute, captioned: what each name looks like."""
    from PIL import Image, ImageDraw

    from composer.toyworld.world import ATTRIBUTES, VOCABULARY, Scene, render, sample_layout

    neutral = {"background": "sky", "shape": "circle", "colour": "red", "clothing": "none", "style": "none"}
    neutral["object"] = "none"
    rows = []
    for attr in ATTRIBUTES:
        values = VOCABULARY[attr]
        scenes = [Scene(**(neutral | {attr: value})) for value in values]
        layout = sample_layout(len(scenes), torch.Generator().manual_seed(0))
        rows.append((attr, values, render(scenes, layout)))
    side, caption = 64 * scale, 20
    width = max(len(values) for _, values, _ in rows) * (side + 6) + 110
    sheet = Image.new("RGB", (width, len(rows) * (side + caption + 6)), "white")
    draw = ImageDraw.Draw(sheet)
    for r, (attr, values, images) in enumerate(rows):
        y = r * (side + caption + 6)
        draw.text((4, y + side // 2), attr, fill="black", font_size=16)
        for c, (value, image) in enumerate(zip(values, images)):
            x = 110 + c * (side + 6)
            draw.text((x, y + 2), value, fill="black", font_size=15)
            array = (image.permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()
            sheet.paste(_tile(Image.fromarray(array), scale), (x, y + caption))
    out.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(out)
    return 0


def consensus(readings: list[dict[str, str]]) -> dict[str, str]:
    """Per attribute, the value most readings give when more than half of them give it; :data:`UNSURE` otherwise
    (two readers who differ leave it unsure; a third reading settles it when it sides with one)."""
    from composer.toyworld.reader import UNSURE
    from composer.toyworld.world import ATTRIBUTES

    settled = {}
    for attr in ATTRIBUTES:
        values = [reading[attr] for reading in readings]
        top = max(set(values), key=values.count)
        settled[attr] = top if values.count(top) * 2 > len(values) else UNSURE
    return settled


LABEL_VALUES = {
    "background": ("sky", "grass", "night", "snow", "sunset", "forest"),
    "shape": ("circle", "square", "triangle", "star", "cross", "crescent", "other"),
    "colour": ("red", "blue", "green", "yellow", "purple", "orange", "cyan", "other"),
    "clothing": ("none", "hat", "scarf", "crown", "sunglasses"),
    "style": ("none", "striped", "outlined", "pixel", "dots"),
    "object": ("none", "ball", "box", "flower", "mushroom"),
}
"""What a reader may write for each attribute, besides ``unsure``."""


def collect(readings: list[Path], folder: Path) -> int:
    """Add the readings in JSONL files (one object per image: ``id``, the six attributes, ``note``; the reader is
    the file's stem) to ``labels.json``. A value outside :data:`LABEL_VALUES` is refused, naming file and line."""
    path = folder / "labels.json"
    stored = json.loads(path.read_text()) if path.is_file() else {"images": {}}
    for source in readings:
        for number, line in enumerate(source.read_text().splitlines(), start=1):
            if not line.strip():
                continue
            entry = json.loads(line)
            reading = {}
            for attr, values in LABEL_VALUES.items():
                value = str(entry.get(attr, "")).strip().lower()
                if value not in (*values, "unsure"):
                    raise SystemExit(f"{source}:{number}: {attr} {value!r} is not one of {values} or unsure")
                reading[attr] = value
            reading["reader"] = source.stem
            if entry.get("note"):
                reading["note"] = str(entry["note"])
            image = stored["images"].setdefault(str(int(entry["id"])), {"readings": []})
            image["readings"] = [r for r in image["readings"] if r["reader"] != source.stem] + [reading]
    stored["images"] = dict(sorted(stored["images"].items(), key=lambda item: int(item[0])))
    path.write_text(json.dumps(stored, indent=1) + "\n")
    print(f"{len(stored['images'])} images labelled in {path}")
    return 0


def load_set(folder: Path = SET_FOLDER) -> tuple[list[dict[str, Any]], dict[int, dict[str, str]], torch.Tensor]:
    """The recipes, the consensus label of every labelled image, and the images (N, 3, 64, 64) in recipe order."""
    import numpy as np
    from PIL import Image

    recipes = json.loads((folder / "recipes.json").read_text())["images"]
    labelled = json.loads((folder / "labels.json").read_text())["images"]
    labels = {int(image_id): consensus(entry["readings"]) for image_id, entry in labelled.items()}
    images = torch.stack(
        [
            torch.from_numpy(np.asarray(Image.open(folder / "images" / f"{r['id']:04d}.png").convert("RGB")).copy())
            for r in recipes
        ]
    )
    return recipes, labels, images.permute(0, 3, 1, 2).float() / 255


FOLDS = 5
"""The labelled images are cut in this many folds for cross-fitting (see :func:`cross_fit`)."""


def label_targets(labels: list[dict[str, str]]) -> torch.Tensor:
    """Class indices (N, 6) of consensus labels, −1 where the eye is unsure or saw none of the named values."""
    from composer.toyworld.world import ATTRIBUTES, VOCABULARY

    return torch.tensor(
        [[VOCABULARY[a].index(label[a]) if label[a] in VOCABULARY[a] else -1 for a in ATTRIBUTES] for label in labels]
    )


@dataclass(frozen=True)
class Recipe:
    """How the judge is fitted to the labelled sets: the heads' fine-tune (:func:`head_data`, :func:`train_heads`;
    the renders' loss weighed ``render_weight`` times the labelled views'), then, where ``blocks`` > 0 and
    ``trunk_steps`` > 0, the trunk's last ``blocks`` blocks tuned with the heads (the heads in ``kept_for`` keep
    reading those blocks as the generator trained them), and the thresholds' costs
    (:func:`composer.toyworld.calibration.fit`). Deterministic for a given seed."""

    copies: int = 4
    renders: int = 1024
    steps: int = 400
    lr: float = 3e-3
    blocks: int = 1
    trunk_steps: int = 0
    trunk_lr: float = 1e-3
    trunk_batch: int = 64
    kept_for: tuple[str, ...] = ()
    render_weight: float = 1.0
    penalty: float = 1.0
    plain_penalty: float = 1.0
    abstain: float = 0.5
    seed: int = SPLIT_SEED


def folds_of(recipes: list[dict[str, Any]], folds: int = FOLDS, seed: int = SPLIT_SEED) -> list[int]:
    """Each image's fold. The images of one batch (one adapter set, method and seed) stay together; the base
    model's batch, independent captions drawn together, is dealt image by image. Per kind, the groups are shuffled
    (seeded) and dealt round the folds, so every fold holds every kind."""
    rng = random.Random(seed)
    fold_of_group: dict[tuple[str, int], int] = {}
    dealt = 0
    for kind in sorted({r["kind"] for r in recipes}):
        keys = sorted({_group(r) for r in recipes if r["kind"] == kind})
        rng.shuffle(keys)
        for key in keys:
            fold_of_group[key] = dealt % folds
            dealt += 1
    return [fold_of_group[_group(r)] for r in recipes]


def _group(recipe: dict[str, Any]) -> tuple[str, int]:
    return ("image", recipe["id"]) if recipe["kind"] == "base" else ("batch", recipe["batch"])


@dataclass
class CrossFit:
    """The outcome of :func:`cross_fit`: the network and calibration to ship, and each image's cross-fitted
    reading (by a network and thresholds fitted without its fold)."""

    network: Any
    calibration: Any
    readings: list[dict[str, str]]


def cross_fit(images: torch.Tensor, labels: list[dict[str, str]], folds: list[int], recipe: Recipe) -> CrossFit:
    """Fit the judge on every image, and read each fold as a judge fitted without it would.

    The shipped judge: heads fine-tuned on every image; thresholds fitted on out-of-fold evidence (each fold read
    by heads fine-tuned on the other folds), since thresholds fitted on images the heads were tuned on would trust
    them too much. The cross-fitted reading of fold ``f`` repeats that whole procedure without ``f``: heads
    fine-tuned on the other folds read it, with thresholds fitted on those folds' evidence, each read by heads
    fine-tuned without ``f`` and without itself. Every fit sees only its own folds."""
    from composer.toyworld.calibration import fit
    from composer.toyworld.judge import GENERATOR_JUDGE_FILE, Judge, head_data, train_heads
    from composer.toyworld.model import WEIGHTS_DIR
    from composer.toyworld.reader import gather_evidence, head_probabilities, read_all

    base = Judge.load(WEIGHTS_DIR.parent / GENERATOR_JUDGE_FILE)
    blocks = recipe.blocks if recipe.trunk_steps else 0
    data = head_data(base, images, label_targets(labels), recipe.copies, recipe.renders, recipe.seed, blocks)
    measured = gather_evidence(base, images)
    with torch.no_grad():
        maps, mirrored_maps = base.entering(images, blocks), base.entering(images.flip(3), blocks)
    networks: dict[frozenset[int], Any] = {}
    pooled: dict[frozenset[int], tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]] = {}
    every = frozenset(folds)

    def network(without: frozenset[int]) -> Any:
        if without not in networks:
            kept = [i for i, f in enumerate(folds) if f not in without]
            tuned = train_heads(
                base,
                data.subset(kept),
                steps=recipe.steps,
                lr=recipe.lr,
                trunk_steps=recipe.trunk_steps,
                trunk_lr=recipe.trunk_lr,
                trunk_batch=recipe.trunk_batch,
                seed=recipe.seed,
                render_weight=recipe.render_weight,
                kept_for=recipe.kept_for,
            )
            with torch.no_grad():
                pooled[without] = (
                    tuned.head_features_from_maps(maps, blocks),
                    tuned.head_features_from_maps(mirrored_maps, blocks),
                )
            networks[without] = tuned
        return networks[without]

    def evidence(without: frozenset[int], members: list[int]) -> Any:
        heads = network(without)
        plain, mirrored = pooled[without]
        chosen = {attr: plain[attr][members] for attr in plain}, {attr: mirrored[attr][members] for attr in mirrored}
        probabilities = head_probabilities(heads, *chosen)
        return replace(measured.take(members), probabilities=probabilities)

    def calibration(within: frozenset[int]) -> Any:
        members = [i for i, f in enumerate(folds) if f in within]
        rows: list[dict[str, Any]] = [{}] * len(images)
        for fold in sorted(within):
            held = [i for i, f in enumerate(folds) if f == fold]
            read = evidence((every - within) | {fold}, held)
            for j, i in enumerate(held):
                rows[i] = read.row(j)
        return fit(
            [rows[i] for i in members],
            [labels[i] for i in members],
            penalty=recipe.penalty,
            plain_penalty=recipe.plain_penalty,
            abstain=recipe.abstain,
        )

    readings: list[dict[str, str]] = [{}] * len(images)
    for fold in sorted(every):
        held = [i for i, f in enumerate(folds) if f == fold]
        seen = read_all(evidence(frozenset({fold}), held), calibration(every - {fold}))
        for i, reading in zip(held, seen):
            readings[i] = reading
    return CrossFit(network(frozenset()), calibration(every), readings)


def calibrate(folders: list[Path], weights: Path, recipe: Recipe = Recipe()) -> int:
    """Fine-tune the network and fit the reader's thresholds on every labelled image of the sets in ``folders``
    (:func:`cross_fit`); write both into the folder ``weights`` (the judge's safetensors and its calibration JSON)
    and print the cross-fitted agreement."""
    from composer.toyworld.judge import JUDGE_FILE
    from composer.toyworld.reader import CALIBRATION_FILE

    recipes, labels, images = labelled_sets(folders)
    result = cross_fit(images, [labels[r["id"]] for r in recipes], folds_of(recipes), recipe)
    result.network.save(weights / JUDGE_FILE)
    result.calibration.save(weights / CALIBRATION_FILE)
    print("\n".join(agreement_markdown(agreement(recipes, labels, result.readings), TUNING)))
    print(f"fine-tuned and fitted on {len(recipes)} labelled images: {weights}")
    return 0


def _share(hits: int, total: int) -> str:
    return f"{hits / total:.1%} ({hits}/{total})" if total else "–"


def agreement(recipes: list[dict[str, Any]], labels: dict[int, dict[str, str]], seen: list[dict[str, str]]) -> dict:
    """Judge against eye on the given images: per attribute (eye's unsure left out; the judge's unsure counts as
    not agreeing), per concept composed (presence precision and recall), per image kind, colour and style
    confusions, and unasked styles or objects the judge reports where the eye does not see them."""
    from composer.toyworld.reader import UNSURE
    from composer.toyworld.verdict import expected_attributes
    from composer.toyworld.world import ATTRIBUTES, CONCEPTS

    result: dict[str, Any] = {"images": len(recipes), "attributes": {}, "concepts": {}, "kinds": {}}
    for attr in ATTRIBUTES:
        pairs = [(labels[r["id"]][attr], s[attr]) for r, s in zip(recipes, seen) if labels[r["id"]][attr] != UNSURE]
        answered = [(e, j) for e, j in pairs if j != UNSURE]
        result["attributes"][attr] = {
            "agree": sum(e == j for e, j in pairs),
            "labelled": len(pairs),
            "answered": len(answered),
            "right_when_answered": sum(e == j for e, j in answered),
        }
    presence: dict[str, list[tuple[bool, bool]]] = {}
    by_kind: dict[str, list[tuple[bool, bool]]] = {}
    for recipe, s in zip(recipes, seen):
        eye = labels[recipe["id"]]
        for name in recipe["adapters"]:
            sets = CONCEPTS[name].sets
            if any(eye[a] == UNSURE for a in sets):
                continue
            pair = (all(eye[a] == v for a, v in sets.items()), all(s[a] == v for a, v in sets.items()))
            presence.setdefault(name, []).append(pair)
            by_kind.setdefault(recipe["kind"], []).append(pair)

    def counts(pairs: list[tuple[bool, bool]]) -> dict[str, int]:
        return {
            "true_present": sum(e and j for e, j in pairs),
            "judge_present": sum(j for _, j in pairs),
            "eye_present": sum(e for e, _ in pairs),
        }

    result["concepts"] = {name: counts(pairs) for name, pairs in sorted(presence.items())}
    result["concepts_all"] = counts([pair for pairs in presence.values() for pair in pairs])
    for kind in sorted({r["kind"] for r in recipes}):
        members = [(r, s) for r, s in zip(recipes, seen) if r["kind"] == kind]
        definite = [(labels[r["id"]][a], s[a]) for r, s in members for a in ATTRIBUTES if labels[r["id"]][a] != UNSURE]
        result["kinds"][kind] = {
            "images": len(members),
            "attribute_agree": sum(e == j for e, j in definite),
            "attribute_labelled": len(definite),
            **counts(by_kind.get(kind, [])),
        }
    for attr in ("colour", "style"):
        table: dict[str, dict[str, int]] = {}
        for recipe, s in zip(recipes, seen):
            row = table.setdefault(labels[recipe["id"]][attr], {})
            row[s[attr]] = row.get(s[attr], 0) + 1
        result[f"{attr}_confusion"] = table
    unasked = doubted = 0
    for recipe, s in zip(recipes, seen):
        expected, _ = expected_attributes(recipe["prompt"], recipe["adapters"])
        eye = labels[recipe["id"]]
        reported = [a for a in ("style", "object") if s[a] not in ("none", UNSURE) and expected.get(a) != s[a]]
        unasked += any(eye[a] not in (s[a], UNSURE) for a in reported)
        doubted += any(eye[a] == UNSURE for a in reported)
    result["unasked_reported"] = unasked
    result["unasked_where_eye_unsure"] = doubted
    return result


def agreement_markdown(result: dict[str, Any], part: str) -> list[str]:
    """The agreement tables of one part of the set as Markdown lines."""
    from composer.toyworld.world import VOCABULARY

    lines = [f"### {part.replace('_', '-')} images ({result['images']})", ""]
    lines += ["| attribute | judge = eye | judge answered | right when answered |", "|---|---|---|---|"]
    for attr, row in result["attributes"].items():
        lines.append(
            f"| {attr} | {_share(row['agree'], row['labelled'])} | {_share(row['answered'], row['labelled'])} "
            f"| {_share(row['right_when_answered'], row['answered'])} |"
        )
    lines += ["", "| concept | precision (judge present → eye present) | recall (eye present → judge present) |"]
    lines += ["|---|---|---|"]
    for name, row in [*result["concepts"].items(), ("all", result["concepts_all"])]:
        lines.append(
            f"| {name} | {_share(row['true_present'], row['judge_present'])} "
            f"| {_share(row['true_present'], row['eye_present'])} |"
        )
    lines += ["", "| kind | images | attributes judge = eye | concept precision | concept recall |"]
    lines += ["|---|---|---|---|---|"]
    for kind, row in result["kinds"].items():
        precision = _share(row["true_present"], row["judge_present"])
        recall = _share(row["true_present"], row["eye_present"])
        attributes = _share(row["attribute_agree"], row["attribute_labelled"])
        lines.append(f"| {kind} | {row['images']} | {attributes} | {precision} | {recall} |")
    lines += ["", "Unasked style or object reported where the eye sees none or another: "]
    lines[-1] += _share(result["unasked_reported"], result["images"]) + " of images; where the eye is unsure: "
    lines[-1] += _share(result["unasked_where_eye_unsure"], result["images"]) + "."
    for attr in ("colour", "style"):
        columns = [*VOCABULARY[attr], "other", "unsure"]
        table = result[f"{attr}_confusion"]
        lines += ["", f"{attr.capitalize()} confusion (rows: eye, columns: judge):", ""]
        lines += ["| eye \\ judge | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
        for eye in columns:
            if eye in table:
                lines.append(f"| {eye} | " + " | ".join(str(table[eye].get(c, "")) for c in columns) + " |")
    return [*lines, ""]


def _labelled(folder: Path) -> tuple[list[dict[str, Any]], dict[int, dict[str, str]], torch.Tensor]:
    """:func:`load_set` restricted to the images that have labels."""
    recipes, labels, images = load_set(folder)
    keep = [i for i, r in enumerate(recipes) if r["id"] in labels]
    return [recipes[i] for i in keep], labels, images[keep]


def labelled_sets(folders: list[Path]) -> tuple[list[dict[str, Any]], dict[int, dict[str, str]], torch.Tensor]:
    """The labelled images of several sets as one: each set's image ids and batch numbers are numbered on after
    the previous set's, so ids stay unique and a batch of one set never joins a batch of another in a fold."""
    recipes: list[dict[str, Any]] = []
    labels: dict[int, dict[str, str]] = {}
    images: list[torch.Tensor] = []
    first_id = first_batch = 0
    for folder in folders:
        chosen, read, pixels = _labelled(folder)
        if not chosen:
            raise SystemExit(f"{folder} has no labelled image: collect its readings into labels.json first")
        for recipe in chosen:
            labels[first_id + recipe["id"]] = read[recipe["id"]]
            recipes.append(recipe | {"id": first_id + recipe["id"], "batch": first_batch + recipe["batch"]})
        images.append(pixels)
        first_id += 1 + max(r["id"] for r in chosen)
        first_batch += 1 + max(r["batch"] for r in chosen)
    return recipes, labels, torch.cat(images)


def evaluate(
    folders: list[Path],
    fresh: Path,
    docs: Path | None,
    recipe: Recipe = Recipe(),
    checks: tuple[Path, ...] = CHECK_FOLDERS,
    weights: Path | None = None,
) -> int:
    """Print (and write to ``docs``) the judge's agreement with the eye: on the labelled sets in ``folders`` as
    cross-fitted by ``recipe`` (each fold read by a judge fitted without it, :func:`cross_fit`), on the set in
    ``fresh``, which no choice about the judge looked at, once its labels exist, and on each labelled set in
    ``checks`` (kept out of the fit), both read by the judge in ``weights`` (default: the shipped one)."""
    from composer.toyworld.reader import Reader
    from composer.toyworld.verdict import shipped_judge

    results, lines = {}, []
    judge = Reader.load(weights) if weights is not None else shipped_judge()
    if (fresh / "labels.json").is_file():
        recipes, labels, images = _labelled(fresh)
        results[HELD_OUT] = agreement(recipes, labels, judge.read(images))
        lines += agreement_markdown(results[HELD_OUT], HELD_OUT)
    else:
        print(f"{fresh / 'labels.json'} does not exist yet: no held-out agreement to report")
    for folder in checks:
        if not (folder / "labels.json").is_file():
            print(f"{folder / 'labels.json'} does not exist: no check to report there")
            continue
        recipes, labels, images = _labelled(folder)
        part = f"check, {folder.name.removeprefix('judge_labels_')} set (kept out of the fit)"
        results[part] = agreement(recipes, labels, judge.read(images))
        lines += agreement_markdown(results[part], part)
    recipes, labels, images = labelled_sets(folders)
    crossed = cross_fit(images, [labels[r["id"]] for r in recipes], folds_of(recipes), recipe)
    results[TUNING] = agreement(recipes, labels, crossed.readings)
    lines += agreement_markdown(results[TUNING], TUNING)
    print("\n".join(lines))
    if docs is not None:
        (docs / "judge_agreement.json").write_text(json.dumps(results, indent=1) + "\n")
        (docs / "judge_agreement.md").write_text("\n".join(lines))
    return 0


def merge_shards(folder: Path, first_seed: int = FIRST_SEED, held_out_share: float = HELD_OUT_SHARE) -> int:
    """Join every shard's recipes into ``recipes.json`` with the split marked."""
    recipes = [r for path in sorted(folder.glob("recipes-*.json")) for r in json.loads(path.read_text())]
    recipes.sort(key=lambda r: r["id"])
    split(recipes, held_out_share)
    meta = {"steps": STEPS, "guidance": GUIDANCE, "held_out_share": held_out_share, "split_seed": SPLIT_SEED}
    meta["first_seed"] = first_seed
    (folder / "recipes.json").write_text(json.dumps({"drawing": meta, "images": recipes}, indent=1))
    for path in folder.glob("recipes-*.json"):
        path.unlink()
    print(f"{len(recipes)} images, {sum(r['part'] == 'held_out' for r in recipes)} held out")
    return 0


def _recipe(args: argparse.Namespace) -> Recipe:
    """The shipped recipe with the command line's block tuning, kept heads and cost of a wrong strict reading."""
    return replace(Recipe(), trunk_steps=args.trunk_steps, kept_for=tuple(args.kept_for), penalty=args.penalty)


def main(argv: list[str] | None = None) -> int:
    """Command line: ``draw`` (resumable, shardable) and ``merge``."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.judge_labels", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    d = sub.add_parser("draw", help="draw the set's images (skips batches already drawn)")
    d.add_argument("--folder", type=Path, default=SET_FOLDER)
    d.add_argument("--library", type=Path, default=Path(".cache/bench/judge_labels_library"))
    d.add_argument("--threads", type=int, default=1)
    d.add_argument("--shard", type=int, default=0)
    d.add_argument("--shards", type=int, default=1)
    d.add_argument("--first-seed", type=int, default=FIRST_SEED, help="start of the scene and generation seeds")
    m = sub.add_parser("merge", help="join the shards' recipes and mark the split")
    m.add_argument("--folder", type=Path, default=SET_FOLDER)
    m.add_argument("--first-seed", type=int, default=FIRST_SEED)
    m.add_argument("--held-out-share", type=float, default=HELD_OUT_SHARE)
    s = sub.add_parser("sheets", help="numbered 4x contact sheets for labelling (recipes hidden)")
    s.add_argument("--folder", type=Path, default=SET_FOLDER)
    s.add_argument("--out", type=Path, required=True)
    s.add_argument("--exclude", type=Path, nargs="*", default=[], help="order.json files of sheets already made")
    g = sub.add_parser("legend", help="the clean render of every attribute value, captioned")
    g.add_argument("--out", type=Path, default=Path("docs/images/judge_legend.png"))
    c = sub.add_parser("calibrate", help="fine-tune the network and fit the thresholds on the labelled sets")
    c.add_argument("--folder", type=Path, nargs="+", default=list(TUNING_FOLDERS), help="the labelled sets")
    c.add_argument("--weights", type=Path, default=None, help="folder to write into (default: the shipped weights)")
    e = sub.add_parser("evaluate", help="judge against eye: the labelled sets cross-fitted, the fresh set held out")
    e.add_argument("--folder", type=Path, nargs="+", default=list(TUNING_FOLDERS), help="the sets it was fitted on")
    e.add_argument("--fresh", type=Path, default=FRESH_FOLDER, help="the held-out set")
    e.add_argument("--check", type=Path, nargs="*", default=list(CHECK_FOLDERS), help="sets kept out of the fit")
    e.add_argument("--weights", type=Path, default=None, help="the judge to read them with (default: the shipped)")
    e.add_argument("--docs", type=Path, default=None, help="write judge_agreement.md/.json here")
    for fitting in (c, e):
        fitting.add_argument(
            "--trunk-steps", type=int, default=Recipe().trunk_steps, help="steps tuning the last block"
        )
        fitting.add_argument("--kept-for", nargs="*", default=[], help="heads kept on the generator's last block")
        fitting.add_argument(
            "--penalty",
            type=float,
            default=Recipe().penalty,
            help="what a wrong reading that says something is there costs in the thresholds' fit, in right readings",
        )
    r = sub.add_parser("collect", help="add readings (JSONL files, one per reader) to labels.json")
    r.add_argument("readings", type=Path, nargs="+")
    r.add_argument("--folder", type=Path, default=SET_FOLDER)
    args = parser.parse_args(argv)
    if args.command == "collect":
        return collect(args.readings, args.folder)
    if args.command == "calibrate":
        from composer.toyworld.model import WEIGHTS_DIR

        return calibrate(args.folder, args.weights or WEIGHTS_DIR.parent, _recipe(args))
    if args.command == "evaluate":
        return evaluate(args.folder, args.fresh, args.docs, _recipe(args), tuple(args.check), args.weights)
    if args.command == "draw":
        return draw(args.folder, args.library, args.threads, args.shard, args.shards, args.first_seed)
    if args.command == "sheets":
        return sheets(args.folder, args.out, args.exclude)
    if args.command == "legend":
        return legend(args.out)
    return merge_shards(args.folder, args.first_seed, args.held_out_share)


if __name__ == "__main__":
    sys.exit(main())
