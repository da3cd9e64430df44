"""The `Composer` facade: one object that turns "a prompt + which adapters" into saved images.

It owns the whole request — load the model (preset, folder or hub id), open the library catalog (incremental
rescan), pick adapters (explicit names, ``<lora:…>`` prompt tags, or ``loras="auto"`` through the retriever),
read them (host-memory cache), compose them with the chosen method through the mixin, generate, and save each
image with its A1111 ``parameters`` chunk and JSON sidecar. The CLI and the app are thin layers over it.

Adapters live in the process-wide :data:`composer.mixin.ADAPTER_CACHE` (LRU under its byte budget, keyed by file
identity: resolved path, size, mtime), never on the pipeline between requests: a request registers what it uses and
unregisters it when done, so host memory stays bounded however many distinct adapters are used, and an edited file
is read again. The library catalog is opened once per process (:func:`weights_index.open_library`).
"""

from __future__ import annotations

import inspect
import logging
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, ClassVar

import torch
from PIL import Image

from composer.adapter_sources import locate, refuse_unknown
from composer.analysis.run_plots import RunPlotData, write_run_plots
from composer.calibration_store import Calibration, model_identity
from composer.images import GenerationRecord, save_image
from composer.mixin import ComposableMixin, make_composable
from composer.presets import KNOWN_MODELS, PRESETS, TOY_PRESET, kontext_call_kwargs, load_preset, preset_family
from composer.prompts import LoraTag, extract_lora_tags, parse_lora_list
from composer.results import ChosenAdapter, CompositionResult, RejectedAdapter
from composer.settings import default_model
from fusion.adapters import Adapter
from fusion.errors import CompositionError
from retrieval.retriever import DEFAULT_MAX_ADAPTERS
from weights_index.catalog_pool import open_library

logger = logging.getLogger(__name__)

DEFAULT_MAX_LORAS = DEFAULT_MAX_ADAPTERS
"""Most adapters ``loras="auto"`` picks when ``max_loras`` is not given (one per composition category)."""

DEFAULT_STEPS = {"sd1": 20, "sd2": 20, "sdxl": 25, "flux": 28}
PRESET_STEPS = 4
"""Steps the offline presets run by default."""
TINY_SIZE = 64
TOY_GUIDANCE = 3.0
"""CFG scale toy-sd is evaluated and used at by default (not the pipeline default, 7.5, it was never tuned for)."""


def _cap(max_loras: object) -> int | None:
    """``max_loras`` checked: None (the retriever's default) or a whole number ≥ 1."""
    if max_loras is None:
        return None
    if isinstance(max_loras, bool) or not isinstance(max_loras, int) or max_loras < 1:
        raise CompositionError(
            f"max_loras must be a whole number of at least 1, got {max_loras!r}",
            hint="CLI: --max-loras N; the app: the 'Most adapters' slider",
        )
    return max_loras


def _accepts(pipe: Any, argument: str) -> bool:
    """Whether the pipeline's own ``__call__`` (the one the mixin's wraps) takes ``argument`` (img2img and
    InstructPix2Pix take no height/width)."""
    return argument in inspect.signature(super(ComposableMixin, pipe).__call__).parameters


class Composer:
    """Retrieve, compose and generate: ``Composer(model="tiny-sd", library=DIR).run("a prompt", loras="auto")``.

    Adapters are named by catalog name or, unless ``library_only`` (set when serving requests from others), by file
    path; with ``library_only`` anything shaped like a path is refused before the file system is consulted.
    ``calibrated_defaults`` gives adapters requested without a weight their calibrated default weight
    (:meth:`default_weights`); off by default, since on toy-sd the calibration undershoots characters, styles and
    backgrounds (docs/methods.md#calibration)."""

    step_defaults: ClassVar[Mapping[str, int]] = DEFAULT_STEPS
    """Steps per model family when a run does not say (the offline presets run :data:`PRESET_STEPS`)."""
    fallback_steps: ClassVar[int] = 20
    """Steps for a family :attr:`step_defaults` does not list."""

    def __init__(
        self,
        model: str | None = None,
        library: str | Path | None = None,
        *,
        device: str | torch.device | None = None,
        torch_dtype: torch.dtype | None = None,
        library_only: bool = False,
        vae: str | Path | None = None,
        text_encoders: str | Path | None = None,
        calibrated_defaults: bool = False,
    ) -> None:
        self.model = model or default_model()
        self.calibrated_defaults = calibrated_defaults
        self.vae = vae
        self.text_encoders = text_encoders
        self.library_dir = None if library is None else Path(library)
        self.library_only = library_only
        self.device = device
        self.torch_dtype = torch_dtype
        self._pipe: Any = None
        self._library: Any = None
        self._retriever: Any = None
        self._calibrator: Any = None

    @property
    def pipe(self) -> Any:
        """The composable pipeline (loaded on first use)."""
        if self._pipe is None:
            pipe = load_preset(
                self.model,
                torch_dtype=self.torch_dtype,
                device=self.device,
                vae=self.vae,
                text_encoders=self.text_encoders,
            )
            self._pipe = make_composable(pipe)
        return self._pipe

    @property
    def family(self) -> str:
        """The base-model family of the loaded pipeline."""
        return preset_family(self.pipe)

    @property
    def library(self) -> Any:
        """The library catalog (opened and rescanned once per process); None when no library was given."""
        if self._library is None and self.library_dir is not None:
            self._library = open_library(self.library_dir)
        return self._library

    @property
    def retriever(self) -> Any:
        """The library's retriever, built once per Composer (it caches adapter responses and text encodings)."""
        if self._retriever is None:
            from retrieval.retriever import Retriever

            self._retriever = Retriever(self.library, pipe=self.pipe)
        return self._retriever

    def choose(
        self,
        prompt: str,
        loras: str | Sequence[str | LoraTag] | Mapping[str, Any] | None,
        *,
        max_loras: int | None = None,
        rejected: list[RejectedAdapter] | None = None,
    ) -> tuple[str, list[ChosenAdapter]]:
        """Resolve the adapters for ``prompt``: prompt tags first, then ``loras`` (auto, a list spec, a mapping, or
        names / :class:`~composer.prompts.LoraTag` items carrying block weights and schedules).

        Returns the prompt without ``<lora:…>`` tags (with trigger words added for automatically chosen adapters)
        and the chosen adapters. With ``loras="auto"``, ``max_loras`` caps how many are picked (default: the
        retriever's, :data:`DEFAULT_MAX_LORAS`) and ``rejected``, when given, receives the adapters found named but
        left out. ``max_loras`` with any other ``loras`` is a :class:`~fusion.errors.CompositionError`.
        """
        auto = isinstance(loras, str) and loras.strip().lower() == "auto"
        if max_loras is not None and not auto:
            raise CompositionError(
                f"max_loras={max_loras!r}: --max-loras only applies with --loras auto (it caps the automatic pick)",
                hint="add --loras auto (the app: the 'auto' mode), or leave the cap out",
            )
        prompt, tags = extract_lora_tags(prompt)
        chosen = {tag.name: self._from_tag(tag, "prompt tag") for tag in tags}
        if auto:
            prompt = self._auto(prompt, chosen, _cap(max_loras), rejected if rejected is not None else [])
        elif isinstance(loras, str):
            for tag in parse_lora_list(loras):
                chosen.setdefault(tag.name, self._from_tag(tag, "explicit"))
        elif isinstance(loras, Mapping):
            for name, weight in loras.items():
                chosen.setdefault(name, ChosenAdapter(LoraTag(name, weight), reasons=["named by the caller"]))
        elif loras:
            for item in loras:
                if isinstance(item, LoraTag):
                    chosen.setdefault(item.name, self._from_tag(item, "explicit"))
                else:
                    request = LoraTag(item, 1.0, weight_given=False)
                    chosen.setdefault(item, ChosenAdapter(request, reasons=["named by the caller"]))
        return prompt, list(chosen.values())

    @staticmethod
    def _from_tag(tag: LoraTag, source: str) -> ChosenAdapter:
        return ChosenAdapter(
            tag,
            source=source,
            reasons=["named in a <lora:…> prompt tag" if source == "prompt tag" else "named by the caller"],
        )

    def _auto(
        self, prompt: str, chosen: dict[str, ChosenAdapter], cap: int | None, rejected: list[RejectedAdapter]
    ) -> str:
        if self.library is None:
            raise CompositionError("loras='auto' needs a library", hint="pass library=DIR (CLI: --library DIR)")
        picks = self.retriever.select(prompt, family=self.family, k=cap)
        left_out = [
            RejectedAdapter(r.name, r.reason, r.lost_to, r.capped)
            for r in self.retriever.rejected
            if r.name not in chosen
        ]
        for item in left_out:
            logger.info("left out %s: %s", item.name, item.reason)
        rejected += left_out
        for pick in picks:
            if pick.name in chosen:
                continue
            chosen[pick.name] = ChosenAdapter(
                LoraTag(pick.name, pick.weight, weight_given=False),
                source="auto",
                score=pick.score,
                reasons=list(pick.reasons),
                trigger_words=list(pick.trigger_words),
            )
            missing = [w for w in pick.missing_triggers if w.lower() not in prompt.lower()]
            if missing:
                prompt = f"{prompt}, {', '.join(missing)}"
        return prompt

    def calibration(self, name: str) -> Calibration:
        """The calibrated default weight of the adapter ``name`` (catalog name or, unless ``library_only``, file path)
        on this model: from the catalog when stored for this file and model, else measured now (and stored)."""
        from composer.calibration import Calibrator, catalog_calibration, file_calibration

        if self._calibrator is None:
            self._calibrator = Calibrator(self.pipe)
        identity = model_identity(self.pipe, self.model)
        source = self._locate(name)
        if isinstance(source, Path):
            return file_calibration(self._calibrator, source, identity)
        return catalog_calibration(self._calibrator, self.library, source, identity)

    def default_weights(self, chosen: Sequence[ChosenAdapter]) -> None:
        """Give every adapter whose request names no weight (picked by ``loras="auto"``, ``<lora:name>``, a bare
        name) its calibrated default weight. Where the model offers no guidance signal to calibrate against (FLUX.1),
        the adapter keeps the weight it had (its card's, else 1) and its reasons say why."""
        from composer.calibration import apply_calibrated_weights

        apply_calibrated_weights(chosen, self.calibration)

    def _refuse_unknown(self, chosen: Sequence[ChosenAdapter]) -> None:
        """Raise :class:`~fusion.errors.UnknownAdapterError` for a chosen adapter that is neither registered on the
        pipeline, an adapter file, nor in the library, before a model is loaded for a request that cannot run."""
        registered = self._pipe.adapters if self._pipe is not None else {}
        names = [item.name for item in chosen]
        refuse_unknown(names, self.library, known=registered, library_only=self.library_only)

    def _locate(self, name: str) -> Path | Any:
        """Where the adapter ``name`` comes from (:func:`composer.adapter_sources.locate`)."""
        return locate(name, self.library, library_only=self.library_only)

    def _load(self, item: ChosenAdapter) -> Adapter:
        """The adapter ``item`` names (a file path or a catalog name), read for this pipeline (from the adapter
        cache while its file is unchanged); fills in the item's path, hash and trigger words."""
        entry = self._locate(item.name)
        if isinstance(entry, Path):
            item.path = str(entry)
            return self.pipe.read_adapter_file(entry)
        item.path = str(entry.path)
        item.hash = entry.metadata.hashes.get("AutoV2")
        item.trigger_words = item.trigger_words or list(entry.trigger_words)
        return self.pipe.read_catalog_adapter(self.library, entry)

    @contextmanager
    def composing(self, chosen: Sequence[ChosenAdapter]) -> Iterator[Any]:
        """The pipeline with ``chosen`` registered for one request; on exit the composition is cleared and the
        adapters this request registered are unregistered (they stay in the byte-bounded adapter cache, not on the
        pipeline). Adapters the caller registered on ``pipe`` themselves are used as they are and kept."""
        pipe = self.pipe
        registered: list[str] = []
        try:
            for item in chosen:
                if item.name not in pipe.adapters:
                    registered.append(pipe.add_adapter(self._load(item), name=item.name))
            yield pipe
        finally:
            pipe.clear_composition()
            for name in registered:
                pipe.remove_adapter(name)

    def spec(self, item: ChosenAdapter) -> Any:
        """The request as the engine's weight spec (what :meth:`composer.mixin.ComposableMixin.set_composition`
        composes it as; see :mod:`composer.weight_specs`)."""
        return self.pipe.weight_specs({item.name: item.request})[item.name]

    def rank(self, prompt: str, k: int = 10) -> list[dict[str, Any]]:
        """Every retrieval signal's score for the ``k`` best library adapters for ``prompt``, best first (JSON)."""
        if self.library is None:
            raise CompositionError("ranking adapters needs a library", hint="pass library=DIR (CLI: --library DIR)")
        return [hit.to_json() for hit in self.retriever.rank(prompt, family=self.family, k=k)]

    def _steps(self, steps: int | None) -> int:
        """``steps`` if given, else the step count for this model (few for the offline presets)."""
        if steps:
            return steps
        return PRESET_STEPS if self.model in PRESETS else self.step_defaults.get(self.family, self.fallback_steps)

    @property
    def _tiny(self) -> bool:
        """True for the random-weight ``tiny-*`` smoke-test presets (run at :data:`TINY_SIZE`)."""
        return self.model in PRESETS and self.model.startswith("tiny")

    def run(
        self,
        prompt: str,
        loras: str | Sequence[str | LoraTag] | Mapping[str, Any] | None = None,
        *,
        method: str = "merge",
        steps: int | None = None,
        seed: int = 0,
        guidance_scale: float | None = None,
        negative_prompt: str = "",
        height: int | None = None,
        width: int | None = None,
        num_images: int = 1,
        out: str | Path | None = None,
        image: Image.Image | None = None,
        progress: bool = False,
        plot: str | Path | None = None,
        max_loras: int | None = None,
        **options: Any,
    ) -> CompositionResult:
        """Generate ``num_images`` images for ``prompt`` with the chosen adapters composed by ``method``.

        ``out`` is a folder: images are saved there as ``<seed>-<n>.png`` with sidecars. ``image`` is the input of
        editing pipelines (Kontext, img2img). Method options (``tau``, ``mode``, ``fuse``...) and ``branches``
        (``"conditional"``: adapters on CFG's conditional branch only; or per adapter, ``{"name": "conditional"}``)
        pass through to ``set_composition``.
        ``plot`` is a folder for PNG plots (:func:`composer.analysis.run_plots.write_run_plots`), listed in
        ``result.plots``.
        ``max_loras`` caps how many adapters ``loras="auto"`` picks; those found named but left out are in
        ``result.rejected`` with why.
        """
        started = time.perf_counter()
        if plot is not None and method == "gated":
            options.setdefault("record", True)
        rejected: list[RejectedAdapter] = []
        clean_prompt, chosen = self.choose(prompt, loras, max_loras=max_loras, rejected=rejected)
        self._refuse_unknown(chosen)
        if self.calibrated_defaults:
            self.default_weights(chosen)
        pipe = self.pipe
        steps = self._steps(steps)
        size = TINY_SIZE if self._tiny else None
        height, width = height or size, width or size
        call: dict[str, Any] = {
            "prompt": clean_prompt,
            "num_inference_steps": steps,
            "num_images_per_prompt": num_images,
        }
        if guidance_scale is None and self.model == TOY_PRESET:
            guidance_scale = TOY_GUIDANCE
        if guidance_scale is not None:
            call["guidance_scale"] = guidance_scale
        if negative_prompt and self.family != "flux":
            call["negative_prompt"] = negative_prompt
        if height and width and _accepts(pipe, "height"):
            call.update(height=height, width=width)
        if image is not None:
            call["image"] = image
            if type(pipe).__name__.startswith("FluxKontext"):
                call.update(kontext_call_kwargs(height or image.height, width or image.width))
        images, captured = self._generate(
            chosen,
            call,
            method=method,
            seed=seed,
            progress=progress,
            plot_steps=None if plot is None else steps,
            **options,
        )
        result = CompositionResult(
            images=images,
            prompt=clean_prompt,
            adapters=chosen,
            method=method if chosen else "none",
            seed=seed,
            steps=steps,
            seconds=time.perf_counter() - started,
            branches=options.get("branches", "both") if chosen else "both",
            rejected=rejected,
        )
        logger.info(
            "%s: %d image(s), %s over %s, %d steps, %.2f s",
            clean_prompt,
            len(result.images),
            result.method,
            ", ".join(a.name for a in chosen) or "no adapters",
            steps,
            result.seconds,
        )
        if out is not None:
            stems = [Path(out) / f"{seed}-{index}" for index in range(len(images))]
            self._save(result, stems, guidance_scale=guidance_scale, negative_prompt=negative_prompt)
        if plot is not None:
            ranked = isinstance(loras, str) and loras.strip().lower() == "auto"
            prompt_ranked = extract_lora_tags(prompt)[0] if ranked else None
            stem = Path(plot) / str(result.seed)
            result.plots.update(write_run_plots(stem, result.method, captured, prompt_ranked, self.rank))
        return result

    def _generate(
        self,
        chosen: Sequence[ChosenAdapter],
        call: Mapping[str, Any],
        *,
        method: str,
        seed: int,
        progress: bool = False,
        plot_steps: int | None = None,
        **options: Any,
    ) -> tuple[list[Image.Image], RunPlotData]:
        """Compose ``chosen`` by ``method`` (``options`` and ``fuse`` go to ``set_composition``) and call the
        pipeline once with ``call`` under ``seed``; returns the images and, with ``plot_steps``, what the plots of a
        ``plot_steps``-step run show. The pipeline is left as it was found."""
        fuse = options.pop("fuse", None)
        captured = RunPlotData()
        with self.composing(chosen) as pipe:
            pipe.set_progress_bar_config(disable=not progress)
            if chosen:
                requests = {item.name: item.request for item in chosen}
                pipe.set_composition(requests, method=method, fuse=fuse, **options)
            generator = torch.Generator(device="cpu").manual_seed(seed)
            with torch.inference_mode():
                images = pipe(generator=generator, **call).images
            if plot_steps is not None and chosen:
                table = pipe.composition_weights(plot_steps)
                recorder = getattr(pipe.composition_strategy, "recorder", None)
                captured = RunPlotData(table.weights, list(table.adapters), list(table.groups), recorder)
        return list(images), captured

    def _save(
        self,
        result: CompositionResult,
        stems: Sequence[Path],
        *,
        guidance_scale: float | None = None,
        negative_prompt: str = "",
    ) -> None:
        """Save each of ``result.images`` at its stem (``.png`` with the A1111 ``parameters`` chunk, ``.json``
        sidecar) and list the PNGs in ``result.paths``."""
        model = KNOWN_MODELS[self.model].hub_id if self.model in KNOWN_MODELS else self.model
        for image, stem in zip(result.images, stems):
            record = GenerationRecord(
                prompt=result.prompt,
                negative_prompt=negative_prompt,
                steps=result.steps,
                guidance_scale=guidance_scale,
                seed=result.seed,
                width=image.width,
                height=image.height,
                model=model,
                sampler=type(self.pipe.scheduler).__name__,
                method=result.method,
                extra=result.record_extra(),
                adapters=[a.record() for a in result.adapters],
            )
            png, _ = save_image(image, stem, record)
            result.paths.append(png)
