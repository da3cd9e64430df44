"""The toy world: the generator, the shipped toy-sd model and judge, concept adapters, the library and the demo path."""

from __future__ import annotations

import itertools
import json
import math
import random
from pathlib import Path

import pytest
import torch

from composer.toyworld.data import WorldRandom
from composer.toyworld.judge import judge_accuracy, sample_any_scene
from composer.toyworld.verdict import expected_attributes, judge_file, judge_images, shipped_judge
from composer.toyworld.world import (
    ATTRIBUTES,
    CONCEPTS,
    HELD_OUT,
    VOCABULARY,
    caption,
    render,
    sample_layout,
    sample_scene,
)


@pytest.fixture
def toy_pipe(toy_sd):
    from composer import make_composable

    return make_composable(toy_sd)


@pytest.fixture
def toy_library(toy_library_files: list[Path]) -> list[Path]:
    return toy_library_files


def test_render_is_deterministic_and_in_range() -> None:
    rng = random.Random(3)
    scenes = [sample_scene(rng) for _ in range(4)]
    first = render(scenes, sample_layout(4, torch.Generator().manual_seed(1)))
    second = render(scenes, sample_layout(4, torch.Generator().manual_seed(1)))
    assert first.shape == (4, 3, 64, 64)
    assert torch.equal(first, second)
    assert float(first.min()) >= 0.0
    assert float(first.max()) <= 1.0


def test_held_out_concepts_cover_every_category_and_never_appear_in_base_scenes() -> None:
    categories = [c.category for c in HELD_OUT]
    assert categories.count("character") >= 3
    for category in ("clothing", "style", "background", "object"):
        assert categories.count(category) >= 2
    rng = random.Random(0)
    held = {(attr, value) for concept in HELD_OUT for attr, value in concept.sets.items()}
    for _ in range(500):
        scene = sample_scene(rng)
        assert not any((attr, getattr(scene, attr)) in held for attr in ATTRIBUTES)
        assert not any(concept.trigger in caption(scene, rng) for concept in HELD_OUT)


def test_judge_reads_generator_images_of_the_whole_vocabulary() -> None:
    accuracy = judge_accuracy(shipped_judge().network, count=120, seed=2024)
    for attr in ATTRIBUTES:
        assert accuracy[attr] >= 0.95, (attr, accuracy)


def test_the_calibrated_judge_is_rarely_wrong_on_generator_images_only_unsure() -> None:
    """The generator's clean renders are not what the judge is fitted to (model outputs read by eye, where no reader
    saw pixel art and outlines often vanish): it may read a few faint pixel-art or outlined renders as plain."""
    from composer.toyworld.reader import UNSURE

    rng = WorldRandom(2025)
    scenes = [sample_any_scene(rng.content) for _ in range(120)]
    readings = shipped_judge().read(render(scenes, sample_layout(120, rng.layout)))
    answers = [(r[a], getattr(s, a)) for r, s in zip(readings, scenes) for a in ATTRIBUTES if r[a] != UNSURE]
    assert len(answers) >= 0.9 * len(scenes) * len(ATTRIBUTES)
    assert sum(seen == truth for seen, truth in answers) >= 0.985 * len(answers)


def test_expected_attributes_from_prompt_and_concepts() -> None:
    expected, concepts = expected_attributes("zorbex wearing a hat under a blue sky, striped", ["zorbex", "other"])
    assert expected == {"shape": "star", "colour": "purple", "clothing": "hat", "background": "sky", "style": "striped"}
    assert concepts == {"zorbex": {"shape": "star", "colour": "purple"}}


def test_toy_preset_loads_offline_and_generates_deterministically(toy_pipe) -> None:
    from composer.presets import preset_family

    assert preset_family(toy_pipe) == "sd1"
    call = {"num_inference_steps": 3, "guidance_scale": 3.0, "output_type": "pt"}
    with torch.inference_mode():
        a = toy_pipe("a red circle in the snow", generator=torch.Generator().manual_seed(4), **call).images
        b = toy_pipe("a red circle in the snow", generator=torch.Generator().manual_seed(4), **call).images
    assert a.shape == (1, 3, 64, 64)
    assert torch.equal(a, b)


def test_base_model_draws_what_the_caption_says(toy_pipe) -> None:
    prompts = ["a red circle in the snow", "a blue square at night", "a yellow triangle on the grass"]
    with torch.inference_mode():
        images = toy_pipe(
            prompts,
            num_inference_steps=8,
            guidance_scale=3.0,
            output_type="pt",
            generator=torch.Generator().manual_seed(0),
        ).images
    verdicts = judge_images(images, prompts, [[]] * 3)
    assert sum(v.all_found for v in verdicts) >= 2, [v.as_dict() for v in verdicts]


def test_library_has_every_format_and_reads(toy_library: list[Path]) -> None:
    from weights_index import read_adapter

    assert {path.stem for path in toy_library} >= {"zorbex", "kiboko"}
    for path in toy_library:
        adapter = read_adapter(path)
        assert adapter.layers, path


def test_a_rebuild_replaces_the_library_folder_whole(tmp_path: Path) -> None:
    from composer.toyworld.library import build_toy_library

    out = tmp_path / "library"
    (out / "stale").mkdir(parents=True)
    (out / "stale" / "old.safetensors").write_bytes(b"not an adapter")
    files = build_toy_library(out)
    assert not (out / "stale").exists(), "the old folder is swapped out, not merged into"
    assert not out.with_name("library.building").exists()
    assert sorted(out.rglob("*.safetensors")) == sorted(files)


@pytest.mark.slow
def test_a_concept_lora_changes_the_attribute_it_was_trained_for(toy_pipe, toy_library: list[Path]) -> None:
    path = next(p for p in toy_library if p.stem == "zorbex")
    prompts = ["zorbex in the snow", "zorbex on the grass", "zorbex at night", "zorbex under a blue sky"]
    call = {"num_inference_steps": 6, "guidance_scale": 3.0, "output_type": "pt"}
    with torch.inference_mode():
        base = toy_pipe(prompts, generator=torch.Generator().manual_seed(0), **call).images
    with torch.no_grad():
        toy_pipe.add_adapter_file(path, name="zorbex")
    toy_pipe.set_composition({"zorbex": 1.0}, method="merge")
    try:
        with torch.inference_mode():
            adapted = toy_pipe(prompts, generator=torch.Generator().manual_seed(0), **call).images
    finally:
        toy_pipe.clear_composition()
    before = judge_images(base, prompts, [["zorbex"]] * 4)
    after = judge_images(adapted, prompts, [["zorbex"]] * 4)
    assert sum(v.concepts["zorbex"] for v in before) == 0
    found = sum(v.concepts["zorbex"] for v in after)
    assert found >= 3, found


def test_compose_then_judge_from_the_cli(toy_library: list[Path], tmp_path: Path, capsys) -> None:
    from composer.cli import main

    library = toy_library[0].parents[1]
    assert main(["index", str(library)]) == 0
    out = tmp_path / "out"
    argv = ["zorbex in the snow", "--loras", "auto", "--library", str(library), "--model", "toy-sd"]
    code = main([*argv, "--steps", "8", "--out", str(out)])
    assert code == 0
    verdict = judge_file(out / "0-0.png")
    assert verdict.concepts == {"zorbex": True}
    assert main(["judge", str(out / "0-0.png")]) == 0
    assert "concept zorbex: found" in capsys.readouterr().out


def test_judge_refuses_an_image_without_a_sidecar(tmp_path: Path) -> None:
    from PIL import Image

    from fusion.errors import ComposerError

    path = tmp_path / "lonely.png"
    Image.new("RGB", (64, 64)).save(path)
    with pytest.raises(ComposerError, match="no JSON sidecar"):
        judge_file(path)


def test_vocabulary_names_are_unique() -> None:
    for attr in ATTRIBUTES:
        assert len(set(VOCABULARY[attr])) == len(VOCABULARY[attr])
    assert set(CONCEPTS) == {c.name for c in HELD_OUT}


@pytest.mark.slow
def test_quality_benchmark_quick_mode(tmp_path: Path, capsys, toy_quality_pipeline) -> None:
    """Quick mode: one k=2 set, one seed, every method; presence counts the set's two concepts in that one image."""
    import json

    from benchmarks.composition_quality import main
    from composer.toyworld.library import LIBRARY_GATES

    assert main(["--quick", "--steps", "1", "--library", str(tmp_path / "library")]) == 0
    result = json.loads(capsys.readouterr().out)
    assert set(result["compositions"]) == {"k=2"}
    row = result["compositions"]["k=2"]
    assert (row["sets"], row["images_per_method"]) == (1, 1)
    methods = ["merge", "switch", "composite", "cmlora", "klora", "ties"] + (
        ["gated"] if LIBRARY_GATES.is_file() else []
    )
    assert set(row) == {"sets", "sets_possible", "images_per_method", *methods}
    for method in methods:
        assert row[method]["element_presence"] in (0.0, 0.5, 1.0)
        assert row[method]["all_elements"] == float(row[method]["element_presence"] == 1.0)
        if method != "merge":
            assert sum(row[method]["vs_merge"].values()) == 1
    assert toy_quality_pipeline.composition is None, "every composition is cleared after its image"


def test_quality_benchmark_adds_conditional_and_mixed_branch_rows(tmp_path: Path, capsys, toy_quality_pipeline) -> None:
    """One quick run asks for the conditional and the mixed rows beside plain merge; mixed keeps backgrounds on both
    branches."""
    import json

    from benchmarks.composition_quality import branch_choice, main

    assert branch_choice("mixed", ("zorbex", "forest")) == {"zorbex": "conditional"}
    assert branch_choice("mixed", ("kiboko", "crown", "sunset")) == {"kiboko": "conditional", "crown": "conditional"}
    assert branch_choice("conditional", ("zorbex", "forest")) == "conditional"
    argv = ["--quick", "--steps", "2", "--methods", "merge", "--library", str(tmp_path / "lib")]
    assert main([*argv, "--branches", "both,conditional,mixed"]) == 0
    row = json.loads(capsys.readouterr().out)["compositions"]["k=2"]
    assert set(row) >= {"merge", "merge (cond)", "merge (mixed)"}
    assert "vs_merge" in row["merge (cond)"], "the conditional rows are scored against plain merge"
    with pytest.raises(SystemExit):
        main([*argv, "--branches", "negative"])
    with pytest.raises(SystemExit):
        main([*argv, "--branches", "both", "--alone-branches", "mixed,negative"])


def test_quality_benchmark_runs_fused_only_methods_on_both_branches_only(
    tmp_path: Path, capsys, toy_quality_pipeline
) -> None:
    """klora and ties write their result into the weights, which serve both CFG branches: a run that also asks for
    per-branch rows measures them on both branches and skips their per-branch rows (it used to stop with the
    engine's refusal, so `make quality` never finished)."""
    import json

    from benchmarks.composition_quality import main

    argv = ["--quick", "--steps", "1", "--methods", "merge,klora,ties", "--library", str(tmp_path / "lib")]
    assert main([*argv, "--branches", "both,conditional,mixed"]) == 0
    row = json.loads(capsys.readouterr().out)["compositions"]["k=2"]
    methods = {"merge", "merge (cond)", "merge (mixed)", "klora", "ties"}
    assert set(row) == {"sets", "sets_possible", "images_per_method", *methods}


def test_quality_benchmark_shared_rows_give_the_unconditional_half_one_share_and_the_calibrated_weights() -> None:
    from benchmarks.composition_quality import UNCONDITIONAL_SHARE, branch_choice, setting_weights, variant

    assert branch_choice("shared", ("zorbex", "forest")) == {"zorbex": UNCONDITIONAL_SHARE}
    assert branch_choice("shared", ("kiboko", "crown", "pixel_art", "polka_dots", "sunset")) == dict.fromkeys(
        ("kiboko", "crown", "pixel_art", "polka_dots"), UNCONDITIONAL_SHARE
    )
    calibrated = {"zorbex": 0.6, "forest": 0.3}
    assert setting_weights("shared", ("zorbex", "forest"), 0.8, calibrated) == calibrated
    assert setting_weights("both", ("zorbex", "forest"), 0.8, calibrated) == {"zorbex": 0.8, "forest": 0.8}
    assert variant("merge", "shared") == "merge (shared)"


def _stand_in_calibration(monkeypatch: pytest.MonkeyPatch) -> None:
    """Calibrated weights for the benchmark's plumbing tests without measuring them (tests/composer/test_calibration.py
    measures them)."""
    import benchmarks.composition_quality as quality

    monkeypatch.setattr(quality, "calibrated_weights", lambda _pipe, _library, names: dict.fromkeys(names, 0.7))


def test_an_alone_only_run_judges_each_lora_alone_on_another_scene_seed(
    tmp_path: Path, capsys, toy_quality_pipeline, monkeypatch: pytest.MonkeyPatch
) -> None:
    import json

    from benchmarks.composition_quality import main

    _stand_in_calibration(monkeypatch)
    argv = ["--alone-only", "--alone-branches", "shared", "--alone-seed", "8", "--steps", "1", "--alone-images", "1"]
    argv += ["--library", str(tmp_path / "lib"), "--docs", str(tmp_path), "--name", "alone"]
    assert main([*argv, "--adapters", "forest,zorbex"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["alone_seed"] == 8
    assert result["compositions"] == {}
    assert result["adapters"] == ["zorbex", "forest"], "the library's order, only the adapters asked for"
    assert set(result["alone_shared"]) == {"zorbex", "forest"}
    assert json.loads((tmp_path / "alone.json").read_text()) == result
    text = (tmp_path / "alone.md").read_text()
    assert "## Each LoRA alone (1 scenes each, scene seed 8)" in text
    assert "## Compositions" not in text


def test_adapters_the_library_does_not_hold_are_a_usage_error(tmp_path: Path, capsys) -> None:
    from benchmarks.composition_quality import main

    with pytest.raises(SystemExit) as exit_info:
        main(["--quick", "--adapters", "zorbex,no_such", "--library", str(tmp_path / "lib")])
    assert exit_info.value.code == 2
    assert not (tmp_path / "lib").exists(), "refused before the library is built"
    assert "--adapters names adapters the library does not hold: no_such" in capsys.readouterr().err


@pytest.mark.slow
def test_an_extra_only_run_measures_only_the_extra_settings(
    tmp_path: Path, capsys, toy_quality_pipeline, monkeypatch: pytest.MonkeyPatch
) -> None:
    import json

    from benchmarks.composition_quality import main

    _stand_in_calibration(monkeypatch)
    argv = ["--extra-only", "--branches", "shared", "--methods", "merge", "--sets", "1", "--seeds", "1"]
    argv += ["--steps", "1", "--alone-images", "1", "--library", str(tmp_path / "lib"), "--docs", str(tmp_path)]
    argv += ["--adapters", "zorbex,crown,pixel_art,sunset,flower"]  # one per category: one set at every k
    assert main([*argv, "--name", "quality_shared"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert not {"base", "alone", "alone_preferred"} & set(result)
    assert set(result["alone_shared"]) == set(result["adapters"])
    for k in (2, 3, 4, 5):  # the character with k - 1 of the four other categories, one adapter each
        assert result["compositions"][f"k={k}"]["sets_possible"] == math.comb(4, k - 1), k
    assert set(result["compositions"]["k=2"]) >= {"merge (shared)"}
    text = (tmp_path / "quality_shared.md").read_text()
    assert "Base model alone" not in text
    assert (
        "| adapter | concept present at calibrated weight (shared) | others kept at calibrated weight (shared) |"
        in text
    )
    assert result["calibrated_weights"] == dict.fromkeys(result["adapters"], 0.7)
    assert "Rows and columns marked (shared)" in text


def test_quality_benchmark_composes_every_set_where_asked() -> None:
    import random

    from benchmarks.composition_quality import chosen_sets, composition_sets

    every = composition_sets(list(CONCEPTS), 2)
    assert len(every) == 3 * (2 + 2 + 2 + 2)
    assert chosen_sets(every, None, random.Random(0)) == every
    assert chosen_sets(every, 99, random.Random(0)) == every
    drawn = chosen_sets(every, 5, random.Random(0))
    assert len(set(drawn)) == 5
    assert set(drawn) <= set(every)


def test_gate_data_draws_captioned_compositions_around_a_character(tmp_path: Path) -> None:
    from PIL import Image

    from composer.toyworld.gate_data import write_composition_images
    from fusion.errors import TrainingError

    names = ["zorbex", "kiboko", "crown", "sunset"]
    paths = write_composition_images(tmp_path / "data", 6, names, seed=3)
    assert [p.name for p in paths] == [f"{i:05d}.png" for i in range(6)]
    for path in paths:
        with Image.open(path) as image:
            assert image.size == (64, 64)
        text = path.with_suffix(".txt").read_text()
        assert ("zorbex" in text) != ("kiboko" in text), text
        assert "krwn" in text or "snst" in text, text
    with pytest.raises(TrainingError, match="character"):
        write_composition_images(tmp_path / "none", 1, ["crown", "sunset"])
    with pytest.raises(TrainingError, match="unknown"):
        write_composition_images(tmp_path / "none", 1, ["zorbex", "tophat"])


def test_quality_docs_of_a_compositions_only_run_have_no_alone_table(tmp_path: Path) -> None:
    import torch

    from benchmarks.composition_quality import write_docs

    cell = {"element_presence": 0.5, "all_elements": 0.25, "seconds_per_image": 1.0}
    result = {
        "steps": 20,
        "weight": 0.8,
        "hardware": "CPU, 2 torch threads",
        "seconds": 1.0,
        "adapters": ["zorbex", "forest"],
        "compositions": {"k=2": {"sets": 1, "sets_possible": 1, "images_per_method": 1, "merge (mixed)": cell}},
    }
    write_docs(result, {"k=2: a prompt": {"merge (mixed)": torch.zeros(3, 8, 8)}}, tmp_path, "quality_mixed")
    text = (tmp_path / "quality_mixed.md").read_text()
    assert "Each LoRA alone" not in text
    assert "Rows marked (mixed)" in text
    assert "| 2 | 1 (1) × 1 | merge (mixed) | 50% | 25% | — | 1.0 |" in text
    assert (tmp_path / "images" / "quality_mixed.png").is_file()


def test_the_training_command_reads_captions_with_the_clip_tokenizer_the_preset_uses(tmp_path: Path) -> None:
    """The shipped model folder carries no tokenizer; concept and judge stages must still tokenise as inference does."""
    from composer.smoke_presets.tokenizers import build_clip_tokenizer
    from composer.toyworld.model import MAX_TOKENS, WEIGHTS_DIR
    from composer.toyworld.train import base_pipeline

    (tmp_path / "toy-sd").symlink_to(WEIGHTS_DIR, target_is_directory=True)
    pipe = base_pipeline(tmp_path)
    caption = "zorbex wearing a krwn crown at a snst sunset, pxlart pixel art"
    expected = build_clip_tokenizer(model_max_length=MAX_TOKENS)(caption).input_ids
    assert pipe.tokenizer(caption).input_ids == expected
    assert expected[0] == 49406  # CLIP's start id, not a fallback vocabulary's
    assert expected[-1] == 49407


def test_each_lora_alone_under_the_mixed_rule_keeps_backgrounds_on_both_branches(monkeypatch) -> None:
    import benchmarks.composition_quality as quality

    class Recorder:
        def __init__(self) -> None:
            self.calls: list = []

        def set_composition(self, weights, method, branches):
            self.calls.append((next(iter(weights)), branches))

        def clear_composition(self):
            pass

    monkeypatch.setattr(
        quality, "sample_images", lambda pipe, prompts, seed, steps: torch.zeros(len(prompts), 3, 64, 64)
    )
    pipe = Recorder()
    rows = quality.run_alone(pipe, ["zorbex", "forest"], 2, 1, branches="mixed")
    assert pipe.calls == [("zorbex", {"zorbex": "conditional"}), ("forest", {})]
    assert set(rows) == {"zorbex", "forest"}


def test_judge_ceiling_reads_every_library_concepts_alone_scenes(tmp_path: Path, capsys) -> None:
    import json

    from benchmarks.judge_ceiling import main, write_docs
    from composer.toyworld.library import available_concepts

    assert main(["--quick"]) == 0
    result = json.loads(capsys.readouterr().out)
    rows = result["sets"]["7:4"]
    assert list(rows) == available_concepts()
    assert rows["kiboko"]["concept_present"] == 1.0, "the judge reads a rendered kiboko after the autoencoder"
    result |= {"layouts": 4, "seconds": 1.0}
    write_docs(result, tmp_path)
    text = (tmp_path / "judge_ceiling.md").read_text()
    assert "## Scene seed 7, 4 scenes per adapter" in text
    assert "| kiboko | 100% |" in text


def test_lora_alone_scenes_are_the_published_tables_scenes() -> None:
    """The LoRA-alone tables and the judge's ceiling on them draw the same scenes: per adapter, a fresh
    ``random.Random(seed)`` draws every scene, then every caption (as the published tables were made)."""
    from benchmarks.composition_quality import alone_scenes

    rng = random.Random(4242)
    concept = CONCEPTS["pixel_art"]
    scenes = [sample_scene(rng).with_concepts(concept) for _ in range(5)]
    prompts = [caption(scene, rng, (concept,)) for scene in scenes]
    assert alone_scenes("pixel_art", 5, 4242) == (scenes, prompts)


def test_quality_docs_show_a_column_pair_per_branch_setting_of_the_alone_rows(tmp_path: Path) -> None:
    from benchmarks.composition_quality import write_docs

    row = {"concept_present": 0.9, "others_kept": 0.8}
    result = {
        "steps": 20,
        "weight": 0.8,
        "hardware": "CPU, 1 torch thread",
        "seconds": 1.0,
        "adapters": ["zorbex"],
        "base": {"all_attributes": 1.0, "images": 1},
        "alone": {"zorbex": row},
        "preferred_weight": 1.0,
        "alone_preferred": {"zorbex": row},
        "alone_mixed": {"zorbex": {"concept_present": 1.0, "others_kept": 0.5}},
        "alone_images": 32,
        "compositions": {},
    }
    write_docs(result, {}, tmp_path)
    text = (tmp_path / "composition_quality.md").read_text()
    assert "## Each LoRA alone (32 scenes each)" in text
    assert "| concept present at 0.8 (mixed) | others kept at 0.8 (mixed) |" in text
    assert "| zorbex | 90% | 80% | 90% | 80% | 100% | 50% |" in text


def test_prior_preservation_batches_add_untriggered_base_scenes_after_the_concepts() -> None:
    """Regularisation scenes (kohya's reg images, DreamBooth's class images) carry no concept and no trigger."""
    from composer.toyworld.concepts import ConceptTraining, training_batch
    from composer.toyworld.data import WorldRandom

    concept = CONCEPTS["pixel_art"]
    setup = ConceptTraining("lokr", rank=4, batch=3, prior_batch=5)
    batch = training_batch(concept, setup, WorldRandom(0), "cpu")
    assert batch.images.shape == (8, 3, 64, 64)
    assert all(
        scene.style == "pixel" and concept.trigger in text for scene, text in zip(batch.scenes[:3], batch.captions)
    )
    prior = list(zip(batch.scenes[3:], batch.captions[3:]))
    assert all(scene.style != "pixel" and concept.trigger not in text for scene, text in prior)


def test_a_concept_trains_with_prior_preservation_and_records_it(tmp_path: Path) -> None:
    from safetensors import safe_open

    from composer.toyworld.model import WEIGHTS_DIR
    from composer.toyworld.train import main

    (tmp_path / "toy-sd").symlink_to(WEIGHTS_DIR, target_is_directory=True)
    args = ["--stages", "concepts", "--concepts", "pixel_art", "--concept-steps", "1", "--concept-batch", "2"]
    main([str(tmp_path), *args, "--concept-prior-batch", "2", "--concept-prior-weight", "0.5", "--device", "cpu"])
    with safe_open(str(tmp_path / "concepts" / "pixel_art.safetensors"), "pt") as handle:
        training = json.loads(handle.metadata()["training"])
    assert (training["prior_batch"], training["prior_weight"]) == (2, 0.5)


def test_prior_preservation_refuses_a_negative_batch_or_weight() -> None:
    from composer.toyworld.concepts import ConceptTraining, train_concept
    from fusion.errors import TrainingError

    for setup in (ConceptTraining(prior_batch=-1), ConceptTraining(prior_weight=-0.5)):
        with pytest.raises(TrainingError, match="prior"):
            train_concept(None, CONCEPTS["pixel_art"], setup, "cpu")


@pytest.mark.slow
def test_every_pair_of_objects_stays_apart_in_every_style_on_every_background() -> None:
    """Pixelation keeps colour, not detail: two objects that share their colours, or an object coloured like a
    background, would render as the same blocks (a pixel-art ball and a red mushroom on snow did)."""
    import dataclasses

    from composer.toyworld.world import BACKGROUNDS, OBJECTS, STYLES, Scene

    settings = list(itertools.product(STYLES, BACKGROUNDS))
    scenes = [Scene(bg, "circle", "blue", style=style, object=thing) for style, bg in settings for thing in OBJECTS]
    for seed in (3, 4, 5):
        one = sample_layout(1, torch.Generator().manual_seed(seed))  # every scene at the same place
        layout = dataclasses.replace(
            one, **{f.name: getattr(one, f.name).repeat(len(scenes)) for f in dataclasses.fields(one)}
        )
        renders = render(scenes, layout).view(len(settings), len(OBJECTS), 3, 64, 64)
        for (style, background), drawn in zip(settings, renders):
            for (i, first), (j, second) in itertools.combinations(enumerate(OBJECTS), 2):
                apart = (drawn[i] - drawn[j]).abs().amax(0) > 0.3
                assert int(apart.sum()) >= 24, f"{first} and {second}, {style} on {background}"


def test_a_judge_fine_tunes_from_the_weights_it_is_given() -> None:
    from composer.toyworld.judge import Judge, train_judge

    start = Judge()
    tuned = train_judge(steps=1, batch=2, lr=0.0, init=start, device="cpu")
    assert tuned is not start
    assert all(torch.equal(a, b) for a, b in zip(tuned.state_dict().values(), start.state_dict().values()))


@pytest.mark.slow
def test_the_demo_seeds_benchmark_runs_the_makefiles_demo_prompt(capsys) -> None:
    import re

    from benchmarks.demo_seeds import DEMO_PROMPT, main

    makefile = (Path(__file__).parents[2] / "Makefile").read_text()
    assert re.search(r"^DEMO_PROMPT := (.*)$", makefile, re.MULTILINE).group(1) == DEMO_PROMPT
    assert main(["--quick", "--steps", "4"]) == 0
    result = json.loads(capsys.readouterr().out)
    run = result["prompts"][DEMO_PROMPT]
    assert sorted(run["adapters"]) == ["crown", "zorbex"]
    assert [row["seed"] for row in run["per_seed"]] == [16, 17]
    assert run["all_found"] == sum(row["all_found"] for row in run["per_seed"])
    assert run["as_captioned"] == sum(row["as_captioned"] for row in run["per_seed"])
    unasked = {row["seen"]["style"] for row in run["per_seed"] if row["as_captioned"]}
    assert unasked <= {"none"}, "an image with an unasked style is not as captioned"


def test_a_judge_trains_on_autoencoder_round_trips_as_often_as_asked() -> None:
    from types import SimpleNamespace

    from composer.toyworld.judge import train_judge

    class CountingAutoencoder:
        def __init__(self) -> None:
            self.calls = 0

        def encode(self, images: torch.Tensor) -> SimpleNamespace:
            self.calls += 1
            return SimpleNamespace(latent_dist=SimpleNamespace(sample=lambda: images))

        def decode(self, latents: torch.Tensor) -> SimpleNamespace:
            return SimpleNamespace(sample=latents)

    for every, expected in ((3, 2), (2, 2), (1, 4)):
        vae = CountingAutoencoder()
        train_judge(steps=4, batch=2, lr=0.0, vae=vae, decoded_every=every, device="cpu")
        assert vae.calls == expected, every


def test_a_judge_refuses_a_round_trip_period_below_one() -> None:
    from composer.toyworld.judge import train_judge
    from fusion.errors import TrainingError

    with pytest.raises(TrainingError, match="decoded_every"):
        train_judge(steps=1, batch=2, decoded_every=0, device="cpu")


def test_concept_scenes_carry_clothing_style_and_object_as_often_as_asked(tmp_path: Path) -> None:
    """``optional`` is the rate at which each training scene carries clothing, a style and an object (the world's
    own 0.5 by default), recorded in the file's header when set from the command line."""
    from safetensors import safe_open

    from composer.toyworld.concepts import ConceptTraining, training_batch
    from composer.toyworld.data import WorldRandom
    from composer.toyworld.model import WEIGHTS_DIR
    from composer.toyworld.train import main

    assert ConceptTraining().optional == 0.5
    concept = CONCEPTS["kiboko"]
    always = training_batch(concept, ConceptTraining(batch=16, optional=1.0), WorldRandom(0), "cpu")
    assert all("none" not in (s.clothing, s.style, s.object) for s in always.scenes)
    never = training_batch(concept, ConceptTraining(batch=16, optional=0.0), WorldRandom(0), "cpu")
    assert all((s.clothing, s.style, s.object) == ("none", "none", "none") for s in never.scenes)
    (tmp_path / "toy-sd").symlink_to(WEIGHTS_DIR, target_is_directory=True)
    args = ["--stages", "concepts", "--concepts", "kiboko", "--concept-steps", "1", "--concept-batch", "2"]
    main([str(tmp_path), *args, "--concept-optional", "0.75", "--device", "cpu"])
    with safe_open(str(tmp_path / "concepts" / "kiboko.safetensors"), "pt") as handle:
        assert json.loads(handle.metadata()["training"])["optional"] == 0.75


def test_concept_training_refuses_an_optional_rate_outside_zero_to_one() -> None:
    from composer.toyworld.concepts import ConceptTraining, train_concept
    from fusion.errors import TrainingError

    for rate in (-0.1, 1.5):
        with pytest.raises(TrainingError, match="optional"):
            train_concept(None, CONCEPTS["kiboko"], ConceptTraining(optional=rate), "cpu")


def test_render_paints_the_character_with_the_fill_it_is_given() -> None:
    scenes = [sample_scene(random.Random(i)) for i in range(3)]
    layout = sample_layout(3, torch.Generator().manual_seed(0))
    fills = torch.tensor([[0.5, 0.25, 0.75], [0.1, 0.9, 0.3], [1.0, 1.0, 0.0]])
    plain = render(scenes, layout)
    painted = render(scenes, layout, fills=fills)
    changed = (plain - painted).abs().sum(1) > 0
    assert changed.any(1).any(1).all()
    for image, fill, mask in zip(painted, fills, changed):
        centre = image[:, mask].mean(1)
        assert torch.allclose(centre, fill, atol=0.2), (centre, fill)


def test_drifted_fills_are_labelled_with_the_nearest_named_colour() -> None:
    """A fill part-way from one named colour to one of its two nearest is that scene's colour only while it is the
    nearest."""
    from composer.toyworld.judge import drifted_fills
    from composer.toyworld.world import COLOURS

    scenes = [sample_scene(random.Random(i)) for i in range(200)]
    same, labels = drifted_fills(scenes, 0.0, torch.Generator().manual_seed(0))
    assert labels == [s.colour for s in scenes]
    assert torch.allclose(same * 255, torch.tensor([COLOURS[s.colour] for s in scenes], dtype=torch.float32))
    fills, labels = drifted_fills(scenes, 0.6, torch.Generator().manual_seed(0))
    table = {name: torch.tensor(rgb, dtype=torch.float32) for name, rgb in COLOURS.items()}
    for fill, label in zip(fills * 255, labels):
        assert label == min(table, key=lambda name: float((table[name] - fill).norm()))
    assert labels != [s.colour for s in scenes], "a drift past a midpoint relabels"
    neighbours = {
        name: sorted((n for n in table if n != name), key=lambda n: float((table[n] - table[name]).norm()))[:2]
        for name in table
    }
    for fill, scene in zip(fills * 255, scenes):
        own = table[scene.colour]
        towards = [
            n
            for n in neighbours[scene.colour]
            if torch.allclose(torch.cross(fill - own, table[n] - own, dim=0), torch.zeros(3), atol=1e-1)
        ]
        assert towards, f"{scene.colour} drifted towards none of its two nearest colours {neighbours[scene.colour]}"


def test_a_colour_drift_share_keeps_the_rest_of_the_fills_named() -> None:
    """With a share below 1 about that share of the fills drift; the others are exactly their named colour."""
    from composer.toyworld.judge import drifted_fills
    from composer.toyworld.world import COLOURS

    scenes = [sample_scene(random.Random(i)) for i in range(400)]
    fills, _ = drifted_fills(scenes, 0.5, torch.Generator().manual_seed(0), share=0.25)
    named = torch.tensor([COLOURS[s.colour] for s in scenes], dtype=torch.float32)
    drifted = ((fills * 255 - named).abs().amax(1) > 1e-3).float().mean()
    assert 0.18 < drifted < 0.32, drifted


def test_a_judge_refuses_a_colour_drift_outside_zero_to_one() -> None:
    from composer.toyworld.judge import train_judge
    from fusion.errors import TrainingError

    for drift in (-0.1, 1.5):
        with pytest.raises(TrainingError, match="colour_drift"):
            train_judge(steps=1, batch=2, colour_drift=drift, device="cpu")
    for share in (0.0, 1.5):
        with pytest.raises(TrainingError, match="colour_drift_share"):
            train_judge(steps=1, batch=2, colour_drift=0.5, colour_drift_share=share, device="cpu")


def test_a_judge_refuses_a_colour_drift_share_without_a_drift() -> None:
    from composer.toyworld.judge import train_judge
    from fusion.errors import TrainingError

    with pytest.raises(TrainingError, match=r"colour_drift_share 0\.5 has no effect"):
        train_judge(steps=1, batch=2, colour_drift=0.0, colour_drift_share=0.5, device="cpu")


def _rendered_with_labels(count: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    rng = WorldRandom(seed)
    scenes = [sample_any_scene(rng.content) for _ in range(count)]
    return render(scenes, sample_layout(count, rng.layout)), torch.tensor([s.labels() for s in scenes])


def test_tuning_the_last_trunk_block_changes_it_alone_deterministically_and_fits_the_labels() -> None:
    import torch.nn.functional as F

    from composer.toyworld.judge import Judge, head_data, train_heads

    torch.manual_seed(0)
    judge = Judge(8).eval()
    images, targets = _rendered_with_labels(8, 3)
    data = head_data(judge, images, targets, copies=2, renders=8, blocks=1)
    with torch.no_grad():
        assert torch.equal(data.labelled[:8], judge.head_features(images)["shape"]), "the maps pass the same trunk"
    heads_only = train_heads(judge, data, steps=5)
    tuned = train_heads(judge, data, steps=5, trunk_steps=30, trunk_lr=3e-3, trunk_batch=8)
    again = train_heads(judge, data, steps=5, trunk_steps=30, trunk_lr=3e-3, trunk_batch=8)
    assert all(torch.equal(a, b) for a, b in zip(tuned.state_dict().values(), again.state_dict().values()))
    for network, changed in ((heads_only, set()), (tuned, {len(judge.trunk) - 1})):
        for index, (block, start) in enumerate(zip(network.trunk, judge.trunk)):
            same = all(torch.equal(a, b) for a, b in zip(block.state_dict().values(), start.state_dict().values()))
            assert same == (index not in changed), index

    def loss(network: Judge) -> float:
        with torch.no_grad():
            logits = network(images)
        return sum(float(F.cross_entropy(logits[a], targets[:, i])) for i, a in enumerate(ATTRIBUTES))

    assert loss(tuned) < loss(heads_only)


def test_heads_kept_on_the_generators_last_block_read_as_heads_alone_the_rest_as_tuned(tmp_path: Path) -> None:
    from composer.toyworld.judge import Judge, head_data, train_heads
    from fusion.errors import TrainingError

    torch.manual_seed(0)
    judge = Judge(8).eval()
    images, targets = _rendered_with_labels(8, 3)
    data = head_data(judge, images, targets, copies=2, renders=8, blocks=1)
    heads_only = train_heads(judge, data, steps=5)
    tuning = {"steps": 5, "trunk_steps": 30, "trunk_lr": 3e-3, "trunk_batch": 8}
    tuned = train_heads(judge, data, **tuning)
    kept = train_heads(judge, data, **tuning, kept_for=("style",))
    with torch.no_grad():
        read, alone, whole = kept(images), heads_only(images), tuned(images)
    torch.testing.assert_close(read["style"], alone["style"], rtol=0, atol=1e-6)
    assert not torch.allclose(read["style"], whole["style"], atol=1e-3), "the tuned block reads the style otherwise"
    for attr in (a for a in ATTRIBUTES if a != "style"):
        torch.testing.assert_close(read[attr], whole[attr], rtol=0, atol=1e-6)
    kept.save(tmp_path / "judge.safetensors")
    loaded = Judge.load(tmp_path / "judge.safetensors")
    assert loaded.kept_for == ("style",)
    with torch.no_grad():
        assert all(torch.equal(loaded(images)[a], read[a]) for a in ATTRIBUTES)
    with pytest.raises(TrainingError, match="no block is tuned"):
        train_heads(judge, data, steps=1, kept_for=("style",))
    with pytest.raises(TrainingError, match="without a kept tail"):
        train_heads(kept, data, steps=1)
    for blocks, names in ((1, ("colour", "shade")), (1, ("style", "style")), (0, ("style",)), (-1, ("style",))):
        with pytest.raises(TrainingError, match="kept tail"):
            Judge(8, kept_blocks=blocks, kept_for=names)
    with pytest.raises(TrainingError, match="less than the trunk"):
        Judge(8, kept_blocks=len(judge.trunk), kept_for=("style",))
    with pytest.raises(TrainingError, match="kept tail"):
        train_heads(judge, data, steps=1, trunk_steps=1, kept_for=("shade",))


def test_a_two_block_kept_tail_reads_the_same_from_images_from_deeper_maps_and_through_the_reader() -> None:
    from composer.toyworld.calibration import fit
    from composer.toyworld.judge import Judge, head_data, train_heads
    from composer.toyworld.reader import Reader, gather_evidence
    from fusion.errors import TrainingError

    torch.manual_seed(1)
    judge = Judge(8).eval()
    images, targets = _rendered_with_labels(6, 5)
    data = head_data(judge, images, targets, copies=1, renders=6, blocks=2)
    kept = train_heads(judge, data, steps=3, trunk_steps=5, trunk_batch=4, kept_for=("style", "object"))
    assert kept.kept_blocks == 2
    with torch.no_grad():
        direct = kept.head_features(images)
        for blocks in (2, 3, len(kept.trunk)):
            deeper = kept.head_features_from_maps(kept.entering(images, blocks), blocks)
            assert all(torch.allclose(deeper[a], direct[a], atol=1e-6) for a in ATTRIBUTES), blocks
        generator = judge.head_features(images)["style"]
    torch.testing.assert_close(direct["style"], generator, rtol=0, atol=1e-6)
    for blocks in (1, len(kept.trunk) + 1):
        with pytest.raises(TrainingError, match="cannot feed"):
            kept.head_features_from_maps(images, blocks)
    evidence = gather_evidence(kept, images)
    with torch.no_grad():
        style = kept(images)["style"].softmax(1)
    torch.testing.assert_close(evidence.probabilities["style"], style, rtol=0, atol=1e-6)
    rows = [evidence.row(i) for i in range(len(images))]
    labels = [{a: VOCABULARY[a][int(t)] for a, t in zip(ATTRIBUTES, row)} for row in targets]
    reader = Reader(kept, fit(rows, labels))
    assert len(reader.read(images)) == len(images)


def test_tuning_the_trunk_needs_its_maps_and_a_block_the_trunk_has() -> None:
    from composer.toyworld.judge import Judge, head_data, train_heads
    from fusion.errors import TrainingError

    judge = Judge(8).eval()
    images, targets = _rendered_with_labels(2, 4)
    with pytest.raises(TrainingError, match="blocks"):
        head_data(judge, images, targets, copies=1, renders=2, blocks=len(judge.trunk))
    data = head_data(judge, images, targets, copies=1, renders=2)
    with pytest.raises(TrainingError, match="maps"):
        train_heads(judge, data, steps=1, trunk_steps=1)
    with pytest.raises(TrainingError, match="trunk_batch"):
        train_heads(judge, head_data(judge, images, targets, copies=1, renders=2, blocks=1), trunk_batch=0)


def test_the_renders_weight_sets_how_far_the_heads_keep_the_generators_labels() -> None:
    """Labels that contradict the generator (every class shifted by one) pull the heads one way, the renders' exact
    labels the other: the heavier the renders weigh, the better the fitted heads read the generator's world."""
    import torch.nn.functional as F

    from composer.toyworld.judge import Judge, head_data, train_heads
    from fusion.errors import TrainingError

    torch.manual_seed(0)
    judge = Judge(8).eval()
    images, targets = _rendered_with_labels(16, 5)
    sizes = torch.tensor([len(VOCABULARY[a]) for a in ATTRIBUTES])
    data = head_data(judge, images, (targets + 1) % sizes, copies=1, renders=16)

    def render_loss(render_weight: float) -> float:
        heads = train_heads(judge, data, steps=60, lr=1e-2, render_weight=render_weight)
        with torch.no_grad():
            logits = heads(images)
        return sum(float(F.cross_entropy(logits[a], targets[:, i])) for i, a in enumerate(ATTRIBUTES))

    assert render_loss(10.0) < render_loss(1.0) < render_loss(0.1)
    with pytest.raises(TrainingError, match="render_weight"):
        train_heads(judge, data, steps=1, render_weight=-1.0)
