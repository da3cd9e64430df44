"""A seeded fuzz campaign against every way bad input reaches LoRA Composer; prints a table of outcomes.

Three kinds of case, each run under a time limit and classified into one of :data:`OUTCOMES`:

- **files** — valid adapters for ``tiny-sd`` (kohya, PEFT, LoHa) and their sidecars, mutated (bit flips, truncation,
  header JSON edits, extreme or non-floating values, lone surrogates, deep nesting, huge sidecars, FIFOs, symlink
  loops, non-UTF-8 names, a stray ``adapter_config.json``). Each is indexed beside a good file, read, and when it
  reads, composed for one denoising step: the good file must stay listed, the bad one must get a typed row;
- **cli** — ``compose`` argument vectors (seeds, counts, steps, output locations, weights in tags and lists,
  non-UTF-8 bytes, ``judge`` on broken images and sidecars), run in-process through :func:`composer.cli.main`;
- **routes** — the served app: ``/gradio_api/file=`` paths (``..``, encodings, absolute paths, symlinks, the catalog)
  and editor requests naming files outside the library.

Outcomes: ``ok`` (worked), ``typed error`` (refused with a :class:`~fusion.errors.ComposerError` or a usage error),
``traceback`` (any other exception escaped), ``hang`` (over the time limit), ``NaN image`` (an image with NaN/Inf or
all black), ``outside read`` (the app answered with bytes of a file it must not serve). The last four must be 0.

``python -m benchmarks.fuzz`` runs the full campaign (``--files 500 --cli 300 --routes 700``, seed 1); ``--quick`` a
small one printing JSON (as ``python -m benchmarks`` expects). The test suite runs the same generators with other
seeds and small counts (``tests/benchmarks/test_fuzz.py``, ``tests/app/test_fuzz_routes.py``).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import random
import signal
import struct
import sys
import tempfile
import time
import traceback
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import httpx

OUTCOMES = ("ok", "typed error", "traceback", "hang", "NaN image", "outside read")
BAD_OUTCOMES = OUTCOMES[2:]
CASE_SECONDS = 20
WIDTH = 32  # tiny-sd's first attention width
PEFT_KEY = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
KOHYA_KEY = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
SECRET = b"API_KEY=sk-fuzz-secret\n"
PARSE_ONLY = "<parse only>"
"""Marks a CLI case that is only parsed (most generate cases: a full run loads a model)."""


@dataclass(frozen=True)
class Outcome:
    """One case's result: its kind, a label saying what was fed, the outcome and a short detail."""

    kind: str
    label: str
    outcome: str
    detail: str = ""


class CaseTimeoutError(Exception):
    """Raised inside a case that ran past its time limit."""


@contextlib.contextmanager
def time_limit(seconds: float) -> Iterator[None]:
    """Interrupt the block with :class:`CaseTimeoutError` after ``seconds`` (SIGALRM; main thread only)."""

    def expire(signum: int, frame: Any) -> None:
        raise CaseTimeoutError

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def classify(kind: str, label: str, case: Callable[[], str]) -> Outcome:
    """Run ``case`` (returning an outcome name) under the time limit; escaped exceptions are classified."""
    from fusion.errors import ComposerError

    try:
        with time_limit(CASE_SECONDS):
            return Outcome(kind, label, case())
    except CaseTimeoutError:
        return Outcome(kind, label, "hang")
    except ComposerError as exc:
        return Outcome(kind, label, "typed error", type(exc).__name__)
    except Exception as exc:
        return Outcome(kind, label, "traceback", "".join(traceback.format_exception_only(exc)).strip()[-300:])


# ------------------------------------------------------------------------------------------------------------ files
def _seed_tensors(kind: str, rng: random.Random) -> dict[str, Any]:
    import torch

    gen = torch.Generator().manual_seed(rng.randrange(2**31))
    rank = rng.choice((1, 2, 4))
    if kind == "kohya":
        return {
            f"{KOHYA_KEY}.lora_down.weight": torch.randn(rank, WIDTH, generator=gen) * 0.1,
            f"{KOHYA_KEY}.lora_up.weight": torch.randn(WIDTH, rank, generator=gen) * 0.1,
            f"{KOHYA_KEY}.alpha": torch.tensor(float(rank)),
        }
    if kind == "peft":
        return {
            f"{PEFT_KEY}.lora_A.weight": torch.randn(rank, WIDTH, generator=gen) * 0.1,
            f"{PEFT_KEY}.lora_B.weight": torch.randn(WIDTH, rank, generator=gen) * 0.1,
        }
    return {
        f"{KOHYA_KEY}.hada_w1_a": torch.randn(WIDTH, rank, generator=gen) * 0.1,
        f"{KOHYA_KEY}.hada_w1_b": torch.randn(rank, WIDTH, generator=gen) * 0.1,
        f"{KOHYA_KEY}.hada_w2_a": torch.randn(WIDTH, rank, generator=gen) * 0.1,
        f"{KOHYA_KEY}.hada_w2_b": torch.randn(rank, WIDTH, generator=gen) * 0.1,
        f"{KOHYA_KEY}.alpha": torch.tensor(float(rank)),
    }


def _serialise(tensors: dict[str, Any], metadata: dict[str, str] | None = None) -> bytes:
    from safetensors.torch import save

    return save(tensors, metadata=metadata)


def _split(data: bytes) -> tuple[dict[str, Any], bytes]:
    (length,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8 : 8 + length]), data[8 + length :]


def _join(header: object, body: bytes, *, raw: bytes | None = None) -> bytes:
    text = raw if raw is not None else json.dumps(header).encode()
    return struct.pack("<Q", len(text)) + text + body


def _weird_value(rng: random.Random) -> object:
    return rng.choice(
        [None, 7, -1, 2**70, 1.5, "F32", "\udc80", ["F32"], {"a": 1}, [], True, "x" * 70_000, float("1e308")]
    )


def _mutate_header(data: bytes, rng: random.Random) -> tuple[str, bytes]:
    header, body = _split(data)
    tensor = rng.choice([k for k in header if k != "__metadata__"])
    field = rng.choice(["dtype", "shape", "data_offsets", "entry", "metadata", "nest", "surrogate"])
    if field == "entry":
        header[tensor] = _weird_value(rng)
    elif field == "metadata":
        header["__metadata__"] = rng.choice(
            [
                _weird_value(rng),
                {"ss_output_name": "a\udc80b"},
                {"lora_adapter_metadata": json.dumps(_weird_value(rng))},
                {"ss_tag_frequency": "[" * 50_000},
                {"ss_network_dim": "inf", "ss_network_alpha": "nan"},
                {"modelspec.thumbnail": "data:image/png;base64,!!!"},
            ]
        )
    elif field == "nest":
        return "header nested 100k deep", _join(None, body, raw=b"[" * 100_000 + b"]" * 100_000)
    elif field == "surrogate":
        header.setdefault("__metadata__", {})["ss_output_name"] = "\ud800x"
    else:
        header[tensor][field] = _weird_value(rng)
    return f"header {field} of {tensor.rsplit('.', 1)[-1]}", _join(header, body)


def _mutate_values(kind: str, rng: random.Random) -> tuple[str, bytes]:
    import torch

    tensors = _seed_tensors(kind, rng)
    key = rng.choice(sorted(tensors))
    choice = rng.choice(["scale", "f64", "int", "bool", "empty", "nan", "alpha", "both"])
    if choice == "scale":
        exponent = rng.randrange(0, 40)
        tensors[key] = tensors[key] * 10.0**exponent
        return f"{key.rsplit('.', 1)[-1]} ×1e{exponent}", _serialise(tensors)
    if choice == "f64":
        tensors[key] = torch.full(tensors[key].shape, 1e300, dtype=torch.float64)
        return "F64 1e300 factor", _serialise(tensors)
    if choice == "int":
        tensors[key] = (tensors[key] * 10).to(torch.int32)
        return "int32 factor", _serialise(tensors)
    if choice == "bool":
        tensors[key] = tensors[key] > 0
        return "bool factor", _serialise(tensors)
    if choice == "empty":
        tensors[key] = torch.zeros(0) if key.endswith("alpha") else tensors[key][:0]
        return "empty tensor", _serialise(tensors)
    if choice == "nan":
        tensors[key] = tensors[key].clone().fill_(float("nan"))
        return "NaN factor", _serialise(tensors)
    if choice == "alpha":
        alpha = next((k for k in tensors if k.endswith("alpha")), None)
        if alpha is None:
            return "no alpha to mutate", _serialise(tensors)
        tensors[alpha] = torch.tensor(rng.choice([1e300, -1e300, 1e38, 0.0, float("inf")]), dtype=torch.float64)
        return "extreme alpha", _serialise(tensors)
    for name in list(tensors):
        if not name.endswith("alpha"):
            tensors[name] = torch.full(tensors[name].shape, 1e30)
    return "every factor 1e30", _serialise(tensors)


def _mutate_bytes(data: bytes, rng: random.Random) -> tuple[str, bytes]:
    choice = rng.choice(["flip", "truncate", "length", "empty", "junk"])
    if choice == "flip":
        array = bytearray(data)
        for _ in range(rng.randrange(1, 8)):
            array[rng.randrange(len(array))] ^= 1 << rng.randrange(8)
        return "bit flips", bytes(array)
    if choice == "truncate":
        return "truncated", data[: rng.randrange(len(data))]
    if choice == "length":
        return "header length field", struct.pack("<Q", rng.choice([0, 1, 2**63, len(data), 99])) + data[8:]
    if choice == "empty":
        return "empty file", b""
    return "not safetensors", SECRET + os.urandom(rng.randrange(0, 64))


SIDECARS = {
    "a1111": ".json",
    "civitai": ".civitai.info",
}


def _sidecar(rng: random.Random) -> tuple[str, str, bytes]:
    suffix = rng.choice(sorted(SIDECARS.values()))
    choice = rng.choice(["surrogate", "types", "weight", "nest", "bytes", "huge", "list"])
    if choice == "surrogate":
        body = json.dumps({"activation text": "x\udc80", "model": {"name": "\ud800"}, "notes": "\udfff"}).encode()
    elif choice == "types":
        body = json.dumps({"activation text": [1], "model": "x", "trainedWords": {"a": 1}, "files": 3}).encode()
    elif choice == "weight":
        body = json.dumps({"preferred weight": rng.choice([1e30, -1e38, 1e308, "nan", 25])}).encode()
    elif choice == "nest":
        body = b'{"a":' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    elif choice == "bytes":
        body = os.urandom(rng.randrange(1, 256))
    elif choice == "huge":
        body = b'{"notes": "' + b"n" * (5 * 1024 * 1024) + b'"}'
    else:
        body = b"[1, 2, 3]"
    return f"sidecar {suffix} {choice}", suffix, body


def make_file_case(folder: Path, rng: random.Random) -> tuple[str, Path]:
    """Write one mutated adapter (and maybe a sidecar or a neighbour) into ``folder``; returns (label, path)."""
    folder.mkdir(parents=True, exist_ok=True)
    kind = rng.choice(["kohya", "peft", "loha"])
    name = "case"
    route = rng.choice(["header", "values", "bytes", "sidecar", "special", "config"])
    if route == "special":
        special = rng.choice(["fifo", "loop", "dangling", "folder", "odd name"])
        if special == "fifo":
            os.mkfifo(folder / f"{name}.safetensors")
        elif special == "loop":
            os.symlink(f"{name}.safetensors", folder / f"{name}.safetensors")
        elif special == "dangling":
            os.symlink("nowhere.safetensors", folder / f"{name}.safetensors")
        elif special == "folder":
            (folder / f"{name}.safetensors").mkdir()
        else:
            odd = folder / os.fsdecode(b"c\xffase.safetensors")
            odd.write_bytes(_serialise(_seed_tensors(kind, rng)))
            return "non-UTF-8 name", odd
        return special, folder / f"{name}.safetensors"
    path = folder / f"{name}.safetensors"
    if route == "header":
        label, data = _mutate_header(_serialise(_seed_tensors(kind, rng)), rng)
    elif route == "values":
        label, data = _mutate_values(kind, rng)
    elif route == "bytes":
        label, data = _mutate_bytes(_serialise(_seed_tensors(kind, rng)), rng)
    elif route == "sidecar":
        label, suffix, body = _sidecar(rng)
        (folder / f"{name}{suffix}").write_bytes(body)
        data = _serialise(_seed_tensors(kind, rng))
    else:
        config = rng.choice(
            [b"null", b"7", b'{"r": 0}', b'{"r": 2, "lora_alpha": 1e308}', b'{"r": 2, "lora_alpha": 64}']
        )
        (folder / "adapter_config.json").write_bytes(config)
        label, data = f"stray adapter_config.json {config.decode()[:24]}", _serialise(_seed_tensors("peft", rng))
    path.write_bytes(data)
    return f"{kind}: {label}", path


def run_file_case(path: Path, pipe: Any) -> str:
    """Index ``path``'s folder (with a good file beside it), then read and compose ``path`` when it reads."""
    from weights_index.catalog import Library
    from weights_index.reader import read_adapter

    good = path.parent / "good_neighbour.safetensors"
    good.write_bytes(_serialise(_seed_tensors("peft", random.Random(0))))
    library = Library(path.parent)
    library.scan()
    entries = {entry.name: entry for entry in library.entries()}
    if not entries.get("good_neighbour") or not entries["good_neighbour"].ok:
        raise RuntimeError("the good file beside a bad one was not catalogued")
    row = next((e for e in entries.values() if e.name != "good_neighbour"), None)
    if row is None:
        return "typed error" if not path.is_file() or path.is_symlink() else "ok"
    if not row.ok:
        if not row.error_type:
            raise RuntimeError("a broken row has no error type")
        return "typed error"
    adapter = read_adapter(path)
    return compose_outcome(pipe, adapter)


def compose_outcome(pipe: Any, adapter: Any) -> str:
    """Compose ``adapter`` at weight 1 for one step on ``pipe``: "ok", or "NaN image" when the latent is not finite."""
    import torch

    pipe.add_adapter(adapter, name="fuzzed")
    try:
        pipe.set_composition({"fuzzed": 1.0})
        with torch.inference_mode():
            latents = pipe("a cat", num_inference_steps=1, height=64, width=64, output_type="latent").images
        return "ok" if bool(torch.isfinite(latents).all()) and bool(latents.abs().sum() > 0) else "NaN image"
    finally:
        pipe.clear_composition()
        pipe.remove_adapter("fuzzed")


def file_campaign(count: int, seed: int, workdir: Path) -> list[Outcome]:
    """``count`` mutated files, each in its own folder under ``workdir``."""
    from composer import load_preset, make_composable

    pipe = make_composable(load_preset("tiny-sd"))
    pipe.set_progress_bar_config(disable=True)
    rng = random.Random(seed)
    results = []
    for index in range(count):
        label, path = make_file_case(workdir / f"file{index:04d}", rng)
        results.append(classify("files", label, lambda path=path: run_file_case(path, pipe)))
    return results


# -------------------------------------------------------------------------------------------------------------- cli
def cli_cases(count: int, seed: int, workdir: Path) -> list[tuple[str, list[str]]]:
    """``count`` (label, argv) pairs for ``compose``; files they name are written under ``workdir``."""
    rng = random.Random(seed)
    workdir.mkdir(parents=True, exist_ok=True)
    taken = workdir / "taken.txt"
    taken.write_text("x")
    library = workdir / "library"
    library.mkdir(exist_ok=True)
    (library / "zorbex.safetensors").write_bytes(_serialise(_seed_tensors("peft", rng)))
    (library / "broken.safetensors").write_bytes(SECRET)
    if not (library / "loop.safetensors").is_symlink():
        os.symlink("loop.safetensors", library / "loop.safetensors")
        os.mkfifo(library / "pipe.safetensors")
    names = ["zorbex", "broken", "loop", "pipe", "/etc/passwd", "../x", "nope"]
    numbers = ["0", "-3", "1", "2", str(2**32), str(2**70), "1e3", "x", "", "\udcff", "-0", "3.5"]
    weights = ["0.5", "1e38", "1e20", "-1e5", "nan", "inf", "20", "21", "0@0,1@1", "0@0,25@1", "1e308", "x", "-2"]
    outs = [str(taken), "/dev/null", f"{taken}/sub", str(workdir / "fresh"), "/proc/nope", str(workdir)]
    cases = []
    for index in range(count):
        form = rng.choice(["numbers", "outs", "tags", "lists", "odd", "index", "judge", "export", "convert"])
        if form == "numbers":
            option = rng.choice(["--seed", "--num-images", "--steps", "--tau", "--size"])
            value = rng.choice(numbers)
            argv = ["a cat", option, value] + ([value] if option == "--size" else [])
        elif form == "outs":
            argv = ["a cat", rng.choice(["--out", "--plot"]), rng.choice(outs)]
        elif form == "tags":
            tag = f"<lora:{rng.choice(names)}:{rng.choice(weights)}:te={rng.choice(weights)}>"
            argv = [f"a cat {tag}", "--library", str(library)]
        elif form == "lists":
            argv = ["a cat", "--loras", f"{rng.choice(names)}:{rng.choice(weights)}", "--library", str(library)]
        elif form == "odd":
            argv = [rng.choice(["a c\udcfft", "<lora:>", "<lora::>", "<lora:x:1:2:3>", "<lora:x:lbw=9>", "a" * 5000])]
        elif form == "index":
            argv = [rng.choice(["index", "search", "info"]), str(library)]
            argv = argv + (["--library", str(library)] if argv[0] == "search" else [])
            if argv[0] == "info":
                argv = ["info", rng.choice([*names, "\udcff"]), "--library", str(library)]
        elif form == "judge":
            image = workdir / f"judge{index}.png"
            image.write_bytes(rng.choice([SECRET, b"\x89PNG\r\n\x1a\n" + os.urandom(40), b""]))
            image.with_suffix(".json").write_text(rng.choice(['{"prompt": 1}', "[]", "{", '{"adapters": [3]}']))
            argv = ["judge", str(image)]
        elif form == "export":
            argv = ["export", "<lora:zorbex:0.5>", "--library", str(library), "--out", rng.choice(outs)]
        else:
            argv = ["convert", str(library / "broken.safetensors"), "--out", rng.choice(outs)]
        if form in ("tags", "lists", "odd", "numbers", "outs"):
            argv = [*argv, "--model", "tiny-sd", "--steps", "1"]
            if "--out" not in argv:
                argv += ["--out", str(workdir / f"gen{index}")]
            if form in ("numbers", "outs") and rng.random() > 0.2:
                argv.append(PARSE_ONLY)
        cases.append((f"{form} {' '.join(a[:24] for a in argv[:3])}", argv))
    return cases


def run_cli_case(argv: list[str]) -> str:
    """Run ``compose`` in-process; classify by exit code, stderr and any image written."""
    from composer.cli import build_parser, main

    parse_only = PARSE_ONLY in argv
    if parse_only:
        argv = [a for a in argv if a != PARSE_ONLY]
    err, out = io.StringIO(), io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
        try:
            if parse_only:
                parser = build_parser()
                first = argv[0]
                full = (
                    argv if first in {"index", "search", "info", "judge", "export", "convert"} else ["generate", *argv]
                )
                from weights_index.text_safety import is_valid_unicode

                if not all(is_valid_unicode(a) for a in full):
                    return "typed error"
                parser.parse_args(full)
                return "ok"
            code = main(argv)
        except SystemExit as exit:
            code = int(exit.code or 0) if not isinstance(exit.code, str) else 2
    text = err.getvalue()
    if "Traceback" in text:
        return "traceback"
    if code in (1, 2, 3):
        return "typed error" if code != 3 else "ok"
    return _written_images_outcome(argv)


def _written_images_outcome(argv: list[str]) -> str:
    if "--out" not in argv:
        return "ok"
    import numpy as np
    from PIL import Image

    folder = Path(argv[len(argv) - 1 - argv[::-1].index("--out") + 1])
    for png in folder.glob("[0-9]*-[0-9]*.png") if folder.is_dir() else ():
        pixels = np.asarray(Image.open(png), dtype=np.float32)
        if not np.isfinite(pixels).all() or pixels.max() == 0:
            return "NaN image"
    return "ok"


def cli_campaign(count: int, seed: int, workdir: Path) -> list[Outcome]:
    """``count`` CLI cases."""
    return [
        classify("cli", label, lambda argv=argv: run_cli_case(argv)) for label, argv in cli_cases(count, seed, workdir)
    ]


# ----------------------------------------------------------------------------------------------------------- routes
def route_variants(count: int, seed: int, library: Path, out: Path, secret: Path) -> list[str]:
    """``count`` ``/gradio_api/file=`` targets: inside, outside, encoded, the catalog, symlinks, junk."""
    from urllib.parse import quote

    rng = random.Random(seed)
    catalog = library / ".lora-composer" / "catalog.sqlite"
    insiders = [p for p in library.rglob("*") if p.is_file() and ".lora-composer" not in p.parts][:20]
    bases = [
        str(secret),
        str(catalog),
        str(catalog.parent),
        "/etc/passwd",
        "/proc/self/environ",
        f"{library}/../{secret.parent.name}/{secret.name}",
        f"{library}/x/../../{secret.parent.name}/{secret.name}",
        f"{library}/.lora-composer/../.lora-composer/catalog.sqlite",
        str(library / "escape.png"),
        f"{out}/../{secret.parent.name}/{secret.name}",
        f"{library}/%00/etc/passwd",
        f"{library}\\..\\{secret.parent.name}\\{secret.name}",
        *(str(p) for p in insiders),
    ]
    variants = []
    for _ in range(count):
        path = rng.choice(bases)
        style = rng.choice(["plain", "quoted", "double", "dots", "slashes", "upper", "relative"])
        if style == "quoted":
            path = quote(path, safe="")
        elif style == "double":
            path = quote(quote(path, safe=""), safe="")
        elif style == "dots":
            path = path.replace("..", rng.choice(["%2e%2e", "%2E%2E", ".%2e", "..%c0%af"]))
        elif style == "slashes":
            path = path.replace("/", rng.choice(["//", "/./", "%2f"]))
        elif style == "upper":
            path = path.upper()
        elif style == "relative":
            path = os.path.relpath(path, os.getcwd()) if path.startswith("/") else path
        variants.append(path)
    return variants


def run_route(http: httpx.Client, url: str, target: str, forbidden: list[bytes]) -> str:
    """GET ``target`` from the app with the campaign's one HTTP client; "outside read" when the answer holds any
    ``forbidden`` file's bytes."""
    response = http.get(f"{url}gradio_api/file={target}", timeout=CASE_SECONDS)
    if response.status_code == 200:
        if any(body and body in response.content for body in forbidden):
            return "outside read"
        return "ok"
    if response.status_code >= 500:
        return "traceback"
    return "typed error"


def run_editor_request(service: Any, name: str, forbidden_names: list[str]) -> str:
    """Ask the service to compose an adapter ``name`` (as the editor does): paths must be refused."""
    from composer.service import adapter_request

    result = service.compose("a cat", [adapter_request(name, 0.5)], steps=1)
    if any(str(item.path or "").endswith(tuple(forbidden_names)) for item in result.adapters):
        return "outside read"
    return "ok"


def route_campaign(count: int, seed: int, workdir: Path) -> list[Outcome]:
    """Serve the app over a small library and send ``count`` route variants (one in ten an editor request), all
    over one HTTP client (a client per request would load the machine's certificate store each time)."""
    import httpx

    from app.server import start
    from composer.service import CompositionService

    library, out, outside = workdir / "library", workdir / "out", workdir / "outside"
    for folder in (library, out, outside):
        folder.mkdir(parents=True, exist_ok=True)
    (library / "zorbex.safetensors").write_bytes(_serialise(_seed_tensors("peft", random.Random(seed))))
    (library / "zorbex.preview.png").write_bytes(b"\x89PNG\r\n\x1a\n-preview")
    secret = outside / "keys.safetensors"
    secret.write_bytes(SECRET)
    os.symlink(secret, library / "escape.png")
    service = CompositionService("tiny-sd", library, out=out)
    running = start(service)
    try:
        with httpx.Client() as http:
            catalog = (library / ".lora-composer" / "catalog.sqlite").read_bytes()[:100]
            forbidden = [SECRET, catalog, Path("/etc/passwd").read_bytes()[:64]]
            targets = route_variants(count, seed, library, out, secret)
            rng = random.Random(seed + 1)
            results = []
            for target in targets:
                if rng.random() < 0.1:
                    name = rng.choice(
                        [str(secret), f"../outside/{secret.name}", "/etc/passwd", "zorbex/../../x", "~/x"]
                    )
                    results.append(
                        classify(
                            "routes",
                            f"editor {name[:40]}",
                            lambda n=name: run_editor_request(service, n, [secret.name]),
                        )
                    )
                else:
                    results.append(
                        classify("routes", target[:60], lambda t=target: run_route(http, running.url, t, forbidden))
                    )
            return results
    finally:
        running.close()


# ------------------------------------------------------------------------------------------------------------ report
def table(results: list[Outcome]) -> str:
    """Counts by kind (rows) and outcome (columns), with totals."""
    counts = Counter((r.kind, r.outcome) for r in results)
    kinds = sorted({r.kind for r in results})
    header = f"{'kind':<8}" + "".join(f"{o:>14}" for o in OUTCOMES) + f"{'total':>8}"
    lines = [header]
    for kind in [*kinds, "all"]:
        cells = [sum(v for (k, o), v in counts.items() if o == outcome and kind in (k, "all")) for outcome in OUTCOMES]
        lines.append(f"{kind:<8}" + "".join(f"{c:>14}" for c in cells) + f"{sum(cells):>8}")
    return "\n".join(lines)


def campaign(files: int, cli: int, routes: int, seed: int) -> list[Outcome]:
    """Run all three campaigns in a temporary folder."""
    with tempfile.TemporaryDirectory(prefix="lora-fuzz-") as temp:
        root = Path(temp)
        results = file_campaign(files, seed, root / "files")
        results += cli_campaign(cli, seed, root / "cli")
        results += route_campaign(routes, seed, root / "routes")
    return results


def main(argv: list[str] | None = None) -> int:
    """Run the campaign; print the table (or JSON with ``--quick``); exit 1 when any bad outcome occurred."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=500)
    parser.add_argument("--cli", type=int, default=300)
    parser.add_argument("--routes", type=int, default=700)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="a small campaign, printed as JSON")
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.quick:
        args.files, args.cli, args.routes = 20, 20, 40
    start = time.perf_counter()
    with contextlib.ExitStack() as quiet:
        if args.quick:  # one JSON document on stdout: the app's and the libraries' chatter is dropped
            quiet.enter_context(contextlib.redirect_stdout(io.StringIO()))
            quiet.enter_context(contextlib.redirect_stderr(io.StringIO()))
        results = campaign(args.files, args.cli, args.routes, args.seed)
    bad = [r for r in results if r.outcome in BAD_OUTCOMES]
    if args.quick:
        counts = Counter(r.outcome for r in results)
        print(json.dumps({"cases": len(results), "outcomes": dict(counts), "bad": [r.__dict__ for r in bad]}))
    else:
        print(table(results))
        print(f"\n{len(results)} cases in {time.perf_counter() - start:.0f} s (seed {args.seed})")
        for result in bad:
            print(f"{result.outcome}: [{result.kind}] {result.label!r}: {result.detail}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
