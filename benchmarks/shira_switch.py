"""Fused adapter switching: SHiRA sorted-index scatter (ours) vs diffusers' LoRA load/fuse/unfuse/delete cycle.

``python -m benchmarks.shira_switch [--quick]`` builds the ``sd15-shapes`` UNet (``small-sd`` with ``--quick``) and,
on its attention projections (``to_q``/``to_k``/``to_v``/``to_out.0``: 128 on SD 1.5), makes SHiRA adapters with
r = 32 (K = 32·(out+in) per layer: the parameter count of a rank-32 LoRA) and rank-32 LoRAs, all saved to files.
Per dtype (fp32, fp16) and per support case it times one switch A→B through the public API — a composable pipeline
around the UNet, ``pipe.set_composition({"B": 1.0})`` after ``{"A": 1.0}`` (fused, restored bit-exactly):

- ``ours_memory_ms``: both adapters registered and switched before (their fused states cached in the composed
  layers: the steady state of a server toggling adapters), timed round-robin with the floors
  (``raw_scatter_beside_memory_ms``: the fastest of them in that round);
- ``ours_memory_uncached_ms``: the same with the layers' fused-state cache off (A's positions restored and B's base
  values gathered and summed on every switch, weight by weight);
- ``ours_file_ms``: read B from its SHiRA file (``weights_index.read_adapter``), ``add_adapter``, ``set_composition``
  and ``remove_adapter`` A — the whole from-file cycle, with the layers' fused-state cache at its default (B is a
  new adapter, so its switch is uncached either way; the cache spares re-writing A when B attaches beside it);
  ``read_ms`` is the read alone (validated: sorted positions in range, finite values);
- ``raw_scatter_ms``: the floor — writing B's values at B's positions, nothing saved, nothing restored, nothing
  summed (what a switch would cost if A never had to come out), with the fastest of ``index_put_`` / ``put_`` /
  ``index_copy_`` (each reported: ``raw_index_put_ms``, ``raw_put_ms``, ``raw_index_copy_ms``), into scratch copies
  of the weights and timed round-robin with the public switch, so drift on a shared machine hits both alike;
- ``bare_switch_kernels_ms``: the kernels of an uncached switch alone (restore A's positions, gather B's base
  values, add, write B) on scratch copies, no engine around them — how much of the gap to the floor is the third
  memory pass a first-time switch must make, and how much is bookkeeping;
- ``peer_cycle_ms``: diffusers, on a pipeline around its own copy of the UNet, ``unfuse_lora`` +
  ``delete_adapters`` (A) then ``load_lora_weights`` (B's file) + ``fuse_lora`` — the cycle a fused LoRA server
  pays per switch — timed round-robin with ``ours_file_ms`` (so drift on a shared machine hits both alike).

Support cases: ``independent`` — A and B have their own random masks (the general case: a switch touches the
cache lines of both supports); ``shared`` — A and B share one mask (masks that depend only on the base, like WM and
struct, or one random seed): B overwrites A in one scatter.

Prints ONE JSON document with medians and the ratios. Targets (CPU): the switch through
``set_composition`` — with the fused states cached, the path a server toggling adapters takes — ≤ 1.3× the
two-pass scatter floor timed beside it (``memory_vs_two_pass_floor``); diffusers' cycle / ours from file ≥ 3×
(``ratio_file``). ``uncached_vs_two_pass_floor`` is the first-time switch (B's base values still to be read), reported
beside them. Every run also checks the base is restored bit-exactly.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from diffusers import DiffusionPipeline
from diffusers.utils import logging as diffusers_logging
from safetensors.torch import save_file
from torch import nn

from benchmarks._common import ATTENTION_PROJECTIONS, denoiser_prefix, interleaved_ms, peft_state_dict, random_lora
from composer.mixin import make_composable
from composer.presets import build_denoiser, load_preset, preset_family
from fusion.adapters import Adapter, Sparse
from fusion.sparse import shira_budget
from fusion.sparse_switching import FusedSparseCache
from weights_index.formats.shira import save_shira
from weights_index.reader import read_adapter

RANK = 32


def _targets(unet: nn.Module) -> dict[str, nn.Linear]:
    return {
        name: module
        for name, module in unet.named_modules()
        if isinstance(module, nn.Linear) and ".attn" in name and name.endswith(ATTENTION_PROJECTIONS)
    }


def _shira(targets: dict[str, nn.Linear], seed: int, mask_seed: int, family: str = "sd1") -> Adapter:
    masks = torch.Generator().manual_seed(mask_seed)
    values = torch.Generator().manual_seed(seed)
    layers = {}
    for key, module in targets.items():
        shape = tuple(module.weight.shape)
        k = shira_budget(shape, RANK)
        index = torch.randperm(math.prod(shape), generator=masks)[:k].sort().values
        layers[key] = Sparse(index, torch.randn(k, generator=values) * 1e-3, shape)
    return Adapter(f"shira{seed}", family, layers)


def _median_ms(fn: Callable[[int], None], repeats: int) -> float:
    return _round_robin({"fn": fn}, repeats)["fn"]


def _round_robin(fns: dict[str, Callable[[int], None]], repeats: int) -> dict[str, float]:
    """Median ms of each function, called in turn ``repeats`` times (call ``i`` gets ``i``)."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for i in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn(i)
            times[name].append((time.perf_counter() - start) * 1e3)
    return {name: round(statistics.median(t), 2) for name, t in times.items()}


def _floors(weights: dict[str, torch.Tensor], update: Adapter) -> dict[str, Callable[[int], None]]:
    """B's values written at B's positions into scratch copies of the weights, one primitive each."""
    plain = [
        (weight.detach().clone().view(-1), update.layers[key].index.long(), update.layers[key].values)
        for key, weight in weights.items()
    ]
    plain = [(flat, index, values.to(flat.dtype)) for flat, index, values in plain]
    return {
        "raw_index_put_ms": lambda i: [flat.index_put_((index,), values) for flat, index, values in plain],
        "raw_put_ms": lambda i: [flat.put_(index, values) for flat, index, values in plain],
        "raw_index_copy_ms": lambda i: [flat.index_copy_(0, index, values) for flat, index, values in plain],
    }


def _bare_switch(weights: dict[str, torch.Tensor], adapters: list[Adapter]) -> Callable[[int], None]:
    """The kernels of an uncached switch and nothing else, on scratch copies of the weights: restore the current
    adapter's positions, gather the next one's base values, add, write (call ``i`` switches to adapter ``i % 2``)."""
    flats = {key: weight.detach().clone().view(-1) for key, weight in weights.items()}
    updates = [
        {key: (a.layers[key].index.long(), a.layers[key].values.to(flat.dtype)) for key, flat in flats.items()}
        for a in adapters
    ]
    current = {key: (index, flats[key].take(index)) for key, (index, _) in updates[0].items()}

    def switch(i: int) -> None:
        for key, flat in flats.items():
            old_index, original = current[key]
            flat.index_copy_(0, old_index, original)
            index, values = updates[i % 2][key]
            base = flat.take(index)
            flat.index_copy_(0, index, torch.add(base, values, out=torch.empty_like(base)))
            current[key] = (index, base)

    return switch


@torch.no_grad()
def _ours(
    pipe: DiffusionPipeline,
    targets: dict[str, nn.Linear],
    files: list[Path],
    peer_cycle: Callable[[int], None],
    repeats: int,
) -> dict[str, Any]:
    pristine = {k: m.weight.detach().clone() for k, m in targets.items()}
    adapters = [read_adapter(f) for f in files]
    weights = {k: m.weight for k, m in targets.items()}
    composable = make_composable(pipe)
    for adapter in adapters:
        composable.add_adapter(adapter)
    names = [a.name for a in adapters]
    composable.set_composition({names[0]: 1.0})
    composable.set_composition({names[1]: 1.0})

    def switch(i: int) -> None:
        composable.set_composition({names[i % 2]: 1.0})

    floors = _floors(weights, adapters[1])
    cached = _round_robin({"ours_memory_ms": switch, **floors}, repeats)
    for layer in composable.composition_engine.layers.values():
        layer.sparse_cache = FusedSparseCache(capacity=0)
    bare = _bare_switch(weights, adapters)
    uncached = _round_robin({"ours_memory_uncached_ms": switch, "bare_switch_kernels_ms": bare, **floors}, repeats)
    for layer in composable.composition_engine.layers.values():
        layer.sparse_cache = FusedSparseCache()  # the default again: a file's adapter is new to it in any case
    current = names[(repeats - 1) % 2]

    def from_file(i: int) -> None:
        nonlocal current
        name = f"file{i}"
        composable.add_adapter(read_adapter(files[(i + 1) % 2]), name=name)
        composable.set_composition({name: 1.0})
        composable.remove_adapter(current)
        current = name

    cycles = _round_robin({"ours_file_ms": from_file, "peer_cycle_ms": peer_cycle}, repeats)
    read = _median_ms(lambda i: read_adapter(files[i % 2]), repeats)
    composable.clear_composition()
    for name in list(composable.adapters):
        composable.remove_adapter(name)
    exact = all(torch.equal(m.weight, pristine[k]) for k, m in targets.items())
    memory_floor = min(cached[name] for name in floors)
    floor = {name: uncached[name] for name in floors}
    floor_ms = min(floor.values())
    return {
        "raw_scatter_ms": floor_ms,
        **floor,
        "ours_memory_ms": cached["ours_memory_ms"],
        "raw_scatter_beside_memory_ms": memory_floor,
        "ours_memory_uncached_ms": uncached["ours_memory_uncached_ms"],
        "bare_switch_kernels_ms": uncached["bare_switch_kernels_ms"],
        **cycles,
        "read_ms": read,
        "restored_bit_exact": exact,
        "memory_vs_two_pass_floor": round(cached["ours_memory_ms"] / (2 * memory_floor), 2),
        "uncached_vs_two_pass_floor": round(uncached["ours_memory_uncached_ms"] / (2 * floor_ms), 2),
        "bare_kernels_vs_two_pass_floor": round(uncached["bare_switch_kernels_ms"] / (2 * floor_ms), 2),
        "ratio_file": round(cycles["peer_cycle_ms"] / cycles["ours_file_ms"], 2),
        "ratio_memory": round(cycles["peer_cycle_ms"] / cached["ours_memory_ms"], 2),
    }


def _pipeline(unet: nn.Module) -> DiffusionPipeline:
    """A Stable Diffusion pipeline around ``unet`` (small-sd's text encoder, VAE and scheduler), for the peer's
    pipeline-level ``load_lora_weights``."""
    diffusers_logging.set_verbosity_error()  # one "no text-encoder keys" warning per load otherwise
    donor = load_preset("small-sd")
    return type(donor)(**{**donor.components, "unet": unet})


class _PeerCycle:
    """diffusers' fused LoRA server cycle on its own pipeline (its own UNet copy), so it can be timed round-robin
    with ours: ``unfuse_lora`` + ``delete_adapters`` (the current LoRA), ``load_lora_weights`` (the next file) +
    ``fuse_lora``."""

    def __init__(self, pipe: DiffusionPipeline, files: list[Path]) -> None:
        self.pipe, self.files, self.count = pipe, files, 0
        pipe.load_lora_weights(str(files[0]), adapter_name="lora0")
        pipe.fuse_lora(lora_scale=1.0)

    @torch.no_grad()
    def __call__(self, i: int) -> None:
        self.pipe.unfuse_lora()
        self.pipe.delete_adapters(f"lora{self.count}")
        self.count += 1
        name = f"lora{self.count}"
        self.pipe.load_lora_weights(str(self.files[self.count % 2]), adapter_name=name)
        self.pipe.fuse_lora(lora_scale=1.0, adapter_names=[name])

    def close(self) -> None:
        """Unfuse and unload: PEFT's wrappers out of the module tree again."""
        self.pipe.unfuse_lora()
        self.pipe.unload_lora_weights()


@torch.no_grad()
def against_hotswap(pipe: DiffusionPipeline, repeats: int) -> dict[str, Any]:
    """SHiRA switches on ``pipe`` (made composable in place) against diffusers' hotswap on a copy of it.

    Ours: two SHiRA files (independent random masks, r = 32) registered and switched through ``set_composition``
    (``ours_memory_ms``: fused states cached), and the from-file cycle (``ours_file_ms``: read, add, compose,
    remove the one read before). Peer: ``enable_lora_hotswap(target_rank=32)``, one rank-32 LoRA loaded, then every
    switch
    ``load_lora_weights(next_file, adapter_name=..., hotswap=True)`` (PEFT's unfused layers, weights replaced in
    place, so a compiled model does not recompile). All three timed round-robin (CUDA synchronised), with each one's
    peak memory; the base is checked to be restored bit-exactly afterwards.
    """
    prefix = denoiser_prefix(pipe)
    denoiser = getattr(pipe, prefix)
    device = denoiser.device
    family = preset_family(pipe)
    diffusers_logging.set_verbosity_error()
    peer = type(pipe)(**{**pipe.components, prefix: copy.deepcopy(denoiser)})
    ours = make_composable(pipe)
    targets = _targets(denoiser)
    pristine = {k: m.weight.detach().clone() for k, m in targets.items()}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        shira_files = [
            save_shira(_shira(targets, seed, seed, family), folder / f"shira{seed}.safetensors", {"r": str(RANK)})
            for seed in (0, 1)
        ]
        lora_files = [folder / f"lora{seed}.safetensors" for seed in (0, 1)]
        for seed, path in enumerate(lora_files):
            save_file(peft_state_dict(random_lora(denoiser, seed, RANK), f"{prefix}."), str(path))
        names = [ours.add_adapter(read_adapter(path)) for path in shira_files]
        ours.set_composition({names[0]: 1.0})
        ours.set_composition({names[1]: 1.0})
        peer.enable_lora_hotswap(target_rank=RANK)
        peer.load_lora_weights(str(lora_files[0]), adapter_name="hot")
        turn = {"memory": 0, "file": 0, "peer": 0}
        current: list[str] = []

        def memory_switch() -> None:
            turn["memory"] += 1
            ours.set_composition({names[turn["memory"] % 2]: 1.0})

        def file_cycle() -> None:
            turn["file"] += 1
            name = ours.add_adapter(read_adapter(shira_files[turn["file"] % 2]), name=f"file{turn['file']}")
            ours.set_composition({name: 1.0})
            if current:
                ours.remove_adapter(current.pop())
            current.append(name)

        def hotswap() -> None:
            turn["peer"] += 1
            peer.load_lora_weights(str(lora_files[turn["peer"] % 2]), adapter_name="hot", hotswap=True)

        peaks: dict[str, int] = {}
        ms = interleaved_ms(
            {"ours_memory_ms": memory_switch, "ours_file_ms": file_cycle, "peer_hotswap_ms": hotswap},
            repeats,
            device,
            peaks,
        )
        ours.clear_composition()
        for name in list(ours.adapters):
            ours.remove_adapter(name)
    exact = all(torch.equal(m.weight, pristine[k]) for k, m in targets.items())
    return {
        **{name: round(value, 3) for name, value in ms.items()},
        "peer_hotswap_vs_ours_memory": round(ms["peer_hotswap_ms"] / ms["ours_memory_ms"], 2),
        "peer_hotswap_vs_ours_file": round(ms["peer_hotswap_ms"] / ms["ours_file_ms"], 2),
        "peak_bytes": peaks,
        "layers": len(targets),
        "restored_bit_exact": exact,
    }


def run(quick: bool) -> dict[str, Any]:
    """Build the UNet, write the adapter files, time both sides in fp32 and fp16; return the JSON document."""
    preset = "small-sd" if quick else "sd15-shapes"
    repeats = 5 if quick else 9
    start = time.perf_counter()
    unet = build_denoiser(preset).eval().requires_grad_(False)
    build_s = time.perf_counter() - start
    pipe = _pipeline(unet)
    peer_pipe = _pipeline(copy.deepcopy(unet))  # its own UNet, so both sides can be timed round-robin
    targets = _targets(unet)  # the Linear objects stay valid after dtype casts
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        cases = {"independent": (0, 1), "shared": (7, 7)}
        shira_files = {
            case: [
                save_shira(_shira(targets, s, m), folder / f"{case}{s}.safetensors", {"r": str(RANK)})
                for s, m in zip((0, 1), masks)
            ]
            for case, masks in cases.items()
        }
        lora_files = [folder / f"lora{s}.safetensors" for s in (0, 1)]
        for seed, path in enumerate(lora_files):
            save_file(peft_state_dict(random_lora(unet, seed, RANK)), str(path))
        for dtype in (torch.float32, torch.float16):
            pipe.unet.to(dtype)
            peer_pipe.unet.to(dtype)
            peer = _PeerCycle(peer_pipe, lora_files)
            for case, files in shira_files.items():
                results[f"{str(dtype).removeprefix('torch.')}_{case}"] = _ours(pipe, targets, files, peer, repeats)
            peer.close()
    params = sum(shira_budget(tuple(m.weight.shape), RANK) for m in targets.values())
    return {
        "benchmark": "shira_switch",
        "preset": preset,
        "quick": quick,
        "layers": len(targets),
        "params_per_adapter": params,
        "build_s": round(build_s, 2),
        "threads": torch.get_num_threads(),
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
        "torch": torch.__version__,
        "results": results,
        "path": "public API: set_composition on a composable pipeline (add_adapter / remove_adapter from file)",
        "targets": {"memory_vs_two_pass_floor": 1.3, "ratio_file": 3},
    }


def main(argv: list[str] | None = None) -> int:
    """Parse ``--quick`` and print the JSON document."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small-sd UNet and fewer repeats")
    args = parser.parse_args(argv)
    json.dump(run(args.quick), sys.stdout, indent=2)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
