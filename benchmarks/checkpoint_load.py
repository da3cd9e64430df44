"""Loading a single-file checkpoint: ours (`--model FILE.safetensors`, offline) vs diffusers' ``from_single_file``
given a local config folder, in one process, on the same file.

``python -m benchmarks.checkpoint_load [--quick] [--repeats 3]`` writes an SD-1.5-shaped checkpoint once (random
weights, LDM layout, fp16: 860M-parameter UNet, CLIP ViT-L/14 text encoder, the SD autoencoder; ~2.1 GB) into
``$LORA_COMPOSER_CACHE/bench/checkpoint_load/`` and times, alternating, with the file in the page cache:

- ``ours_s``: :func:`composer.presets.load_preset` on the file (shipped configs sized from the file, tokenizer
  rebuilt from open_clip's vocabulary, diffusers' converters);
- ``diffusers_s``: ``StableDiffusionPipeline.from_single_file(file, config=DIR, local_files_only=True)`` where DIR
  holds the same configs and tokenizer files (what diffusers needs to run offline at all);

both into fp16, and prints the medians and their ratio. It also reports whether the two pipelines' UNets are equal
(``unets_equal_given_our_configs``): diffusers is fed the configs our loader derived, so this checks the weight
conversion, not the configs (no diffusers-owned config for this file is available offline).
``--quick`` uses a small SD-shaped checkpoint (UNet widths 64/128/256) so it takes seconds.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from diffusers import StableDiffusionPipeline

from benchmarks import _checkpoint_writers as cw
from benchmarks._common import cpu_hardware
from composer.cli.arg_types import positive_int
from composer.presets import PRESETS, load_preset, preset_cache_root

QUICK_SIZES = {
    "unet": {
        "block_out_channels": [64, 128, 256],
        "down_block_types": ["CrossAttnDownBlock2D"] * 2 + ["DownBlock2D"],
        "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 2,
    },
    "vae": {"block_out_channels": [32, 32, 64, 64]},
    "text_encoder": {"num_hidden_layers": 2},
}
"""What ``--quick`` changes in the ``sd15-shapes`` preset's component configs (a small SD-shaped file)."""


def _write(path: Path, quick: bool) -> None:
    """Build the ``sd15-shapes`` preset's components (default init; smaller with ``quick``) and write them as one
    fp16 LDM checkpoint."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    configs = {name: config for name, (_, config) in PRESETS["sd15-shapes"].components().items()}
    if quick:
        configs = {name: config | QUICK_SIZES.get(name, {}) for name, config in configs.items()}
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**configs["unet"])
    tensors = cw.prefixed(cw.unet_to_ldm(unet), "model.diffusion_model.")
    del unet
    tensors |= cw.prefixed(cw.vae_to_ldm(AutoencoderKL(**configs["vae"])), "first_stage_model.")
    text = CLIPTextModel(CLIPTextConfig(**configs["text_encoder"]))
    tensors |= cw.prefixed(cw.clip_to_ldm(text), "cond_stage_model.transformer.")
    partial = path.with_suffix(".partial")
    cw.save(tensors, partial, dtype=torch.float16)
    os.replace(partial, path)


def _config_folder(pipe: Any, folder: Path) -> Path:
    """What ``from_single_file(config=...)`` reads offline: model_index.json and every component's config."""
    pipe.save_config(folder)
    pipe.unet.save_config(folder / "unet")
    pipe.vae.save_config(folder / "vae")
    pipe.text_encoder.config.save_pretrained(folder / "text_encoder")
    pipe.tokenizer.save_pretrained(folder / "tokenizer")
    pipe.scheduler.save_config(folder / "scheduler")
    return folder


def _timed(load: Any) -> tuple[float, Any]:
    start = time.perf_counter()
    pipe = load()
    return time.perf_counter() - start, pipe


def main(argv: list[str] | None = None) -> int:
    """Write the checkpoint if needed, time both loaders alternately and print one JSON document."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a small SD-shaped checkpoint (seconds)")
    parser.add_argument("--repeats", type=positive_int, default=3, help="timed runs per loader (at least 1)")
    args = parser.parse_args(argv)
    folder = preset_cache_root().parent / "bench" / "checkpoint_load"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / ("small-sd-fp16.safetensors" if args.quick else "sd15-shapes-fp16.safetensors")
    if not path.exists():
        _write(path, args.quick)
    path.read_bytes()  # into the page cache: both loaders then read from memory
    dtype = torch.float16
    ours_s, peer_s = [], []
    with tempfile.TemporaryDirectory() as tmp:
        config = None
        for _ in range(args.repeats if not args.quick else 1):
            seconds, ours = _timed(lambda: load_preset(str(path), torch_dtype=dtype))
            ours_s.append(seconds)
            if config is None:
                config = _config_folder(ours, Path(tmp) / "config")
            del ours
            seconds, peer = _timed(
                lambda folder=config: StableDiffusionPipeline.from_single_file(
                    str(path), config=str(folder), local_files_only=True, torch_dtype=dtype
                )
            )
            peer_s.append(seconds)
            del peer
        ours = load_preset(str(path), torch_dtype=dtype)
        peer = StableDiffusionPipeline.from_single_file(
            str(path), config=str(config), local_files_only=True, torch_dtype=dtype
        )
        a, b = ours.unet.state_dict(), peer.unet.state_dict()
        same = sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)
    ours_median, peer_median = statistics.median(ours_s), statistics.median(peer_s)
    print(
        json.dumps(
            {
                "benchmark": "checkpoint_load",
                "file": path.name,
                "file_gb": round(path.stat().st_size / 1e9, 3),
                "dtype": "float16",
                "ours_s": [round(s, 3) for s in ours_s],
                "diffusers_s": [round(s, 3) for s in peer_s],
                "ours_median_s": round(ours_median, 3),
                "diffusers_median_s": round(peer_median, 3),
                "ratio_ours_over_diffusers": round(ours_median / peer_median, 3),
                "unets_equal_given_our_configs": same,
                "comparison": "diffusers is given the configs our loader derived from the file",
                "hardware": cpu_hardware(torch.get_num_threads()),
            },
            indent=2,
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
