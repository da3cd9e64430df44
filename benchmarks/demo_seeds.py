"""How typical `make demo`'s image is: the demo's own path on many seeds, each image read by the toy world's judge.

`make demo` writes one image (seed 0) and judges it. One seed says little: an image that passes may be the lucky
one of few, and one that fails may be the rare miss. This script runs the path the demo takes — the public facade
(:meth:`composer.facade.Composer.run`, what ``compose PROMPT --loras auto --method merge`` calls) on ``toy-sd`` with
the toy library, adapters retrieved from the prompt at their cards' weights, on both CFG branches — for seeds
``--first-seed`` … ``--first-seed + --seeds − 1`` of each prompt, and counts the seeds in which the judge sees every
attribute the prompt and the composed adapters ask for (what ``compose judge`` checks), and the seeds in which the
image is also as captioned: the world's captions name no clothing, style or object when a scene has none, so the
ones a prompt leaves out should read "none" (an unasked pixel style is a miss there). Prompts default to the
demo's; name others to compare (the demo's prompt was chosen that way on seeds 0–15 and checked on 16–47, see
docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

DEMO_PROMPT = "zorbex wearing a krwn crown in the snow"
"""The prompt `make demo` composes (the Makefile's ``DEMO_PROMPT``; a test keeps the two the same)."""
UNNAMED_MEANS_NONE = ("clothing", "style", "object")
"""Attributes a world caption leaves out exactly when the scene has none of them."""


def judged_seeds(composer: Any, prompt: str, seeds: range, out: Path, steps: int | None = None) -> dict[str, Any]:
    """``prompt`` composed on each seed through ``composer`` (``--loras auto``, merge, ``steps`` or the facade's
    default) and judged: the adapters chosen, the seeds with every expected attribute seen, those also as captioned,
    and per seed what was seen."""
    from composer.toyworld.verdict import judge_file

    rows = []
    chosen: list[str] = []
    for seed in seeds:
        image = out / f"{seed}-0.png"
        sidecar = image.with_suffix(".json")
        kept = json.loads(sidecar.read_text()) if image.is_file() and sidecar.is_file() else {}
        if kept.get("prompt") == prompt and kept.get("seed") == seed and steps in (None, kept.get("steps")):
            chosen = [adapter["name"] for adapter in kept.get("adapters", [])]
        else:
            result = composer.run(prompt, loras="auto", method="merge", seed=seed, steps=steps, out=out)
            chosen = [adapter.name for adapter in result.adapters]
        verdict = judge_file(image)
        captioned = dict.fromkeys(UNNAMED_MEANS_NONE, "none") | verdict.expected
        rows.append(
            {
                "seed": seed,
                "all_found": verdict.all_found,
                "as_captioned": all(verdict.seen[attr] == value for attr, value in captioned.items()),
                "concepts": verdict.concepts,
                "seen": verdict.seen,
            }
        )
    return {
        "adapters": chosen,
        "seeds": len(rows),
        "all_found": sum(row["all_found"] for row in rows),
        "as_captioned": sum(row["as_captioned"] for row in rows),
        "per_seed": rows,
    }


def main(argv: list[str] | None = None) -> int:
    """Run each prompt on the demo's path over the seeds; print one JSON document."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("prompts", nargs="*", default=[DEMO_PROMPT], help="prompts (default: the demo's)")
    parser.add_argument("--seeds", type=int, default=32)
    parser.add_argument("--first-seed", type=int, default=16, help="default: past the seeds the prompt was chosen on")
    parser.add_argument("--quick", action="store_true", help="two seeds of the demo's prompt")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--steps", type=int, default=None, help="denoising steps (default: the demo's, the facade's)")
    parser.add_argument(
        "--keep",
        type=Path,
        default=None,
        help="keep the images here; a later run re-reads a seed's image (same prompt and seed) instead of drawing it",
    )
    args = parser.parse_args(argv)
    import torch

    from benchmarks._common import cpu_hardware
    from composer.facade import Composer
    from composer.toyworld.library import build_toy_library

    torch.set_num_threads(args.threads)
    seeds = range(args.first_seed, args.first_seed + (2 if args.quick else args.seeds))
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as scratch:
        library = Path(scratch) / "library"
        build_toy_library(library)
        composer = Composer(model="toy-sd", library=library)
        outputs = args.keep or Path(scratch)
        prompts = {
            prompt: judged_seeds(composer, prompt, seeds, outputs / f"out{index}", args.steps)
            for index, prompt in enumerate(args.prompts)
        }
    result = {
        "mode": "quick" if args.quick else "full",
        "path": "Composer.run(prompt, loras='auto', method='merge') on toy-sd, both CFG branches, the cards' weights",
        "first_seed": seeds.start,
        "prompts": prompts,
        "seconds": round(time.perf_counter() - started, 1),
        "hardware": cpu_hardware(args.threads),
    }
    json.dump(result, sys.stdout, indent=1)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
