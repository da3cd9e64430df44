"""`compose batch PROMPTS.txt [--processes N] [generate options]`: generate for many prompts, split across processes.

PROMPTS.txt holds one prompt per line (blank lines and ``#`` comments skipped; ``<lora:…>`` tags work). Every option
of `compose generate` applies to every prompt. With ``--processes N`` (N > 1) the command runs itself again under
``accelerate launch``: one process per GPU when there are enough GPUs, CPU processes otherwise. Each process loads the
model once and composes its contiguous share of the prompts (accelerate's ``split_between_processes``).

Names never depend on the process count: the prompt on line index ``i`` goes to ``OUT/<i:04d>-<slug>/<seed>-<n>.png``
(plus the A1111 chunk and JSON sidecar). Each process writes ``OUT/.batch/part-<rank>.json``; once all have finished,
the parts are merged into ``OUT/batch.json`` and reported.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

from composer.cli import arg_types
from composer.cli.commands import generate
from composer.cli.reporting import emit_json, format_table
from composer.prompts import extract_lora_tags
from fusion.errors import ComposerError

PARTS_DIRNAME = ".batch"
MANIFEST = "batch.json"
SLUG_CHARS = 40
COLUMNS = ("index", "prompt", "adapters", "images", "seconds")


def _generate_parser() -> argparse.ArgumentParser:
    """The parser of `compose generate`, which parses a batch's generate options."""
    holder = argparse.ArgumentParser(prog="compose").add_subparsers()
    generate.register(holder)
    return holder.choices["generate"]


def _add_own_options(parser: argparse.ArgumentParser) -> None:
    """Batch's own options: ``--processes N`` and the ``--worker`` flag of the processes it launches."""
    parser.add_argument(
        "--processes", type=arg_types.positive_int, default=None, help="processes to split the prompts across"
    )
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)


def _extra_parser() -> argparse.ArgumentParser:
    """Batch's own options when they come after PROMPTS.txt (among the generate options)."""
    parser = argparse.ArgumentParser(prog="compose batch", add_help=False)
    _add_own_options(parser)
    return parser


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `batch` subcommand."""
    parser = subparsers.add_parser(
        "batch",
        help="generate for every prompt in a file, split across processes",
        description="Generate images for every line of PROMPTS (one prompt per line; # comments). Options after "
        "PROMPTS are those of `compose generate` (see compose generate -h) and apply to every prompt.",
    )
    parser.add_argument("prompts", type=Path, help="text file, one prompt per line")
    _add_own_options(parser)
    parser.add_argument("options", nargs=argparse.REMAINDER, help="`compose generate` options")
    parser.set_defaults(handler=run)


def read_prompts(path: Path) -> list[str]:
    """The prompts in ``path``: one per line, blank lines and ``#`` comments skipped."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise ComposerError(f"cannot read the prompts file: {exc.strerror}", path=path) from exc
    prompts = [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
    if not prompts:
        raise ComposerError("the prompts file has no prompts", path=path, hint="write one prompt per line")
    return prompts


def slug(prompt: str) -> str:
    """A short file-name-safe version of a prompt (tags dropped), e.g. ``a-corgi-astronaut``."""
    text, _ = extract_lora_tags(prompt)
    words = re.findall(r"[a-z0-9]+", text.lower())
    return "-".join(words)[:SLUG_CHARS].rstrip("-") or "prompt"


def output_folder(out: Path, index: int, prompt: str) -> Path:
    """Where the images of the prompt at ``index`` go (independent of how prompts are split)."""
    return out / f"{index:04d}-{slug(prompt)}"


def _prompt_options(options: argparse.Namespace, index: int, prompt: str) -> dict[str, Any]:
    """The generate options for one prompt; plots go to a per-prompt folder so prompts never overwrite each other."""
    run_options = generate.run_options(options)
    if run_options.get("plot") is not None:
        run_options["plot"] = output_folder(Path(run_options["plot"]), index, prompt)
    return run_options


def run(args: argparse.Namespace) -> int:
    """Compose every prompt (in this process or under accelerate) and report the merged manifest."""
    options, rest = _generate_parser().parse_known_args(["-", *args.options])
    extra = _extra_parser().parse_args(rest)
    processes = extra.processes or args.processes or 1
    if processes < 1:
        raise ComposerError(f"--processes must be at least 1, got {processes}")
    prompts = read_prompts(args.prompts)
    out = options.out
    if args.worker or extra.worker:
        _compose_share(prompts, options, distributed=True)
        return 0
    parts = out / PARTS_DIRNAME
    shutil.rmtree(parts, ignore_errors=True)
    if processes == 1:
        _compose_share(prompts, options, distributed=False)
    else:
        code = _launch(args.prompts, args.options, min(processes, len(prompts)))
        if code != 0:
            raise ComposerError(f"a batch process failed (exit code {code}); its error is printed above")
    manifest = _merge(parts, prompts, processes)
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2))
    shutil.rmtree(parts, ignore_errors=True)
    _report(manifest, out, options.json)
    return 0


def _launch(prompts: Path, options: list[str], processes: int) -> int:
    """Run this command in ``processes`` worker processes under ``accelerate launch``; returns its exit code.

    The torchrun-based launcher (``--multi_gpu``) starts the processes; each worker then uses one GPU, or the CPU
    when there are fewer GPUs than processes.
    """
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes)]
    launcher += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    return subprocess.call([*launcher, "-m", "composer.cli", "batch", str(prompts), *options, "--worker"])


def _compose_share(prompts: list[str], options: argparse.Namespace, *, distributed: bool) -> None:
    """Compose this process's share of ``prompts`` and write its part of the manifest."""
    import torch

    from composer.facade import Composer

    rank, device, indices = 0, None, list(range(len(prompts)))
    if distributed:
        from accelerate import PartialState

        state = PartialState(cpu=torch.cuda.device_count() < int(os.environ.get("WORLD_SIZE", "1")))
        rank = state.process_index
        device = state.device if state.device.type == "cuda" else None
        with state.split_between_processes(indices) as share:
            indices = list(share)
    composer = Composer(model=options.model, library=options.library, device=device)
    records = []
    for index in indices:
        result = composer.run(
            prompts[index],
            out=output_folder(options.out, index, prompts[index]),
            **_prompt_options(options, index, prompts[index]),
        )
        records.append({"index": index, "rank": rank, "source": prompts[index], **result.as_dict()})
    parts = options.out / PARTS_DIRNAME
    parts.mkdir(parents=True, exist_ok=True)
    (parts / f"part-{rank}.json").write_text(json.dumps(records, indent=2))


def _merge(parts: Path, prompts: list[str], processes: int) -> dict[str, Any]:
    """Every process's records, in prompt order; raises if any prompt is missing."""
    records = [r for part in sorted(parts.glob("part-*.json")) for r in json.loads(part.read_text())]
    records.sort(key=lambda r: r["index"])
    missing = sorted(set(range(len(prompts))) - {r["index"] for r in records})
    if missing:
        raise ComposerError(f"no images for prompt line(s) {missing}", hint="see the errors printed above")
    return {"prompts": len(prompts), "processes": processes, "items": records}


def _report(manifest: dict[str, Any], out: Path, as_json: bool) -> None:
    if as_json:
        emit_json({**manifest, "manifest": str(out / MANIFEST)})
        return
    rows = [
        {
            "index": r["index"],
            "prompt": r["prompt"],
            "adapters": ", ".join(a["name"] for a in r["adapters"]) or "-",
            "images": len(r["images"]),
            "seconds": r["seconds"],
        }
        for r in manifest["items"]
    ]
    print(format_table(rows, COLUMNS))
    images = sum(len(r["images"]) for r in manifest["items"])
    print(f"\n{images} image(s) for {manifest['prompts']} prompt(s) with {manifest['processes']} process(es)")
    print(f"wrote {out / MANIFEST}")
