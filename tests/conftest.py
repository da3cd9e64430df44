"""Shared test setup: offline hub, a per-session preset cache, tiny pipeline fixtures and the ``gpu`` skip hook.

Tests marked ``gpu`` run on CUDA. Those that take their device from the ``gpu_device`` fixture follow
``LORA_COMPOSER_TEST_DEVICE`` instead (default ``cuda``; ``cpu`` proves them on a machine without a GPU).

Pipelines: ``tiny_sd`` / ``tiny_sdxl`` / ``tiny_flux`` / ``tiny_kontext`` return a FRESH pipeline in every test
(tests may mutate them freely): each is loaded from the session cache once per worker and every test gets its own
deep copy of the modules and scheduler (tokenizers, which no test mutates, are shared); ``tiny_sd_path`` etc. are
the cached folders, built once per session; ``fresh_pipeline(name)`` makes more such copies for a test that needs
several independent pipelines (a reference next to ours). Kontext runs need
``composer.presets.kontext_call_kwargs(h, w)`` or they silently run at 1024².

Libraries: ``example_library`` is a private copy (per test module) of the demo library that
``examples/make_library.py`` writes for tiny-sd, built once per run.
Shared helper modules live next to this file (``example_scripts``, ``producers``, ``format_writers``): pytest
puts this folder on ``sys.path``.
"""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"  # before any Hugging Face library is imported: tests never reach a network
os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"
os.environ["LORA_COMPOSER_MODEL"] = "tiny-sd"  # the machinery tests use the tiny random presets; toy tests name toy-sd

import copy
import copyreg
import gc
import shutil
from collections import OrderedDict
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from example_scripts import build_example_library
from filelock import FileLock

from composer.settings import CACHE_ENV

if TYPE_CHECKING:  # torch and diffusers are imported where tests run, not in xdist's controller (see pytest_configure)
    import torch
    from diffusers import DiffusionPipeline


def pytest_configure(config: pytest.Config) -> None:
    """Run torch single-threaded (``LORA_COMPOSER_TEST_THREADS`` overrides) in every process that runs tests, and
    keep the cyclic garbage collector off while the tests are collected.

    The test models are tiny, so intra-op threads buy nothing, and on a shared 2-core machine spinning OpenMP
    workers make a 30 ms tiny-pipeline call take 0.3-1 s. One thread keeps timings stable. xdist's controller runs no
    test and imports no torch: importing it there (about 6 s on 2 cores) would hold back the start of every worker.

    Collecting imports torch, diffusers, transformers and gradio, whose millions of objects live as long as the
    process: with the collector on, it walks them again and again during the imports (about 2 s of each worker's
    16-19 s of collection) for about 13 MB of garbage. :func:`pytest_collection_finish` turns it back on.
    """
    if getattr(config.option, "numprocesses", None) and not hasattr(config, "workerinput"):
        return
    gc.disable()
    import torch

    torch.set_num_threads(int(os.environ.get("LORA_COMPOSER_TEST_THREADS", "1")))


TEST_DEVICE_ENV = "LORA_COMPOSER_TEST_DEVICE"
"""Environment variable naming the device of the ``gpu`` tests that take the ``gpu_device`` fixture."""


def _test_device() -> torch.device:
    import torch

    return torch.device(os.environ.get(TEST_DEVICE_ENV, "cuda"))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Run the tests marked ``slow`` first; skip tests marked ``gpu`` when CUDA is unavailable, except those on
    ``gpu_device`` pointed off CUDA.

    Slow tests first balances ``-n 2 --dist worksteal``: a worker takes its half of the collection in order and an
    idle worker steals from the end of the other's queue, so with the long tests at the front the run ends on short
    ones instead of one worker waiting out a long test alone.
    """
    import torch

    items.sort(key=lambda item: "slow" not in item.keywords)  # stable: the rest keep their order
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    elsewhere = _test_device().type != "cuda"
    for item in items:
        if "gpu" in item.keywords and not (elsewhere and "gpu_device" in getattr(item, "fixturenames", ())):
            item.add_marker(skip)


GC_THRESHOLDS = (50_000, 20, 20)
"""Python's cyclic collector thresholds while tests run (its defaults are 700, 10, 10)."""


def pytest_collection_finish(session: pytest.Session) -> None:
    """Move everything imported so far out of the cyclic collector's reach, let it run less often, and turn it back
    on (:func:`pytest_configure` turned it off for the collection).

    torch, diffusers, transformers and gradio leave millions of long-lived objects behind their imports, and with the
    default thresholds the collector walked them again and again: about 13% of a single-process run of tests/fusion
    and tests/weights_index (19-21 s of 146-155 s, measured with ``gc.callbacks``), about 6 s with these settings
    (resident memory 0.92 -> 1.05 GB). Cycles are still collected, only in larger batches.
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)
    gc.enable()


@pytest.fixture(scope="session")
def gpu_device() -> torch.device:
    """The device of the ``gpu`` tests: ``$LORA_COMPOSER_TEST_DEVICE``, CUDA by default."""
    return _test_device()


def _run_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder every xdist worker of this run shares (the parent of the workers' temp folders), which lives as long
    as the run; the session's own temp folder when there are no workers (xdist names a worker in
    ``PYTEST_XDIST_WORKER``; its ``worker_id`` fixture does not exist when pytest runs with ``-p no:xdist``)."""
    shared = tmp_path_factory.getbasetemp()
    return shared.parent if os.environ.get("PYTEST_XDIST_WORKER") else shared


@pytest.fixture(scope="session", autouse=True)
def preset_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The presets cache folder for this run, shared by the xdist workers (each preset is built once per run, the
    cache writes atomically); ``LORA_COMPOSER_CACHE`` points at a per-worker temp dir whose ``presets`` is this
    folder, so everything else cached there stays the worker's own."""
    from composer.settings import preset_cache_root

    root = tmp_path_factory.mktemp("lora-composer-cache")
    shared = _run_folder(tmp_path_factory) / "presets"
    shared.mkdir(exist_ok=True)
    (root / "presets").symlink_to(shared, target_is_directory=True)
    previous = os.environ.get(CACHE_ENV)
    os.environ[CACHE_ENV] = str(root)
    yield preset_cache_root()
    if previous is None:
        os.environ.pop(CACHE_ENV, None)
    else:
        os.environ[CACHE_ENV] = previous


def _ensure(name: str, cache: Path) -> Path:
    """The cache folder of a built-in preset, built on first use by one worker while the others wait
    (``composer.presets.ensure_preset``)."""
    from composer.presets import ensure_preset

    with FileLock(cache / f".{name}.lock"):
        return ensure_preset(name, cache)


def _reduce_ordered_dict(mapping: OrderedDict) -> tuple:
    """What ``OrderedDict.__reduce__`` returns (class, no arguments, instance attributes, its items), without the
    detour through ``copyreg._slotnames`` that the built-in reduce takes on every call: Python cannot cache the slot
    names on the built-in class, so each call recomputes them and raises and catches an error. Every torch module
    holds about ten OrderedDicts (its hook tables), and registering this reducer makes the pipeline copies below a
    third faster (tiny-sd: 105 -> 67 ms) with the same result."""
    return OrderedDict, (), vars(mapping) or None, None, iter(mapping.items())


copyreg.pickle(OrderedDict, _reduce_ordered_dict)

_LOADED: dict[str, DiffusionPipeline] = {}
"""Each preset as loaded once in this worker; tests only ever see copies."""


def _fresh(name: str, folder: Path) -> DiffusionPipeline:
    """A new, independent copy of a cached preset with progress bars off: its modules and scheduler deep-copied
    from the preset as loaded (a tenth of the time of loading it again)."""
    import torch

    from composer.presets import load_preset

    if name not in _LOADED:
        _LOADED[name] = load_preset(name, cache_dir=folder.parent)
    loaded = _LOADED[name]
    parts = {
        key: copy.deepcopy(value) if isinstance(value, torch.nn.Module) or key == "scheduler" else value
        for key, value in loaded.components.items()
    }
    pipe = type(loaded)(**parts, **{k: v for k, v in loaded.config.items() if not k.startswith("_") and k not in parts})
    pipe.register_to_config(_name_or_path=loaded.name_or_path)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture
def fresh_pipeline(preset_cache: Path) -> Callable[[str], DiffusionPipeline]:
    """A maker of fresh copies of a built-in preset by name (``fresh_pipeline("tiny-sd")``), for tests that need
    several independent pipelines: each call is a copy like ``tiny_sd``'s, not a load of the preset again."""

    def make(name: str) -> DiffusionPipeline:
        return _fresh(name, _ensure(name, preset_cache))

    return make


@pytest.fixture(scope="session")
def tiny_sd_path(preset_cache: Path) -> Path:
    """Cache folder of the ``tiny-sd`` preset, built once per session."""
    return _ensure("tiny-sd", preset_cache)


@pytest.fixture
def tiny_sd(tiny_sd_path: Path) -> DiffusionPipeline:
    """A fresh tiny StableDiffusionPipeline (SD 1.x family), loaded from the session cache for this test."""
    return _fresh("tiny-sd", tiny_sd_path)


@pytest.fixture(scope="session")
def tiny_sdxl_path(preset_cache: Path) -> Path:
    """Cache folder of the ``tiny-sdxl`` preset, built once per session."""
    return _ensure("tiny-sdxl", preset_cache)


@pytest.fixture
def tiny_sdxl(tiny_sdxl_path: Path) -> DiffusionPipeline:
    """A fresh tiny StableDiffusionXLPipeline, loaded from the session cache for this test."""
    return _fresh("tiny-sdxl", tiny_sdxl_path)


@pytest.fixture(scope="session")
def tiny_flux_path(preset_cache: Path) -> Path:
    """Cache folder of the ``tiny-flux`` preset, built once per session."""
    return _ensure("tiny-flux", preset_cache)


@pytest.fixture
def tiny_flux(tiny_flux_path: Path) -> DiffusionPipeline:
    """A fresh tiny FluxPipeline, loaded from the session cache for this test."""
    return _fresh("tiny-flux", tiny_flux_path)


@pytest.fixture(scope="session")
def tiny_kontext_path(preset_cache: Path) -> Path:
    """Cache folder of the ``tiny-flux-kontext`` preset, built once per session."""
    return _ensure("tiny-flux-kontext", preset_cache)


@pytest.fixture
def tiny_kontext(tiny_kontext_path: Path) -> DiffusionPipeline:
    """A fresh tiny FluxKontextPipeline; call it with ``**kontext_call_kwargs(h, w)`` to keep the size."""
    return _fresh("tiny-flux-kontext", tiny_kontext_path)


@pytest.fixture
def toy_sd(preset_cache: Path) -> DiffusionPipeline:
    """A fresh toy-sd pipeline (the trained toy-world model shipped with the package), copied from the one this
    worker loaded."""
    return _fresh("toy-sd", preset_cache / "toy-sd")


@pytest.fixture(scope="session")
def toy_library_files(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """The toy world's LoRA library (``composer.toyworld.library.build_toy_library``), built once per worker."""
    from composer.toyworld.library import build_toy_library

    return build_toy_library(tmp_path_factory.mktemp("toy") / "library")


@pytest.fixture
def toy_quality_pipeline(
    toy_sd: DiffusionPipeline, toy_library_files: list[Path], monkeypatch: pytest.MonkeyPatch
) -> DiffusionPipeline:
    """A composable toy-sd copy with every toy library adapter registered, which
    ``benchmarks.composition_quality`` runs on instead of loading toy-sd and building the library again."""
    import torch

    from benchmarks import composition_quality
    from composer.mixin import make_composable

    pipe = make_composable(toy_sd)
    with torch.no_grad():
        for path in toy_library_files:
            pipe.add_adapter_file(path, name=path.stem)
    names = [path.stem for path in toy_library_files]
    monkeypatch.setattr(composition_quality, "toy_pipeline", lambda _library: (pipe, names))
    return pipe


@pytest.fixture(scope="session")
def example_library_build(tmp_path_factory: pytest.TempPathFactory, tiny_sd_path: Path) -> Path:
    """The demo library as ``examples/make_library.py`` writes it for tiny-sd, built once per run and shared by the
    xdist workers (read-only: tests take a copy through ``example_library``)."""
    shared = _run_folder(tmp_path_factory)
    out = shared / "example-library"
    with FileLock(shared / "example-library.lock"):
        if not (out / ".complete").is_file():
            build_example_library(out)
    return out


@pytest.fixture(scope="module")
def example_library(example_library_build: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """This test module's own copy of the demo library (tests in a module share its catalog)."""
    own = tmp_path_factory.mktemp("library") / "library"
    shutil.copytree(example_library_build, own)
    return own
