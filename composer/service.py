"""A thread-safe composition service for long-running front ends (the Gradio app, servers).

A pipeline holds one composition at a time, so two requests composing on one pipeline at once would see each other's
adapters. The service keeps a pool of :class:`~composer.facade.Composer` workers, one pipeline each: a request
borrows a worker, composes, generates, clears and gives it back, so concurrent requests never share a pipeline
mid-request. It also gives the library views a UI shows (entries, search, rescan, previews checked to stay inside
the library) and the retrieval scores for a prompt. Everything it returns is plain data and every error it raises is
a :class:`ComposerError` (re-exported here), so a front end needs no other package.
"""

from __future__ import annotations

import itertools
import os
import queue
import shutil
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from composer.checkpoints.files import list_model_files
from composer.facade import DEFAULT_MAX_LORAS, Composer, CompositionResult
from composer.presets import refuse_checkpoint_options
from composer.prompts import LoraTag, adapter_request
from composer.restoration.restore import Restorer, RestoreResult
from composer.settings import default_model
from fusion.cfg_branches import Branches
from fusion.errors import ComposerError, CompositionError, UnsafePathError
from fusion.strategies import BUILTIN, get_strategy
from weights_index.catalog_pool import open_library

AUTO = "auto"

__all__ = [
    "AUTO",
    "DEFAULT_MAX_LORAS",
    "ComposerError",
    "CompositionService",
    "LibraryItem",
    "LoraTag",
    "RestoreResult",
    "adapter_request",
    "available_methods",
]


@dataclass(frozen=True)
class LibraryItem:
    """What a library browser shows for one adapter (``preview`` is checked to lie inside the library)."""

    name: str
    title: str
    family: str
    format: str | None
    rank: int | None
    trigger_words: tuple[str, ...]
    category: str | None
    preview: Path | None
    relpath: str
    error: str | None


def available_methods() -> list[str]:
    """Composition methods whose implementation is installed, in the built-in order."""
    names = []
    for name in BUILTIN:
        try:
            get_strategy(name)
        except ComposerError:
            continue
        names.append(name)
    return names


class CompositionService:
    """Compose-and-generate for many concurrent callers over ``workers`` pipelines of ``model``, with ``library``.

    Each request's images go to their own folder under ``out`` (``<time>-<n>/<seed>-<i>.png`` plus sidecars).
    Adapters are taken from the library by name only: a file path in a request (a prompt tag or the editor) is
    refused before any file is looked at. Previews the catalog extracted into its own folder are offered as copies
    under ``out/previews``, so nothing under the catalog folder ever needs serving.
    """

    def __init__(
        self,
        model: str | None = None,
        library: str | Path | None = None,
        *,
        out: str | Path = Path("out") / "app",
        workers: int = 1,
        device: str | torch.device | None = None,
        torch_dtype: torch.dtype | None = None,
        models_dir: str | Path | None = None,
        vae: str | Path | None = None,
        text_encoders: str | Path | None = None,
    ) -> None:
        if workers < 1:
            raise ComposerError(f"workers must be at least 1, got {workers}")
        self.model = model or default_model()
        self.startup_model = self.model
        """The model the service started on: always on offer in the picker, the only one ``vae`` and
        ``text_encoders`` apply to."""
        refuse_checkpoint_options(self.model, vae, text_encoders)
        self.workers = workers
        self.out = Path(out).resolve()
        self.models_dir = None if models_dir is None else Path(models_dir).expanduser()
        self._library_dir = None if library is None else Path(library)
        self._options = {"device": device, "torch_dtype": torch_dtype}
        self._startup_parts = {"vae": vae, "text_encoders": text_encoders}
        self._workers: queue.Queue[Composer] = queue.Queue()
        for _ in range(workers):
            self._workers.put(self._worker(self.model))
        self._counter = itertools.count()
        self._lock = threading.Lock()
        self._library: Any = None
        self._restorers: dict[int, Restorer] = {}

    # ---------------------------------------------------------------------------------------------- workers
    def _worker(self, model: str) -> Composer:
        """A worker on ``model``; ``--vae`` / ``--text-encoders`` go with the startup checkpoint only."""
        options: dict[str, Any] = dict(self._options)
        if model == self.startup_model:
            options |= self._startup_parts
        return Composer(model, self._library_dir, library_only=True, **options)

    def available_models(self) -> list[str]:
        """What the model picker offers: the startup model, then the checkpoint files in ``models_dir``."""
        files = [] if self.models_dir is None else [str(p) for p in list_model_files(self.models_dir)]
        return [self.startup_model, *[f for f in files if f != self.startup_model]]

    def use_model(self, model: str) -> str:
        """Switch every worker to ``model``, one of :meth:`available_models` (anything else is refused before a file
        is looked at); waits for running requests to finish and loads the new pipelines before switching, so a model
        that fails to load raises and leaves the service on its current model. Returns the model."""
        if model == self.model:
            return model
        if model not in self.available_models():
            raise UnsafePathError(
                "models are picked from the list the app offers", hint="put the checkpoint in the --models folder"
            )
        held = [self._workers.get() for _ in range(self.workers)]
        try:
            fresh = [self._worker(model) for _ in held]
            for composer in fresh:
                _ = composer.pipe
            held = fresh
            self.model = model
            self._restorers.clear()
        finally:
            for composer in held:
                self._workers.put(composer)
        return model

    @contextmanager
    def _borrow(self) -> Iterator[Composer]:
        """Hold one worker (its pipeline) for the duration of a request."""
        composer = self._workers.get()
        try:
            yield composer
        finally:
            self._workers.put(composer)

    def warm(self) -> None:
        """Load every worker's pipeline now rather than on its first request."""
        held = [self._workers.get() for _ in range(self._workers.qsize())]
        try:
            for composer in held:
                _ = composer.pipe
        finally:
            for composer in held:
                self._workers.put(composer)

    def compose(
        self,
        prompt: str,
        adapters: str | Sequence[LoraTag] | None = AUTO,
        *,
        method: str = "merge",
        steps: int | None = None,
        seed: int = 0,
        num_images: int = 1,
        negative_prompt: str = "",
        guidance_scale: float | None = None,
        progress: bool = False,
        plot: bool = False,
        branches: Branches = "both",
        max_loras: int | None = None,
    ) -> CompositionResult:
        """Compose ``adapters`` (``"auto"``, requests, or None for the base model) and generate; files are saved.
        ``plot`` also writes the composition's plots (``result.plots``: retrieval scores, weight table, gates);
        ``branches="conditional"`` puts the adapters on CFG's conditional branch only (a mapping: per adapter);
        ``max_loras`` caps the automatic pick (``result.rejected``: what the prompt names but was left out, why)."""
        if not prompt.strip():
            raise CompositionError("the prompt is empty", hint="type what the image should show")
        loras: Any = AUTO if adapters == AUTO else list(adapters or ())
        folder = self._folder()
        with self._borrow() as composer:
            return composer.run(
                prompt,
                loras=loras or None,
                method=method,
                steps=steps,
                seed=seed,
                num_images=num_images,
                negative_prompt=negative_prompt,
                guidance_scale=guidance_scale,
                out=folder,
                branches=branches,
                progress=progress,
                plot=folder / "plots" if plot else None,
                max_loras=max_loras,
            )

    def spectra(self, prompts: Sequence[str] | None = None, steps: int = 4) -> Any:
        """CMLoRA frequency analysis of the library on a worker's pipeline: ΔH per adapter stored in the catalog,
        radial-profile plots written under the output folder
        (an :class:`composer.analysis.frequency.AnalysisReport`)."""
        from composer.analysis.frequency import analyze_library

        library = self._require_library()
        folder = self._folder() / "spectra"
        with self._borrow() as composer:
            return analyze_library(
                library,
                composer.pipe,
                model=composer.model,
                prompts=list(prompts or []) or None,
                steps=steps,
                plot_dir=folder,
            )

    def _folder(self) -> Path:
        """A fresh output folder for one request."""
        with self._lock:
            return self.out / f"{time.strftime('%Y%m%d-%H%M%S')}-{next(self._counter):04d}"

    def restore(
        self,
        image: Any,
        restoration: Sequence[LoraTag],
        style: Sequence[LoraTag] = (),
        *,
        method: str = "merge",
        task: str | None = None,
        steps: int | None = None,
        seed: int = 0,
        progress: bool = False,
    ) -> RestoreResult:
        """Restore ``image`` (a PIL image or a path) with ``restoration`` adapters composed with ``style`` adapters
        by ``method``; the prompt is ``task`` or the restoration adapters' task prompts. The image is saved."""
        if not restoration:
            raise CompositionError("pick at least one restoration adapter", hint="restoration adapters carry a task")
        folder = self._folder()
        with self._borrow() as composer:
            restorer = self._restorers.get(id(composer))
            if restorer is None:
                restorer = self._restorers.setdefault(id(composer), Restorer.sharing(composer))
            return restorer.restore(
                image,
                list(restoration),
                list(style) or None,
                method=method,
                task=(task or "").strip() or None,
                steps=steps,
                seed=seed,
                out=folder,
                progress=progress,
            )

    def restoration_names(self) -> list[str]:
        """Library adapters that restore rather than add a concept: a ``task_prompt`` or ``needs_input_image`` in
        their file metadata (made for this service's model family)."""
        names = set(self.adapter_names())
        return [
            e.name
            for e in self._require_library().entries()
            if e.name in names
            and (
                (e.header_metadata.get("task_prompt") or "").strip()
                or str(e.header_metadata.get("needs_input_image", "")).strip().lower() in ("1", "true", "yes")
            )
        ]

    def rank(self, prompt: str, k: int = 10) -> list[dict[str, Any]]:
        """Every signal's score for the ``k`` best adapters for ``prompt`` (needs a library), best first."""
        self._require_library()
        with self._borrow() as composer:
            return composer.rank(prompt, k=k)

    # ---------------------------------------------------------------------------------------------- library
    @property
    def library_root(self) -> Path | None:
        """The library folder (resolved), or None when the service has no library."""
        return None if self._library_dir is None else self._require_library().root

    def _require_library(self) -> Any:
        if self._library_dir is None:
            raise ComposerError("no library is open", hint="start the app with --library DIR")
        with self._lock:
            if self._library is None:
                self._library = open_library(self._library_dir)
        return self._library

    def rescan(self) -> dict[str, Any]:
        """Bring the catalog up to date with the folder; returns what changed."""
        return self._require_library().scan().to_json()

    def entries(self, query: str = "") -> list[LibraryItem]:
        """Every adapter (by name), or the full-text matches for ``query`` (best first)."""
        library = self._require_library()
        found = [hit.entry for hit in library.search(query, limit=200)] if query.strip() else library.entries()
        return [self._item(entry) for entry in found]

    def adapter_names(self) -> list[str]:
        """Names of the readable adapters made for this service's model family (all when unknown)."""
        if self._library_dir is None:
            return []
        with self._borrow() as composer:
            family = composer.family
        return [e.name for e in self._require_library().entries() if e.ok and family in ("unknown", e.family)]

    def details(self, name: str) -> dict[str, Any]:
        """Everything the catalog knows about one adapter (JSON-ready), with a preview only if inside the library."""
        entry = self._require_library().get(name)
        document = entry.to_json()
        preview = self._item(entry).preview
        document["preview"] = None if preview is None else str(preview)
        return document

    def _item(self, entry: Any) -> LibraryItem:
        candidates = [entry.preview, *entry.metadata.previews]
        preview = next((p for p in (self.inside_library(c) for c in candidates if c) if p is not None), None)
        if preview is not None and preview.is_relative_to(self.catalog_folder):
            preview = self._served_copy(preview)
        return LibraryItem(
            name=entry.name,
            title=entry.title,
            family=entry.family,
            format=entry.format,
            rank=entry.rank,
            trigger_words=tuple(entry.trigger_words),
            category=entry.metadata.category,
            preview=preview,
            relpath=entry.relpath,
            error=entry.error,
        )

    @property
    def catalog_folder(self) -> Path:
        """The folder holding the catalog database and its extracted thumbnails: never served."""
        return self._require_library().db_path.parent

    def _served_copy(self, preview: Path) -> Path:
        """A copy of a catalog thumbnail under ``out/previews`` (names are content hashes: copied once)."""
        target = self.out / "previews" / preview.name
        if not target.is_file():
            target.parent.mkdir(parents=True, exist_ok=True)
            partial = target.with_suffix(".partial")
            shutil.copyfile(preview, partial)
            partial.replace(target)
        return target

    def inside_library(self, path: str | Path) -> Path | None:
        """``path``'s real location when it is an existing file inside the library (symlinks resolved), else None."""
        try:
            return self.library_file(path)
        except UnsafePathError:
            return None

    def library_file(self, path: str | Path) -> Path:
        """The real path of a file in the library, given relative to it or absolute; raises
        :class:`UnsafePathError` for ``..`` escapes, absolute paths elsewhere, symlinks leaving it, or no file."""
        root = self._require_library().root
        candidate = Path(path)
        if not candidate.is_absolute():
            candidate = root / candidate
        real = Path(os.path.realpath(candidate))  # never fails, even on a symlink loop
        if not (real.is_relative_to(root) and candidate.absolute().is_relative_to(root)) or not real.is_file():
            raise UnsafePathError(
                "not a file inside the library", path=path, hint=f"only files under {root} are served"
            )
        return real
