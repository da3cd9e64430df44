"""Composition for stock diffusers pipelines: ``make_composable(pipe)`` or ``class P(ComposableMixin, SomePipeline)``.

The mixin keeps registered adapters in host memory and, when a composition is set, attaches the adapters it names to
the denoiser (and text encoders) through a :class:`fusion.engine.FusionEngine` with the chosen strategy. Adding an
adapter validates it against the model right away (a bad one raises and changes nothing); clearing the composition
detaches everything and leaves the pipeline's weights and module tree bit-identical to before. Adapters stay
registered, so the next ``set_composition`` re-attaches them.

Works on StableDiffusion / StableDiffusionXL / Flux / FluxKontext pipelines and their img2img variants (anything
with a ``unet`` or ``transformer`` and a ``scheduler``).
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable, Hashable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from composer.presets import preset_family
from composer.weight_specs import Composition, engine_specs
from fusion.adapter_cache import AdapterCache, file_key
from fusion.adapters import Adapter, Dense, LowRank, Sparse
from fusion.cfg_branches import Branches, resolve_branches
from fusion.engine import FusionEngine
from fusion.errors import CompositionError, FamilyMismatchError
from fusion.layer_groups import BlockLayout
from fusion.layer_index import LayerIndex
from fusion.schedules import WeightTable
from fusion.squeeze import combine
from fusion.strategies import get_strategy
from fusion.strategies.base import Strategy, WeightSpec
from weights_index.reader import adapter_file, read_adapter

if TYPE_CHECKING:
    from weights_index.catalog import CatalogEntry, Library

_TEXT_ENCODERS = ("text_encoder", "text_encoder_2")

STATIC_CHECK_STEPS = 64
"""Steps over which :meth:`ComposableMixin.merged_updates` checks that a composition's weights are static."""

ADAPTER_CACHE = AdapterCache()
"""Process-wide host-memory cache of adapters read by :meth:`ComposableMixin.add_adapter_file`."""


class ComposableMixin:
    """Adds ``add_adapter``, ``add_adapter_file``, ``set_composition``, ``clear_composition``, ``remove_adapter``
    and ``composition`` to a diffusers pipeline; every pipeline call starts a new generation. Reading adapters
    without registering them (``read_adapter_file``, ``read_catalog_adapter``), resolving requests
    (``weight_specs``) and inspecting the active composition (``composition_weights``, ``composition_strategy``,
    ``composition_engine``, ``merged_updates``) are public too: the facade composes through nothing else."""

    @property
    def _composer(self) -> dict[str, Any]:
        """Per-instance state: registered adapters, the engine (while a composition is set), the composition."""
        state = self.__dict__.get("_composer_state")
        if state is None:
            state = {"adapters": {}, "engine": None, "composition": None}
            self.__dict__["_composer_state"] = state
        return state

    @property
    def family(self) -> str:
        """Base-model family of this pipeline ("sd1", "sd2", "sdxl", "flux" or "unknown")."""
        return preset_family(self)

    @property
    def adapters(self) -> dict[str, Adapter]:
        """Registered adapters by name (attached or not)."""
        return dict(self._composer["adapters"])

    @property
    def composition(self) -> dict[str, Any] | None:
        """The active composition (``weights``: the resolved weight specs, ``method``, ``fuse``, ``branches``,
        ``options``), or None."""
        current = self._composer["composition"]
        return None if current is None else {**current, "weights": dict(current["weights"])}

    def denoiser(self) -> Any:
        """The model the adapters compose into: the pipeline's ``unet``, else its ``transformer``."""
        denoiser = getattr(self, "unet", None)
        if denoiser is None:
            denoiser = getattr(self, "transformer", None)
        if denoiser is None:
            raise CompositionError(f"{type(self).__name__} has neither a unet nor a transformer to compose into")
        return denoiser

    def _engine(self) -> FusionEngine:
        engine = self._composer["engine"]
        if engine is None:
            engine = FusionEngine(
                self.denoiser(),
                text_encoders={name: getattr(self, name, None) for name in _TEXT_ENCODERS},
                scheduler=lambda: self.scheduler,
                family=self.family,
            )
            self._composer["engine"] = engine
        return engine

    def _layer_index(self) -> LayerIndex:
        """The composable layers of this pipeline's denoiser and text encoders, indexed without changing anything."""
        return LayerIndex(
            self.denoiser(),
            text_encoders={name: getattr(self, name, None) for name in _TEXT_ENCODERS},
            family=self.family,
        )

    def add_adapter(self, adapter: Adapter, name: str | None = None) -> str:
        """Register ``adapter`` (renamed to ``name`` if given) after validating it against this model; returns the
        name. Raises :class:`FamilyMismatchError` / :class:`ShapeMismatchError` and changes nothing if it does not
        fit."""
        if name is not None and name != adapter.name:
            adapter = dataclasses.replace(adapter, name=name)
        if adapter.name in self._composer["adapters"]:
            raise CompositionError(
                f"an adapter named {adapter.name!r} is already registered",
                path=adapter.source,
                hint="pass name= to register it under another name",
            )
        family = self.family
        if "unknown" not in (family, adapter.family) and adapter.family != family:
            raise FamilyMismatchError(
                f"adapter {adapter.name!r} is for {adapter.family}, this pipeline is {family}",
                path=adapter.source,
                hint="use an adapter made for this base model",
            )
        engine = self._composer["engine"]
        if engine is not None:
            engine.validate([adapter])
        else:
            self._layer_index().validate([adapter])
        self._composer["adapters"][adapter.name] = adapter
        return adapter.name

    def model_shapes(self) -> dict[str, tuple[int, ...]]:
        """Weight shape of every composable layer (denoiser paths and ``text_encoder*.`` keys), as readers take
        them: they give flattened conv updates their conv shape and weight-relative kinds (IA3, OFT) their shape."""
        engine = self._composer["engine"]
        index = engine.index if engine is not None else self._layer_index()
        return dict(index.shapes)

    def add_adapter_file(self, path: str | Path, name: str | None = None) -> str:
        """Read an adapter file or a PEFT / diffusers checkpoint folder (any supported format) for this pipeline's
        family and shapes and register it; returns the name (the file's stem unless ``name`` is given). Files are
        read once per model and kept in :data:`ADAPTER_CACHE`."""
        return self.add_adapter(self.read_adapter_file(path), name=name)

    def read_adapter_file(self, path: str | Path) -> Adapter:
        """The adapter in a file or a PEFT / diffusers checkpoint folder, read for this pipeline's family and layer
        shapes, from :data:`ADAPTER_CACHE` while the file is unchanged; not registered."""
        family = None if self.family == "unknown" else self.family
        return self._cached(adapter_file(path), lambda shapes: read_adapter(path, family, shapes=shapes), family)

    def read_catalog_adapter(self, library: Library, entry: CatalogEntry) -> Adapter:
        """The adapter of a :class:`weights_index.catalog.Library` entry, read for this pipeline's layer shapes
        (with the catalog's weight scores and category), from :data:`ADAPTER_CACHE` while its file and catalog
        record are unchanged; not registered."""
        record = ("catalog", entry.name, entry.metadata.category, repr(sorted(entry.scores.items())))
        return self._cached(entry.path, lambda shapes: library.read(entry.name, shapes=shapes), *record)

    def _cached(self, file: Path, read: Callable[[dict[str, tuple[int, ...]]], Adapter], *record: Hashable) -> Adapter:
        """``read(shapes)`` through :data:`ADAPTER_CACHE`, keyed by the file's identity (path, size, mtime),
        ``record`` (what else the read depends on) and this model's layer shapes."""
        shapes = self.model_shapes()
        key = (file_key(file), *record, hash(frozenset(shapes.items())))
        return ADAPTER_CACHE.get(key, lambda: read(shapes))

    def set_composition(
        self,
        weights: Composition,
        method: str = "merge",
        fuse: bool | None = None,
        branches: Branches = "both",
        **options: Any,
    ) -> None:
        """Compose the named registered adapters with ``method`` (merge, switch, composite, ...).

        ``weights`` maps adapter names to a float, a keyframe string, a block-weight vector or a callable (see
        :mod:`fusion.schedules`), or to a :class:`~composer.prompts.LoraTag` request: everything a ``<lora:…>``
        tag says (a text-encoder weight of its own, block weights, a schedule, a ``start=``/``stop=`` window) is
        resolved by :func:`composer.weight_specs.engine_spec`. A list of requests works too:
        ``set_composition(extract_lora_tags(prompt)[1])``. :attr:`composition` records the resolved specs.
        ``fuse=None`` fuses when the method allows and the weights are static;
        ``fuse=False`` forces unfused. Replaces any previous composition. ``method="gated"`` accepts
        ``gates="name"`` (or a path): a checkpoint written by ``compose train-gates``.

        ``branches="conditional"`` puts the composition on classifier-free guidance's conditional branch only: the
        unconditional half of every CFG batch runs on the base weights, its negative prompt encoded by the base text
        encoders (:mod:`fusion.cfg_branches`). It runs unfused and needs an SD 1.x/2.x or SDXL pipeline; calls
        without CFG (``guidance_scale`` ≤ 1) compose the whole batch as usual. A mapping chooses per adapter
        (``{"pixel_art": "conditional"}``; adapters it leaves out act on both branches): the method then runs on the
        unconditional half with the ``"both"`` adapters alone, and the negative prompt is encoded with them. A
        number in [0, 1] instead of a branch name (``{"zorbex": 0.5}``) is the share of that adapter's weight the
        unconditional half carries, as ComfyUI's hooked LoRAs take a strength per conditioning (``branches=0.5``:
        that share for every adapter); a share of 1 is the method on both branches, whatever the method.

        Sparse (SHiRA) adapters stay attached at weight 0 when a composition leaves them out: fused, they cost
        nothing, and going from one fused SHiRA composition to another switches the weights in place (restoring
        the old positions and writing the new ones in one pass, or re-writing a cached fused state).
        """
        weights = self.weight_specs(weights)
        registered = self._composer["adapters"]
        unknown = [name for name in weights if name not in registered]
        if unknown:
            raise CompositionError(
                f"composition names adapters that are not registered: {unknown}",
                hint=f"registered: {sorted(registered)}; add them with add_adapter / add_adapter_file",
            )
        if not weights:
            raise CompositionError("a composition needs at least one adapter", hint="use clear_composition() instead")
        routing, _ = resolve_branches(branches, weights)
        strategy_fuse = fuse
        if routing == "conditional":
            self._check_conditional_branch(fuse)
            strategy_fuse = False
        strategy = get_strategy(method)(dict(weights), fuse=strategy_fuse, **_resolve_options(method, options))
        engine = self._engine()
        stale = [n for n in engine.adapter_names if n not in weights and not _is_sparse(engine.adapters[n])]
        missing = [n for n in weights if n not in engine.adapters]
        # Under a fused all-sparse composition new adapters attach at weight 0 (re-fusing the old weights is a
        # cached no-op) and the fused weights then switch in place; anything else is stopped first, as re-fusing
        # dense or low-rank updates would cost a full pass for nothing.
        in_place = engine.fused and all(_is_sparse(engine.adapters[n]) for n in engine.adapter_names)
        if stale or (missing and not in_place):
            engine.set_strategy(None)
            for name in stale:
                engine.remove_adapter(name)
        if missing:
            engine.add_adapters([registered[n] for n in missing])
        try:
            engine.set_strategy(strategy)
        except Exception:
            previous = self._composer["composition"]
            self.clear_composition()
            if previous is not None:
                self._restore(previous)
            raise
        engine.set_branches(branches)
        self._composer["composition"] = {
            "weights": dict(weights),
            "method": method,
            "fuse": fuse,
            "branches": dict(branches) if isinstance(branches, Mapping) else branches,
            "options": options,
        }

    def weight_specs(self, composition: Composition) -> dict[str, WeightSpec]:
        """Adapter name → the weight spec the engine reads for ``composition`` (what :meth:`set_composition` takes):
        requests resolved against this denoiser's block layout, other specs as they are. Changes nothing."""
        return engine_specs(composition, self._block_layout)

    def _block_layout(self) -> BlockLayout:
        """The denoiser's block-weight layout (the engine's while one is attached)."""
        engine = self._composer["engine"]
        return engine.layout if engine is not None else BlockLayout.from_denoiser(self.family, self.denoiser())

    def _restore(self, composition: Mapping[str, Any], weights: Mapping[str, WeightSpec] | None = None) -> None:
        """Set ``composition`` (as :attr:`composition` records it) again, optionally with other weights."""
        self.set_composition(
            composition["weights"] if weights is None else weights,
            composition["method"],
            composition["fuse"],
            branches=composition["branches"],
            **composition["options"],
        )

    def _check_conditional_branch(self, fuse: bool | None) -> None:
        """Refuse adapters on the conditional branch only where it cannot be exact: fused weights, pipelines
        without an ``[unconditional; conditional]`` CFG batch."""
        if fuse:
            raise CompositionError(
                "adapters on the conditional branch only cannot be fused: the unconditional half of every batch "
                "runs on the base weights",
                hint="leave fuse unset (or False) with branches='conditional'",
            )
        if not isinstance(self, _cfg_batch_pipelines()):
            raise CompositionError(
                f"{type(self).__name__} does not hand the denoiser an [unconditional; conditional] CFG batch, so "
                "its conditional branch cannot be composed alone",
                hint="branches='conditional' works on StableDiffusion and StableDiffusionXL pipelines (text-to-image, "
                "img2img, inpaint); use branches='both' here",
            )

    def merged_updates(self) -> dict[str, LowRank | Dense]:
        """The exact Σ wᵢ·ΔWᵢ of every adapted layer under the active composition (weight-relative kinds resolved
        against the pristine weights, block weights applied per layer group): concatenated factors where every
        update of a layer is low-rank, else dense. Keys are the engine's (denoiser paths, ``text_encoder*.`` keys).
        Raises :class:`CompositionError` without a composition or when its weights change across steps."""
        table = self.composition_weights(STATIC_CHECK_STEPS)
        if not table.is_static:
            raise CompositionError(
                "the composition's weights change across steps; only a static composition is one set of weights",
                hint="drop keyframe schedules and start/stop windows",
            )
        weights = table.weights[..., 0]
        index = {name: i for i, name in enumerate(table.adapters)}
        merged: dict[str, LowRank | Dense] = {}
        for key, layer in self._composer["engine"].layers.items():
            items = [(slot.kind, float(weights[index[slot.name], layer.group])) for slot in layer.slots]
            if any(w != 0.0 for _, w in items):
                merged[key] = combine(items)
        return merged

    def composition_weights(self, num_steps: int) -> WeightTable:
        """The active composition's ``weight[adapter, group, step]`` over a run of ``num_steps`` steps, rows in
        the engine's adapter order (attached adapters the composition leaves out at 0), columns its layer groups.
        Raises :class:`CompositionError` without a composition."""
        engine = self._composer["engine"]
        current = self._composer["composition"]
        if engine is None or current is None:
            raise CompositionError("no composition is set", hint="call set_composition(...) first")
        table = engine.weight_table(current["weights"], num_steps=num_steps).cpu()
        adapters, groups = tuple(engine.adapter_names), tuple(engine.group_names)
        return WeightTable(adapters, groups, table, table.permute(2, 0, 1).contiguous())

    @property
    def composition_engine(self) -> FusionEngine | None:
        """The :class:`~fusion.engine.FusionEngine` holding the active composition (its composed layers, weight
        tables and strategy, for analysis and benchmarks), or None without one. Compose through the mixin's
        methods: changing the engine directly bypasses what :attr:`composition` records."""
        return self._composer["engine"]

    @property
    def composition_strategy(self) -> Strategy | None:
        """The active composition's strategy object (e.g. a gated strategy's ``recorder`` / ``gates``), or None."""
        engine = self._composer["engine"]
        return None if engine is None else engine.strategy

    def clear_composition(self) -> None:
        """Detach every adapter and restore the base weights bit-exactly (adapters stay registered)."""
        engine = self._composer["engine"]
        if engine is not None:
            engine.clear()
        self._composer["engine"] = None
        self._composer["composition"] = None

    def remove_adapter(self, name: str) -> None:
        """Unregister an adapter; if the composition uses it, the composition continues without it."""
        registered = self._composer["adapters"]
        if name not in registered:
            raise CompositionError(f"no adapter named {name!r} is registered", hint=f"registered: {sorted(registered)}")
        current = self._composer["composition"]
        if current is not None and name in current["weights"]:
            rest = {k: v for k, v in current["weights"].items() if k != name}
            if rest:
                self._restore(current, rest)
            else:
                self.clear_composition()
        engine = self._composer["engine"]
        if engine is not None and name in engine.adapters:  # a sparse adapter kept attached at weight 0
            engine.remove_adapter(name)  # the active composition (without it) is re-activated in place
        del registered[name]

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """Run the pipeline as a new generation (the engine's hook is put back in the denoiser's call path first if a
        re-installed offload hook dropped it). With the composition on the conditional branch only, a call with CFG
        gets its negative prompt encoded here as the unconditional branch sees it."""
        engine = self._composer["engine"]
        if engine is None:
            return super().__call__(*args, **kwargs)
        if engine.branches == "both":  # no argument binding on the usual path
            engine.reset_generation()
            return super().__call__(*args, **kwargs)
        call = inspect.signature(super().__call__).bind(*args, **kwargs)
        halves = self._guides(call)
        engine.reset_generation(cfg_halves=halves)
        if halves and any(key.startswith(_TEXT_ENCODERS) for key in engine.layers):
            self._encode_negative_prompt(call, engine)
        return super().__call__(*call.args, **call.kwargs)

    def _guides(self, call: inspect.BoundArguments) -> bool:
        """Whether this pipeline call runs classifier-free guidance (the rule SD and SDXL pipelines apply)."""
        scale = call.arguments.get("guidance_scale", call.signature.parameters["guidance_scale"].default)
        return float(scale) > 1.0 and getattr(self.denoiser().config, "time_cond_proj_dim", None) is None

    def _encode_negative_prompt(self, call: inspect.BoundArguments, engine: FusionEngine) -> None:
        """Encode the call's negative prompt as the unconditional branch sees it (every adapter muted, or only the
        ones kept on both branches; through the pipeline's own ``encode_prompt``, so empty prompts, SDXL's zeroed
        negatives and batch rules stay the pipeline's) and hand it over as ``negative_prompt_embeds``."""
        arguments = call.arguments
        if arguments.get("negative_prompt_embeds") is not None:
            return
        is_xl = hasattr(self, "text_encoder_2")  # SDXL pipelines register it (None on a refiner), SD ones do not
        request: dict[str, Any] = {
            "prompt": arguments.get("prompt"),
            "device": self._execution_device,
            "num_images_per_prompt": 1,
            "do_classifier_free_guidance": True,
            "negative_prompt": arguments.pop("negative_prompt", None),
            "prompt_embeds": arguments.get("prompt_embeds"),
        }
        if is_xl:
            request.update(
                prompt_2=arguments.get("prompt_2"),
                negative_prompt_2=arguments.pop("negative_prompt_2", None),
                pooled_prompt_embeds=arguments.get("pooled_prompt_embeds"),
            )
        with torch.no_grad(), engine.unconditional():
            encoded = self.encode_prompt(**request)
        arguments["negative_prompt_embeds"] = encoded[1]
        if is_xl:
            arguments["negative_pooled_prompt_embeds"] = encoded[3]


def _resolve_options(method: str, options: Mapping[str, Any]) -> dict[str, Any]:
    """Turn file references in strategy options into objects: ``gates="name"`` (gated) loads that checkpoint."""
    resolved = dict(options)
    if method == "gated" and isinstance(resolved.get("gates"), (str, Path)):
        from composer.training.gates import load_gates

        resolved["gates"] = load_gates(resolved["gates"])
    return resolved


def _cfg_batch_pipelines() -> tuple[type, ...]:
    """The pipeline classes that hand their denoiser one ``[unconditional; conditional]`` batch under CFG."""
    from diffusers import (
        StableDiffusionImg2ImgPipeline,
        StableDiffusionInpaintPipeline,
        StableDiffusionPipeline,
        StableDiffusionXLImg2ImgPipeline,
        StableDiffusionXLInpaintPipeline,
        StableDiffusionXLPipeline,
    )

    return (
        StableDiffusionPipeline,
        StableDiffusionImg2ImgPipeline,
        StableDiffusionInpaintPipeline,
        StableDiffusionXLPipeline,
        StableDiffusionXLImg2ImgPipeline,
        StableDiffusionXLInpaintPipeline,
    )


def _is_sparse(adapter: Adapter) -> bool:
    """True for adapters made only of sparse updates (SHiRA): kept attached between compositions."""
    return all(isinstance(kind, Sparse) for _, kind in adapter.all_layers())


_COMPOSABLE_CLASSES: dict[type, type] = {}


def make_composable(pipe: Any) -> Any:
    """Give ``pipe`` the :class:`ComposableMixin` methods in place (its class becomes a subclass with the same
    name, so ``save_pretrained`` still records the original pipeline class); returns ``pipe``."""
    cls = type(pipe)
    if isinstance(pipe, ComposableMixin):
        return pipe
    composable = _COMPOSABLE_CLASSES.get(cls)
    if composable is None:
        composable = type(cls.__name__, (ComposableMixin, cls), {"__module__": cls.__module__})
        composable.__qualname__ = cls.__qualname__
        _COMPOSABLE_CLASSES[cls] = composable
    pipe.__class__ = composable
    return pipe
