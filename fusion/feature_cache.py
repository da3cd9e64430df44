"""DeepCache-style deep-feature reuse on a stock diffusers UNet, for CMLoRA's other adapters (docs/methods.md#cmlora).

A UNet's output depends on its deep path (down blocks ≥ s, the mid block, up blocks except the last s) only through
the feature that path hands to up block ``-s`` (its input). That feature changes slowly from step to step, so a pass
may reuse the one captured during an earlier full pass and recompute only the shallow levels: ``conv_in``, the first
``s`` down blocks, the last ``s`` up blocks and the output head.

Nothing is forked. A full pass registers a forward hook on the up block just before the shallow part and keeps its
output. A shallow pass temporarily gives the deep blocks (and the downsamplers at the bottom of the last shallow down
block, whose output only feeds the deep path) instance-level ``forward`` stubs that skip their work — the boundary
block's stub returns the cached feature, the others return a placeholder of the right arity — and puts the original
methods back afterwards, also on error. ``s = shallow_levels`` (default 1: the highest-resolution level only).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

import torch
from torch import nn

from fusion.errors import CompositionError

T = TypeVar("T")


def is_unet(denoiser: nn.Module) -> bool:
    """True for a UNet-shaped denoiser (``down_blocks``, ``up_blocks`` and ``conv_in``) — what this cache needs."""
    return all(hasattr(denoiser, name) for name in ("down_blocks", "up_blocks", "conv_in"))


def _hidden_states(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """The block input, positional or by keyword (diffusers calls blocks both ways)."""
    return kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]


class UNetFeatureCache:
    """Capture the deep feature of a full UNet pass; run later passes through the shallow levels only."""

    def __init__(self, unet: nn.Module, shallow_levels: int = 1) -> None:
        if not is_unet(unet):
            raise CompositionError(
                f"feature caching needs a UNet (down_blocks / up_blocks), got {type(unet).__name__}",
                hint="use output-level caching (cache='output') on transformer denoisers",
            )
        levels = len(unet.down_blocks)
        if isinstance(shallow_levels, bool) or not isinstance(shallow_levels, int) or not 1 <= shallow_levels < levels:
            raise CompositionError(
                f"shallow_levels must be a whole number in 1…{levels - 1} for this UNet, got {shallow_levels!r}"
            )
        down = list(unet.down_blocks)
        up = list(unet.up_blocks)
        self.shallow_levels = shallow_levels
        self.boundary: nn.Module = up[-shallow_levels - 1]
        """The last deep block: its output is the cached feature."""
        self._down_stubs = [
            (block, len(block.resnets) + int(block.downsamplers is not None)) for block in down[shallow_levels:]
        ]
        self._passthrough: list[nn.Module] = [*up[: -shallow_levels - 1]]
        if unet.mid_block is not None:
            self._passthrough.append(unet.mid_block)
        last_shallow = down[shallow_levels - 1]
        if last_shallow.downsamplers is not None:
            self._passthrough.extend(last_shallow.downsamplers)

    def full(self, run: Callable[[], T]) -> tuple[T, torch.Tensor]:
        """Run a full pass; return its output and the deep feature it produced."""
        captured: list[torch.Tensor] = []

        def keep(_module: nn.Module, _args: Any, output: torch.Tensor) -> None:
            captured.append(output)

        handle = self.boundary.register_forward_hook(keep)
        try:
            output = run()
        finally:
            handle.remove()
        if not captured:
            raise CompositionError("the UNet pass never reached its cached block", hint="use cache='output'")
        return output, captured[-1]

    def shallow(self, run: Callable[[], T], feature: torch.Tensor) -> T:
        """Run a pass that recomputes only the shallow levels, with ``feature`` in place of the deep path's output."""
        with self._stubbed(feature):
            return run()

    @contextmanager
    def _stubbed(self, feature: torch.Tensor) -> Iterator[None]:
        saved: list[tuple[nn.Module, Any]] = []

        def stub(module: nn.Module, forward: Callable[..., Any]) -> None:
            saved.append((module, module.__dict__.get("forward")))
            module.forward = forward

        try:
            for block, outputs in self._down_stubs:
                stub(block, _down_stub(outputs))
            for module in self._passthrough:
                stub(module, _passthrough_stub)
            stub(self.boundary, lambda *args, **kwargs: feature)
            yield
        finally:
            for module, previous in reversed(saved):
                if previous is None:
                    del module.forward
                else:
                    module.forward = previous


def _passthrough_stub(*args: Any, **kwargs: Any) -> Any:
    """A skipped block that returns its input unchanged (its output feeds only skipped blocks)."""
    return _hidden_states(args, kwargs)


def _down_stub(outputs: int) -> Callable[..., Any]:
    """A skipped down block: ``(hidden_states, residuals)`` with as many residual placeholders as the real one."""

    def forward(*args: Any, **kwargs: Any) -> tuple[Any, tuple[Any, ...]]:
        hidden = _hidden_states(args, kwargs)
        return hidden, (hidden,) * outputs

    return forward
