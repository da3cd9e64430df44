"""The optimisation loop of the trainers in :mod:`composer.training` (SHiRA, restoration LoRAs, gates) and the
``compose train-*`` commands that run them: accelerate + AdamW + tqdm.

A trainer decides what is trainable and what the loss is (an objective with ``len()`` and
``loss(model, indices, generator)``); this module owns the rest — the accelerator with the pipeline's models frozen on
its device, fp32 trainable parameters, shuffled index batches, autocast/backward/step, the progress bar, periodic
checkpoints and their file names, the non-finite-loss check, the settings every trainer's config carries
(:class:`LoopSettings`) and what every run reports (:class:`TrainResult`) — so the three trainers cannot drift apart.
(The toy world's own trainers, which made its shipped weights, keep their plain loops; the retriever trains in
:mod:`retrieval.training`, a floor below.)
"""

from __future__ import annotations

import logging
import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import torch
from accelerate import Accelerator
from torch import nn
from tqdm.auto import tqdm

from composer.training.data import index_batches
from fusion.errors import TrainingError

logger = logging.getLogger(__name__)

PIPELINE_MODELS = ("vae", "text_encoder", "text_encoder_2", "unet", "transformer")
"""The pipeline attributes that hold models; :func:`frozen_accelerator` freezes those a pipeline has."""


def frozen_accelerator(pipe: Any, mixed_precision: str) -> Accelerator:
    """An accelerator on the GPU when there is one (else the CPU), with every model of ``pipe`` moved to its device
    and frozen: a trainer then makes trainable only what it trains."""
    accelerator = Accelerator(mixed_precision=mixed_precision, cpu=not torch.cuda.is_available())
    for component in PIPELINE_MODELS:
        module = getattr(pipe, component, None)
        if module is not None:
            module.to(accelerator.device).requires_grad_(False)
    return accelerator


def checkpoint_path(out: Path, step: int) -> Path:
    """The checkpoint of ``step`` beside the final file ``out``: ``<stem>-step000100.safetensors``."""
    return out.with_name(f"{out.stem}-step{step:06d}{out.suffix or '.safetensors'}")


class Objective(ABC):
    """A training loss over a fixed set of examples (images, pairs) whose encodings are computed once."""

    @abstractmethod
    def __len__(self) -> int:
        """Number of examples."""

    @abstractmethod
    def loss(self, model: nn.Module, indices: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """The mean loss of ``model`` on the examples at ``indices`` with noise drawn from ``generator``."""

    @torch.no_grad()
    def evaluate(
        self, model: nn.Module, *, draws: int = 4, seed: int = 1234, limit: int = 64, chunk: int = 16
    ) -> float:
        """Mean loss over the first ``limit`` examples × ``draws`` fixed noise draws: the same examples and draws on
        every call, so values before and after training compare. Runs ``chunk`` examples at a time, so a large
        training set neither fills memory nor makes the before/after check cost more than a few training steps."""
        generator = torch.Generator().manual_seed(seed)
        chunks = torch.arange(min(len(self), limit)).split(chunk)
        total = 0.0
        for _ in range(draws):
            total += sum(float(self.loss(model, part, generator)) * len(part) for part in chunks)
        return total / (draws * min(len(self), limit))


@dataclass
class LoopResult:
    """What :func:`optimise` returns: the trained model (unwrapped), the loss per step, checkpoints written."""

    model: nn.Module
    losses: list[float]
    checkpoints: list[Path] = field(default_factory=list)

    def report(self, kind: type[Result], trained: Any, *, path: Path, initial_loss: float, final_loss: float) -> Result:
        """The trainer's result ``kind`` for what it ``trained``, saved at ``path``: this run's losses and checkpoints
        with the evaluation losses before and after."""
        return kind(
            trained,
            path=path,
            losses=self.losses,
            checkpoints=self.checkpoints,
            initial_loss=initial_loss,
            final_loss=final_loss,
        )


def optimise(
    accelerator: Accelerator,
    model: nn.Module,
    params: Iterable[nn.Parameter],
    objective: Objective,
    *,
    steps: int,
    learning_rate: float,
    batch_size: int,
    seed: int,
    desc: str,
    progress: bool = True,
    prepare_model: bool = True,
    checkpoint_every: int = 0,
    save_checkpoint: Callable[[nn.Module, Path, int], object] | None = None,
    final_path: Path | None = None,
) -> LoopResult:
    """Train ``params`` for ``steps`` steps on ``objective.loss(model, …)``.

    ``prepare_model=False`` leaves ``model`` unwrapped (for trainable parameters that live outside it, e.g.
    gates reached through hooks). Every ``checkpoint_every`` steps before the last, ``save_checkpoint(model, path,
    step)`` writes the checkpoint at ``path``, named beside ``final_path`` (:func:`checkpoint_path`). Raises
    :class:`TrainingError` when the loss becomes NaN/Inf.
    """
    if save_checkpoint is not None and checkpoint_every and final_path is None:
        raise TrainingError("checkpoints need the final file's path to be named beside it")
    trainable = list(params)
    if not trainable:
        raise TrainingError("nothing to train: no trainable parameters were found")
    for param in trainable:
        param.data = param.data.float()
        param.requires_grad_(True)
    optimizer = torch.optim.AdamW(trainable, lr=learning_rate, weight_decay=0.0)
    if prepare_model:
        wrapped, optimizer = accelerator.prepare(model, optimizer)
    else:
        wrapped, optimizer = model, accelerator.prepare(optimizer)
    generator = torch.Generator().manual_seed(seed)
    order = index_batches(len(objective), batch_size, generator)
    result = LoopResult(model=model, losses=[])
    bar = tqdm(range(1, steps + 1), desc=desc, disable=not progress)
    for step in bar:
        with accelerator.autocast():
            loss = objective.loss(wrapped, next(order), generator)
        accelerator.backward(loss)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        result.losses.append(float(loss.detach()))
        bar.set_postfix(loss=f"{result.losses[-1]:.4f}")
        if not math.isfinite(result.losses[-1]):
            raise TrainingError(f"the loss became {result.losses[-1]} at step {step}", hint="lower --lr or use fp32")
        if save_checkpoint is not None and checkpoint_every and step % checkpoint_every == 0 and step < steps:
            result.checkpoints.append(checkpoint_path(final_path, step))  # type: ignore[arg-type]  # checked above
            save_checkpoint(accelerator.unwrap_model(wrapped), result.checkpoints[-1], step)
            logger.info("step %d of %d: checkpoint %s", step, steps, result.checkpoints[-1])
    result.model = accelerator.unwrap_model(wrapped) if prepare_model else model
    return result


@dataclass(kw_only=True)
class LoopSettings:
    """The settings every trainer's config carries (the shared ``compose train-*`` flags): what :func:`optimise_with`
    and :func:`frozen_accelerator` read. A trainer's config subclasses it, adds its own fields and gives ``steps``
    and ``learning_rate`` its own defaults (keyword-only, like these)."""

    steps: int
    learning_rate: float
    batch_size: int = 1
    seed: int = 0
    mixed_precision: str = "no"
    progress: bool = True


@dataclass(kw_only=True)
class TrainResult:
    """What every trainer's run reports (the ``compose train-*`` summary): the file it saved, the loss per step, the
    evaluation loss before and after training, and the checkpoints it wrote (none unless asked). A trainer's result
    subclasses it with what it trained."""

    path: Path
    losses: list[float]
    initial_loss: float
    final_loss: float
    checkpoints: list[Path] = field(default_factory=list, kw_only=True)


Result = TypeVar("Result", bound=TrainResult)
"""A trainer's own :class:`TrainResult`."""

_LOOP_KEYWORDS = ("steps", "learning_rate", "batch_size", "seed", "progress")
"""The :class:`LoopSettings` that are :func:`optimise`'s keywords (mixed precision is the accelerator's)."""


def optimise_with(
    settings: LoopSettings,
    accelerator: Accelerator,
    model: nn.Module,
    params: Iterable[nn.Parameter],
    objective: Objective,
    *,
    desc: str,
    **options: Any,
) -> LoopResult:
    """:func:`optimise` with steps, learning rate, batch size, seed and progress taken from ``settings``;
    ``options`` are :func:`optimise`'s remaining keywords."""
    loop = {name: getattr(settings, name) for name in _LOOP_KEYWORDS}
    return optimise(accelerator, model, params, objective, desc=desc, **loop, **options)
