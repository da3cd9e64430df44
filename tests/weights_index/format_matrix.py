"""Print the format table of docs/formats.md: every producer-written case, read and composed, with measured errors.

Run from the repository root: ``python tests/weights_index/format_matrix.py`` (≈1 min on 2 cores). Each row is a
file written by its real producer (LyCORIS 4.1.3, PEFT ``save_pretrained``, diffusers ``save_lora_weights``) on a
tiny preset; "read" is the worst per-layer relative error of our update against the producer's own forward,
"fused"/"unfused" the relative error of our composition's latents against the producer-applied pipeline's. Refused
cases show the typed error. The same cases are asserted by test_lycoris_producers.py / test_peft_producers.py.
"""

from __future__ import annotations

import os
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
HERE = Path(__file__).resolve()
sys.path[:0] = [str(HERE.parent), str(HERE.parents[1]), str(HERE.parents[2])]  # its folder, tests/, the repo

import torch  # noqa: E402
from producers import lycoris_network, save, standalone_network  # noqa: E402
from test_lycoris_producers import CASES, TOL, check_producer_file  # noqa: E402
from test_peft_producers import PEFT_KINDS, check_diffusers_file, check_peft_folder  # noqa: E402

from composer.presets import ensure_preset, load_preset  # noqa: E402
from fusion.errors import ComposerError  # noqa: E402

PRESETS = {"sd1": "tiny-sd", "sdxl": "tiny-sdxl", "flux": "tiny-flux"}


def fresh(family: str, cache: Path):
    """A new tiny pipeline of ``family``."""
    pipe = load_preset(PRESETS[family], cache_dir=cache)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def lycoris_case(family: str, algo: str, options: dict, cache: Path, folder: Path, standalone: bool = False):
    """Errors of one LyCORIS case (see the module)."""
    pipe = fresh(family, cache)
    options = dict(options)
    preset = options.pop("preset", "flux" if family == "flux" else "full")
    if standalone:
        network = standalone_network(pipe, algo)
    else:
        network = lycoris_network(pipe, algo, folder, preset=preset, **options)
    path = save(network, folder / f"{family}-{algo}.safetensors")
    return check_producer_file(pipe, network, path)


def rows(cache: Path, folder: Path) -> list[tuple[str, str, str, str, Callable[[], dict[str, float]]]]:
    """(algorithm, option, family, producer, run) for every case."""
    found = []
    for case, (algo, options) in CASES.items():
        option = case.removeprefix(algo).strip("-") or "—"
        found.append(
            (algo, option, "sd1", "lycoris kohya", lambda a=algo, o=options: lycoris_case("sd1", a, o, cache, folder))
        )
    for algo, options, option in (("lokr", {}, "—"), ("loha", {"dora_wd": True}, "dora")):
        found.append(
            (algo, option, "sdxl", "lycoris kohya", lambda a=algo, o=options: lycoris_case("sdxl", a, o, cache, folder))
        )
    for algo, options, option in (("lokr", {}, "—"), ("locon", {"dora_wd": True}, "dora"), ("ia3", {}, "—")):
        found.append(
            (algo, option, "flux", "lycoris kohya", lambda a=algo, o=options: lycoris_case("flux", a, o, cache, folder))
        )
    for algo in ("locon", "loha"):
        found.append(
            (
                algo,
                "lycoris_ names",
                "sd1",
                "lycoris standalone",
                lambda a=algo: lycoris_case("sd1", a, {}, cache, folder, True),
            )
        )
    found.append(
        (
            "lora",
            "te: q,v only",
            "sd1",
            "lycoris kohya",
            lambda: lycoris_case("sd1", "locon", {"preset": "qv"}, cache, folder),
        )
    )
    for kind in PEFT_KINDS:
        found.append(
            (
                kind,
                "folder",
                "sd1",
                "peft save_pretrained",
                lambda k=kind: check_peft_folder(fresh("sd1", cache), k, folder / f"peft-{k}"),
            )
        )
    for family in PRESETS:
        sub = folder / f"diffusers-{family}"
        sub.mkdir()
        found.append(
            (
                "lora",
                "unet/transformer + te",
                family,
                "diffusers save_lora_weights",
                lambda f=family, d=sub: check_diffusers_file(fresh(f, cache), lambda: fresh(f, cache), d),
            )
        )
    return found


def main() -> None:
    """Run every case and print the markdown table."""
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        cache, folder = Path(tmp) / "cache", Path(tmp) / "files"
        folder.mkdir()
        for name in PRESETS.values():
            ensure_preset(name, cache)
        print("| algorithm | option | family | producer | read (rel. err) | composed fused | unfused | verdict |")
        print("|---|---|---|---|---|---|---|---|")
        for algo, option, family, producer, run in rows(cache, folder):
            try:
                errors = run()
            except ComposerError as exc:
                print(
                    f"| {algo} | {option} | {family} | {producer} | — | — | — | refused: `{type(exc).__name__}` "
                    f"({exc.reason[:90]}…) |"
                )
                continue
            cells = [f"{errors[k]:.1e}" if k in errors else "—" for k in ("layer", "fused", "unfused")]
            verdict = "exact" if max(errors.values()) <= TOL else "MISMATCH"
            print(f"| {algo} | {option} | {family} | {producer} | {' | '.join(cells)} | {verdict} |")


if __name__ == "__main__":
    main()
