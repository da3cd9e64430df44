"""Resumable training checkpoints in safetensors (no pickle): module weights, optimizer moments, RNG and step."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from composer.toyworld.data import WorldRandom


def save_checkpoint(
    path: Path,
    modules: dict[str, torch.nn.Module | dict[str, torch.Tensor]],
    optimizers: dict[str, torch.optim.Optimizer],
    generator: WorldRandom,
    meta: dict[str, Any],
) -> None:
    """Write everything needed to continue training, atomically (temp file, then rename)."""
    tensors: dict[str, torch.Tensor] = {}
    for prefix, module in modules.items():
        weights = module.state_dict() if isinstance(module, torch.nn.Module) else module
        tensors.update({f"{prefix}.{k}": v.detach().contiguous().cpu() for k, v in weights.items()})
    groups: dict[str, Any] = {}
    for prefix, optimizer in optimizers.items():
        state = optimizer.state_dict()
        groups[prefix] = state["param_groups"]
        for index, slots in state["state"].items():
            for slot, value in slots.items():
                tensor = value if torch.is_tensor(value) else torch.tensor(value)
                tensors[f"optim.{prefix}.{index}.{slot}"] = tensor.detach().contiguous().cpu()
    state = generator.get_state()
    tensors["rng.layout"] = state["layout"]
    header = {"meta": json.dumps(meta), "param_groups": json.dumps(groups), "rng": json.dumps(state["content"])}
    tmp = path.with_suffix(".tmp")
    save_file(tensors, str(tmp), metadata=header)
    os.replace(tmp, path)


def load_checkpoint(
    path: Path,
    modules: dict[str, torch.nn.Module | dict[str, torch.Tensor]],
    optimizers: dict[str, torch.optim.Optimizer],
    generator: WorldRandom,
) -> dict[str, Any]:
    """Restore a checkpoint written by :func:`save_checkpoint` in place; returns its ``meta``."""
    from safetensors import safe_open

    with safe_open(str(path), "pt") as handle:
        header = handle.metadata()
    tensors = load_file(str(path))
    for prefix, module in modules.items():
        state = {k[len(prefix) + 1 :]: v for k, v in tensors.items() if k.startswith(prefix + ".")}
        if isinstance(module, torch.nn.Module):
            module.load_state_dict(state)
        else:
            for key, value in state.items():
                module[key].copy_(value)
    groups = json.loads(header["param_groups"])
    for prefix, optimizer in optimizers.items():
        slots: dict[int, dict[str, torch.Tensor]] = {}
        for key, value in tensors.items():
            if key.startswith(f"optim.{prefix}."):
                index, slot = key[len(f"optim.{prefix}.") :].split(".", 1)
                slots.setdefault(int(index), {})[slot] = value
        optimizer.load_state_dict({"state": slots, "param_groups": groups[prefix]})
    generator.set_state({"content": json.loads(header["rng"]), "layout": tensors["rng.layout"]})
    return json.loads(header["meta"])
