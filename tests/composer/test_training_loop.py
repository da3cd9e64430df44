"""The shared optimisation loop: it trains, checkpoints on schedule, and stops on a non-finite loss."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from accelerate import Accelerator
from torch import nn

from composer.training.loop import LoopResult, Objective, optimise
from fusion.errors import TrainingError


class _Regression:
    """Fit y = 3x with a 1-parameter model; ``poison_at`` makes the loss NaN from that step on."""

    def __init__(self, poison_at: int | None = None) -> None:
        self.x = torch.linspace(-1, 1, 16)[:, None]
        self.calls = 0
        self.poison_at = poison_at

    def __len__(self) -> int:
        return 16

    def loss(self, model: nn.Module, index: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        self.calls += 1
        loss = ((model(self.x[index]) - 3 * self.x[index]) ** 2).mean()
        return loss * float("nan") if self.poison_at and self.calls >= self.poison_at else loss


def _fit(objective: _Regression, steps: int, **options: Any) -> LoopResult:
    """``optimise`` on a one-weight linear model, lr 0.1, batches of 4, seed 0, no progress bar."""
    model = nn.Linear(1, 1, bias=False)
    loop: dict[str, Any] = {
        "steps": steps,
        "learning_rate": 0.1,
        "batch_size": 4,
        "seed": 0,
        "desc": "test",
        "progress": False,
    }
    return optimise(Accelerator(cpu=True), model, model.parameters(), objective, **loop, **options)


def test_loop_trains_and_checkpoints_on_schedule(tmp_path: Path) -> None:
    saved: list[int] = []

    def save(trained: nn.Module, path: Path, step: int) -> None:
        saved.append(step)
        path.write_bytes(b"")

    result = _fit(
        _Regression(), 60, checkpoint_every=25, save_checkpoint=save, final_path=tmp_path / "adapter.safetensors"
    )
    assert saved == [25, 50]
    written = [tmp_path / "adapter-step000025.safetensors", tmp_path / "adapter-step000050.safetensors"]
    assert result.checkpoints == written
    assert all(path.is_file() for path in written)
    assert len(result.losses) == 60
    assert result.losses[-1] < result.losses[0] / 10


def test_checkpoints_without_the_final_path_are_refused_before_training() -> None:
    objective = _Regression()
    with pytest.raises(TrainingError, match="final file"):
        _fit(objective, 10, checkpoint_every=5, save_checkpoint=lambda *_: None)
    assert objective.calls == 0


def test_non_finite_loss_stops_with_a_typed_error() -> None:
    objective = _Regression(poison_at=3)
    with pytest.raises(TrainingError, match="step 3"):
        _fit(objective, 10)
    assert objective.calls == 3


def test_nothing_to_train_is_a_typed_error() -> None:
    with pytest.raises(TrainingError, match="nothing to train"):
        optimise(
            Accelerator(cpu=True),
            nn.Identity(),
            [],
            _Regression(),
            steps=1,
            learning_rate=0.1,
            batch_size=1,
            seed=0,
            desc="test",
            progress=False,
        )


class _Sized(Objective):
    """Records the size of every batch it is asked for; the loss of a batch is the mean of its indices."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.batches: list[int] = []

    def __len__(self) -> int:
        return self.size

    def loss(self, model: nn.Module, indices: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        self.batches.append(len(indices))
        return indices.float().mean()


def test_evaluate_is_bounded_in_batch_and_examples() -> None:
    """A large training set is evaluated on a fixed first slice, a few examples at a time (it once ran every image
    in one batch: minutes and gigabytes for a few hundred images)."""
    objective = _Sized(1000)
    value = objective.evaluate(nn.Identity(), draws=2, limit=40, chunk=16)
    assert objective.batches == [16, 16, 8, 16, 16, 8]
    assert value == pytest.approx(sum(range(40)) / 40)
    small = _Sized(5)
    assert small.evaluate(nn.Identity(), draws=1) == pytest.approx(2.0)
    assert small.batches == [5]
