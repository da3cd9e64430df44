"""``python -m composer.toyworld.train OUT``: train the whole toy world — base model, judge, one adapter per concept.

This is the command that produced the shipped weights (see ``composer/toyworld/weights/README.md`` for the exact
arguments, seed, step counts, hardware and checksums). Every stage writes into OUT and is skipped when its output
is already there, and base training resumes from its checkpoint, so an interrupted run continues where it stopped.
The judge stage writes the network trained on the generator (``judge_generator.safetensors``);
``python -m benchmarks.judge_labels calibrate`` then fine-tunes it on images labelled by eye into the shipped
``judge.safetensors`` and fits its calibration (docs/judge.md).
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from composer.cli.verbosity import configure_logging
from composer.toyworld.concepts import ConceptTraining, train_concept
from composer.toyworld.judge import GENERATOR_JUDGE_FILE, Judge, judge_accuracy, train_judge
from composer.toyworld.train_base import BaseTrainingConfig, train_base
from composer.toyworld.world import CONCEPTS

logger = logging.getLogger(__name__)

CONCEPT_PLAN: dict[str, ConceptTraining] = {
    "zorbex": ConceptTraining("lora", text_encoder=True),
    "kiboko": ConceptTraining("lora"),
    "lunari": ConceptTraining("lora", text_encoder=True),
    "crown": ConceptTraining("loha", rank=4),
    "sunglasses": ConceptTraining("lora", text_encoder=True),
    "pixel_art": ConceptTraining("lokr", rank=4),
    "polka_dots": ConceptTraining("lora"),
    "sunset": ConceptTraining("lora", text_encoder=True),
    "forest": ConceptTraining("lora", text_encoder=True),
    "flower": ConceptTraining("loha", rank=4),
    "mushroom": ConceptTraining("shira", rank=8),
}
"""Which adapter kind teaches which concept: the library mixes kinds and formats the way real ones do."""


def save_concept(path: Path, trained: dict, setup: ConceptTraining) -> None:
    """One safetensors file: PEFT state dicts under ``unet.`` / ``text_encoder.``, configs in the header."""
    from safetensors.torch import save_file

    tensors = {f"unet.{k}": v for k, v in trained["unet"].items()}
    if trained["text_encoder"] is not None:
        tensors |= {f"text_encoder.{k}": v for k, v in trained["text_encoder"].items()}
    header = {
        "training": json.dumps(asdict(setup)),
        "unet_config": json.dumps(trained["unet_config"], default=str),
        "text_config": json.dumps(trained["text_config"], default=str),
    }
    save_file(tensors, str(path), metadata=header)


def base_pipeline(out: Path) -> Any:
    """The base model trained into ``out/toy-sd``, loaded as the preset loads it (fp32, the offline CLIP tokenizer).

    The shipped folder carries no tokenizer, and diffusers given a folder without one hands back a tokenizer that
    maps every caption to unrelated ids, so adapters trained through it learn their concept tied to no word.
    """
    from composer.toyworld.model import load_toy_pipeline

    return load_toy_pipeline(torch.float32, folder=out / "toy-sd")


def main(argv: list[str] | None = None) -> int:
    """Run the stages named by ``--stages`` into OUT."""
    parser = argparse.ArgumentParser(prog="python -m composer.toyworld.train", description=__doc__)
    parser.add_argument("out", type=Path)
    parser.add_argument("--stages", default="base,judge,concepts")
    parser.add_argument("--steps", type=int, default=BaseTrainingConfig.steps)
    parser.add_argument("--vae-steps", type=int, default=BaseTrainingConfig.vae_steps)
    parser.add_argument("--batch", type=int, default=BaseTrainingConfig.batch)
    parser.add_argument("--max-minutes", type=float, default=None, help="stop base training after this long")
    parser.add_argument("--judge-steps", type=int, default=3000)
    parser.add_argument("--judge-lr", type=float, default=2e-3)
    parser.add_argument("--judge-init", type=Path, default=None, help="fine-tune this judge instead of a new one")
    parser.add_argument(
        "--judge-decoded-every", type=int, default=3, help="train on an autoencoder round trip every Nth step"
    )
    parser.add_argument(
        "--judge-colour-drift",
        type=float,
        default=0.0,
        help="move each character's fill up to this fraction towards a neighbouring colour, labelled with the nearest",
    )
    parser.add_argument(
        "--judge-colour-drift-share",
        type=float,
        default=1.0,
        help="the share of characters whose fill drifts (the rest keep their named colour)",
    )
    parser.add_argument("--concept-steps", type=int, default=ConceptTraining.steps)
    parser.add_argument("--concept-batch", type=int, default=ConceptTraining.batch)
    parser.add_argument("--concept-lr", type=float, default=ConceptTraining.lr)
    parser.add_argument(
        "--concept-prior-batch",
        type=int,
        default=ConceptTraining.prior_batch,
        help="regularisation scenes per step, without the concept or its trigger (prior preservation)",
    )
    parser.add_argument("--concept-prior-weight", type=float, default=ConceptTraining.prior_weight)
    parser.add_argument(
        "--concept-optional",
        type=float,
        default=ConceptTraining.optional,
        help="how often each training scene carries clothing, a style and an object (0-1)",
    )
    parser.add_argument("--concepts", default=",".join(CONCEPT_PLAN))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default=None)
    args = parser.parse_args(argv)
    configure_logging(verbose=1)  # progress notes of the long runs on stderr
    stages = set(args.stages.split(","))
    args.out.mkdir(parents=True, exist_ok=True)
    log: dict = {"device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"}
    pipe_dir = args.out / "toy-sd"
    if "base" in stages and not (pipe_dir / "model_index.json").is_file():
        began = time.monotonic()
        config = BaseTrainingConfig(
            steps=args.steps, vae_steps=args.vae_steps, batch=args.batch, seed=args.seed, max_minutes=args.max_minutes
        )
        train_base(args.out, config, args.device)
        log["base_seconds"] = round(time.monotonic() - began, 1)
    pipe = base_pipeline(args.out)
    if "judge" in stages and not (args.out / GENERATOR_JUDGE_FILE).is_file():
        began = time.monotonic()
        judge = train_judge(
            steps=args.judge_steps,
            seed=args.seed,
            vae=pipe.vae.to(args.device or "cuda" if torch.cuda.is_available() else "cpu"),
            device=args.device,
            lr=args.judge_lr,
            init=Judge.load(args.judge_init) if args.judge_init else None,
            decoded_every=args.judge_decoded_every,
            colour_drift=args.judge_colour_drift,
            colour_drift_share=args.judge_colour_drift_share,
        )
        judge.save(args.out / GENERATOR_JUDGE_FILE)
        log["judge_seconds"] = round(time.monotonic() - began, 1)
        log["judge_accuracy"] = judge_accuracy(Judge.load(args.out / GENERATOR_JUDGE_FILE))
    if "concepts" in stages:
        folder = args.out / "concepts"
        folder.mkdir(exist_ok=True)
        for name in args.concepts.split(","):
            target = folder / f"{name}.safetensors"
            if target.is_file():
                continue
            setup = CONCEPT_PLAN[name]
            overrides = {
                "steps": args.concept_steps,
                "batch": args.concept_batch,
                "lr": args.concept_lr,
                "prior_batch": args.concept_prior_batch,
                "prior_weight": args.concept_prior_weight,
                "optional": args.concept_optional,
                "seed": args.seed,
            }
            setup = ConceptTraining(**{**asdict(setup), **overrides})
            began = time.monotonic()
            try:
                trained = train_concept(pipe, CONCEPTS[name], setup, args.device)
            except Exception as exc:  # one concept failing must not lose the others' hours
                log[f"concept_{name}_error"] = repr(exc)
                logger.error("concept %s failed: %r", name, exc)
                continue
            save_concept(target, trained, setup)
            log[f"concept_{name}_seconds"] = round(time.monotonic() - began, 1)
    with open(args.out / "train_log.json", "a") as handle:
        handle.write(json.dumps(log) + "\n")
    print(json.dumps(log, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
