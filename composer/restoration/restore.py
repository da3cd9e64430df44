"""Restoration as editing: restoration adapters (Edit2Restore) composed with style adapters in an editing pipeline.

A restoration adapter is an ordinary :class:`fusion.adapters.Adapter` whose file metadata carries a ``task_prompt``
("remove the rain from the image") and ``needs_input_image``. :class:`Restorer` is the
:class:`~composer.facade.Composer` for it: it loads the model as an *editing* pipeline (:func:`editing_pipeline`),
registers the restoration adapters and any style adapters, composes them through the mixin and the fusion engine with
the chosen method, and runs the pipeline on the input image with the adapters' task prompts (joined with " and " when
several).

Editing pipelines by family: FLUX.1 → :class:`~diffusers.FluxKontextPipeline` (the input image is VAE-encoded and
concatenated on the sequence axis); SD 1.x/2.x and SDXL → the InstructPix2Pix pipeline when the UNet takes the image
latents as extra input channels (an InstructPix2Pix checkpoint), otherwise img2img built from the same components.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from diffusers import (
    FluxKontextPipeline,
    StableDiffusionImg2ImgPipeline,
    StableDiffusionInstructPix2PixPipeline,
    StableDiffusionXLImg2ImgPipeline,
    StableDiffusionXLInstructPix2PixPipeline,
)
from PIL import Image

from composer.facade import TINY_SIZE, ChosenAdapter, Composer, CompositionResult
from composer.images import GenerationRecord, save_image
from composer.mixin import make_composable
from composer.presets import PRESETS, kontext_call_kwargs, load_preset, preset_family
from composer.prompts import LoraTag, parse_lora_list
from fusion.errors import CompositionError

EDITING_CLASSES: dict[str, tuple[type, type]] = {
    "sd1": (StableDiffusionImg2ImgPipeline, StableDiffusionInstructPix2PixPipeline),
    "sd2": (StableDiffusionImg2ImgPipeline, StableDiffusionInstructPix2PixPipeline),
    "sdxl": (StableDiffusionXLImg2ImgPipeline, StableDiffusionXLInstructPix2PixPipeline),
}
"""Family → (img2img pipeline, InstructPix2Pix pipeline)."""

MAX_AREA = {"flux": 1024 * 1024, "sdxl": 1024 * 1024, "sd1": 512 * 512, "sd2": 768 * 768}
"""Largest working area per family; bigger inputs are scaled down (and the result scaled back up)."""

DEFAULT_STEPS = {"flux": 28, "sdxl": 30, "sd1": 30, "sd2": 30}
DEFAULT_GUIDANCE = {"flux": 2.5}
"""Edit2Restore's inference settings for Kontext (28 steps, guidance 2.5); pipelines' defaults elsewhere."""

TASK_JOINER = " and "


def is_instruct_pix2pix(pipe: Any) -> bool:
    """True when the UNet takes image latents as extra channels (8 = 4 noisy + 4 image latents)."""
    unet = getattr(pipe, "unet", None)
    return unet is not None and int(unet.config.in_channels) == 8


def editing_pipeline(pipe: Any) -> Any:
    """The editing pipeline for ``pipe``'s model, sharing its components (``from_pipe``; no weights are copied).

    Kontext and InstructPix2Pix / img2img pipelines are returned as they are.
    """
    family = preset_family(pipe)
    if family == "flux":
        return pipe if isinstance(pipe, FluxKontextPipeline) else FluxKontextPipeline.from_pipe(pipe)
    if family not in EDITING_CLASSES:
        raise CompositionError(
            f"no editing pipeline for a {type(pipe).__name__} ({family} family)",
            hint="use an SD 1.x/2.x, SDXL, FLUX.1 or FLUX.1 Kontext model",
        )
    img2img, pix2pix = EDITING_CLASSES[family]
    target = pix2pix if is_instruct_pix2pix(pipe) else img2img
    return pipe if isinstance(pipe, target) else target.from_pipe(pipe)


def working_size(width: int, height: int, *, max_area: int, multiple: int) -> tuple[int, int]:
    """(width, height) scaled down to at most ``max_area`` pixels (aspect kept) and snapped down to ``multiple``."""
    scale = min(1.0, math.sqrt(max_area / float(width * height)))

    def snap(side: int) -> int:
        return max(multiple, int(side * scale) // multiple * multiple)

    return snap(width), snap(height)


def task_prompt(adapters: Sequence[Any], override: str | None = None) -> str:
    """The prompt for a restoration run: ``override`` if given, else the adapters' task prompts joined."""
    if override:
        return override
    prompts = [a.task_prompt for a in adapters if a.task_prompt]
    missing = [a.name for a in adapters if not a.task_prompt]
    if missing:
        raise CompositionError(
            f"restoration adapters without a task prompt in their metadata: {missing}",
            hint="pass the task prompt yourself (CLI: --task 'remove the rain from the image')",
        )
    unique = list(dict.fromkeys(prompts))
    return TASK_JOINER.join(unique)


@dataclass
class RestoreResult(CompositionResult):
    """A :class:`CompositionResult` plus the input image's path and the editing pipeline that ran."""

    pipeline: str = ""
    source: str | None = None

    def as_dict(self) -> dict[str, Any]:
        """JSON-friendly summary."""
        return {**super().as_dict(), "pipeline": self.pipeline, "input": self.source}


class Restorer(Composer):
    """Restore images with restoration adapters, optionally composed with style adapters.

    ``Restorer(model="tiny-flux-kontext", library=DIR).restore(image, adapters=["derain"], loras="style:0.6")``.
    """

    @property
    def pipe(self) -> Any:
        """The composable editing pipeline (loaded on first use)."""
        if self._pipe is None:
            base = load_preset(self.model, torch_dtype=self.torch_dtype, device=self.device)
            self._pipe = make_composable(editing_pipeline(base))
        return self._pipe

    def _call_kwargs(self, image: Image.Image, size: tuple[int, int], options: dict[str, Any]) -> dict[str, Any]:
        """Pipeline-specific keyword arguments for one restoration call."""
        family = self.family
        width, height = size
        call: dict[str, Any] = {"image": image.resize(size, Image.Resampling.LANCZOS)}
        guidance = options.pop("guidance_scale", None)
        if guidance is None:
            guidance = DEFAULT_GUIDANCE.get(family)
        if guidance is not None:
            call["guidance_scale"] = guidance
        if isinstance(self.pipe, FluxKontextPipeline):
            call.update(kontext_call_kwargs(height, width))
        elif is_instruct_pix2pix(self.pipe):
            call["image_guidance_scale"] = options.pop("image_guidance_scale", 1.5)
        else:
            call["strength"] = options.pop("strength", 0.5)
        return call

    def restore(
        self,
        image: Image.Image | str | Path,
        adapters: Sequence[str | LoraTag] | str,
        loras: str | Sequence[LoraTag] | None = None,
        *,
        method: str = "merge",
        task: str | None = None,
        steps: int | None = None,
        seed: int = 0,
        out: str | Path | None = None,
        progress: bool = False,
        **options: Any,
    ) -> RestoreResult:
        """Restore ``image`` with the restoration ``adapters`` (names/paths, ``name:weight`` allowed, or
        :class:`~composer.prompts.LoraTag` requests with their schedules and block weights) composed with the style
        ``loras`` (a ``name:0.6,other`` list or LoraTag requests) by ``method``.

        The prompt is ``task`` or the adapters' task prompts. The result has the input's size. ``out`` is a
        ``.png`` path or a folder (``<input stem>-restored.png``); a JSON sidecar is written beside it. Options:
        ``guidance_scale``, ``strength`` (img2img), ``image_guidance_scale`` (InstructPix2Pix), ``fuse`` and the
        method's own (``tau``, ``mode``...).
        """
        started = time.perf_counter()
        source = None
        if not isinstance(image, Image.Image):
            source = str(image)
            with Image.open(image) as handle:
                image = handle.convert("RGB")
        specs = (
            parse_lora_list(adapters)
            if isinstance(adapters, str)
            else [t for a in adapters for t in ([a] if isinstance(a, LoraTag) else parse_lora_list(a))]
        )
        if not specs:
            raise CompositionError("restoration needs at least one restoration adapter", hint="pass --adapter NAME")
        restoration = [self._from_tag(tag, "restoration") for tag in specs]
        _, style = self.choose("", loras) if loras else ("", [])
        names = {item.name for item in restoration}
        chosen: list[ChosenAdapter] = restoration + [item for item in style if item.name not in names]
        pipe = self.pipe
        family = self.family
        tiny = self.model in PRESETS and self.model.startswith("tiny")
        steps = steps or (4 if self.model in PRESETS else DEFAULT_STEPS.get(family, 30))
        max_area = TINY_SIZE * TINY_SIZE if tiny else MAX_AREA.get(family, 512 * 512)
        size = working_size(image.width, image.height, max_area=max_area, multiple=pipe.vae_scale_factor * 2)
        fuse = options.pop("fuse", None)
        call = self._call_kwargs(image, size, options)
        if "strength" in call and int(steps * call["strength"]) < 1:
            raise CompositionError(
                f"img2img with strength {call['strength']} and {steps} steps runs no denoising step",
                hint=f"use at least {math.ceil(1 / call['strength'])} steps or a higher strength",
            )
        pipe.set_progress_bar_config(disable=not progress)
        with self.composing(chosen):
            prompt = task_prompt([pipe.adapters[item.name] for item in restoration], task)
            pipe.set_composition({item.name: self.spec(item) for item in chosen}, method=method, fuse=fuse, **options)
            generator = torch.Generator(device="cpu").manual_seed(seed)
            with torch.inference_mode():
                output = pipe(prompt=prompt, num_inference_steps=steps, generator=generator, **call).images[0]
        if output.size != image.size:
            output = output.resize(image.size, Image.Resampling.LANCZOS)
        result = RestoreResult(
            images=[output],
            prompt=prompt,
            adapters=chosen,
            method=method,
            seed=seed,
            steps=steps,
            seconds=time.perf_counter() - started,
            pipeline=type(pipe).__name__,
            source=source,
        )
        if out is not None:
            result.paths.append(self._write(result, Path(out), call.get("guidance_scale")))
        return result

    def _write(self, result: RestoreResult, out: Path, guidance_scale: float | None) -> Path:
        """Save the restored image with its ``parameters`` chunk and sidecar; returns the PNG path."""
        if out.suffix.lower() != ".png":
            stem = Path(result.source).stem if result.source else "image"
            out = out / f"{stem}-restored.png"
        image = result.images[0]
        record = GenerationRecord(
            prompt=result.prompt,
            steps=result.steps,
            guidance_scale=guidance_scale,
            seed=result.seed,
            width=image.width,
            height=image.height,
            model=self.model,
            sampler=type(self.pipe.scheduler).__name__,
            method=result.method,
            adapters=[
                {"name": a.name, "weight": a.weight, "hash": a.hash, "source": a.source} for a in result.adapters
            ],
            extra={"Pipeline": result.pipeline, **({"Input": Path(result.source).name} if result.source else {})},
        )
        png, _ = save_image(image, out, record)
        return png
