"""Let the retriever pick adapters for a prompt (``loras="auto"``) and compose them, offline on tiny-sd.

The ``Composer`` facade indexes the library, ranks its adapters for the prompt (trigger words, metadata text,
cross-attention response), adds missing trigger words, composes the picks and saves the image with its A1111
``parameters`` chunk and a JSON sidecar. Prints why each adapter was chosen.

Run: ``python examples/auto_compose.py ["prompt"] [--library DIR] [--out DIR]``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from make_library import DEFAULT_DIR, build_library, library_is_built

from composer.facade import Composer

DEFAULT_PROMPT = "a corgi astronaut walking through a neon city at night"


def main(argv: list[str] | None = None) -> list[Path]:
    """Retrieve, compose and generate for the prompt; prints the picks and returns the written image paths."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("prompt", nargs="?", default=DEFAULT_PROMPT)
    parser.add_argument("--library", type=Path, default=DEFAULT_DIR, help="LoRA folder (demo library by default)")
    parser.add_argument("--out", type=Path, default=Path("out") / "examples" / "auto", help="output folder")
    parser.add_argument("--method", default="merge", help="composition method")
    args = parser.parse_args(argv)
    if args.library == DEFAULT_DIR and not library_is_built(args.library):
        build_library(args.library)

    composer = Composer(model="tiny-sd", library=args.library)
    result = composer.run(args.prompt, loras="auto", method=args.method, seed=0, out=args.out)

    print(f"prompt used: {result.prompt}")
    for adapter in result.adapters:
        score = "" if adapter.score is None else f" score {adapter.score:.4f}"
        print(f"- {adapter.name} @ {adapter.weight}{score}: {'; '.join(adapter.reasons)}")
    if not result.adapters:
        print("no adapter matched: generated with the base model")
    for path in result.paths:
        print(f"wrote {path}")
    return result.paths


if __name__ == "__main__":
    main()
