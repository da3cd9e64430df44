"""Catalog build speed: our header-only scan vs a scan that loads every tensor, and the no-change rescan.

``python -m benchmarks.index_build [--n 200] [--quick]`` generates N SD-1.5-shaped kohya LoRA files once
(rank 8–32 on the UNet's 128 attention projections and the text encoder's 48, fp32, ~9–35 MB each) into
``$LORA_COMPOSER_CACHE/bench/index_build/nN`` and prints one JSON document:

- ``ours``: :meth:`Library.scan` on a fresh catalog (SHA-256 + safetensors header + metadata per file), then a
  rescan with nothing changed (stat only);
- ``baseline``: the same per-file work, but reading every tensor (:func:`read_adapter`) as a catalog that
  classifies files by loading them would;
- the ratios baseline/ours and first-scan/rescan.

All passes run after a warm-up read (and one untimed read_adapter for its one-time imports), so the page
cache holds every file and the numbers compare per-file CPU work.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from weights_index.catalog import Library
from weights_index.hashing import file_sha256
from weights_index.metadata import read_metadata
from weights_index.reader import probe, read_adapter

RANKS = (8, 12, 16, 24, 32)
QUICK_N = 10
TEXT_WIDTH = 768
UNET_BLOCKS = (
    [(f"down_blocks_{b}_attentions_{a}", (320, 640, 1280)[b]) for b in range(3) for a in range(2)]
    + [("mid_block_attentions_0", 1280)]
    + [(f"up_blocks_{b}_attentions_{a}", (1280, 640, 320)[b - 1]) for b in range(1, 4) for a in range(3)]
)
"""SD-1.5's 16 transformer blocks (diffusers names, kohya-flattened) and their widths."""


def sd15_modules() -> dict[str, tuple[int, int]]:
    """kohya module name → (in, out) for every attention projection of SD-1.5's UNet and text encoder."""
    modules: dict[str, tuple[int, int]] = {}
    for block, width in UNET_BLOCKS:
        prefix = f"lora_unet_{block}_transformer_blocks_0"
        for proj in ("to_q", "to_k", "to_v", "to_out_0"):
            modules[f"{prefix}_attn1_{proj}"] = (width, width)
            fan_in = TEXT_WIDTH if proj in ("to_k", "to_v") else width
            modules[f"{prefix}_attn2_{proj}"] = (fan_in, width)
    for layer in range(12):
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            modules[f"lora_te_text_model_encoder_layers_{layer}_self_attn_{proj}"] = (TEXT_WIDTH, TEXT_WIDTH)
    return modules


def write_lora(path: Path, rank: int, seed: int) -> None:
    """One SD-1.5 LoRA in kohya layout with realistic training metadata."""
    generator = torch.Generator().manual_seed(seed)
    tensors: dict[str, torch.Tensor] = {}
    for name, (fan_in, fan_out) in sd15_modules().items():
        tensors[f"{name}.lora_down.weight"] = torch.randn(rank, fan_in, generator=generator) / fan_in**0.5
        tensors[f"{name}.lora_up.weight"] = torch.randn(fan_out, rank, generator=generator) * 1e-3
        tensors[f"{name}.alpha"] = torch.tensor(float(rank))
    metadata = {
        "ss_output_name": path.stem,
        "ss_base_model_version": "sd_v1",
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(rank),
        "ss_network_alpha": str(rank),
        "ss_tag_frequency": json.dumps({f"10_{path.stem}": {path.stem: 40, "solo": 25, "looking at viewer": 12}}),
    }
    partial = path.with_suffix(".partial")
    save_file(tensors, str(partial), metadata=metadata)
    partial.replace(path)


def ensure_library(n: int, cache: Path) -> Path:
    """The folder of N generated files (made once; later runs reuse it)."""
    folder = cache / f"n{n}"
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        path = folder / f"sd15_lora_{i:04d}.safetensors"
        if not path.exists():
            write_lora(path, RANKS[i % len(RANKS)], seed=i)
    return folder


def full_read_scan(files: list[Path]) -> int:
    """Baseline: per file, hash + metadata + load and build every tensor; returns the layer count."""
    layers = 0
    for path in files:
        sha = file_sha256(path)
        adapter = read_adapter(path)
        read_metadata(path, probe(path).metadata, sha256=sha)
        layers += len(adapter.layers) + len(adapter.text_encoder_layers)
    return layers


def run(n: int, cache: Path) -> dict[str, Any]:
    """Generate (once) and measure; returns the JSON document."""
    folder = ensure_library(n, cache)
    files = sorted(folder.glob("*.safetensors"))[:n]
    total_bytes = sum(p.stat().st_size for p in files)
    start = time.perf_counter()
    for path in files:
        file_sha256(path)  # warm the page cache
    warmup_s = time.perf_counter() - start
    read_adapter(files[0])  # one-time imports (diffusers' converters) are not per-file work

    start = time.perf_counter()
    full_read_scan(files)
    baseline_s = time.perf_counter() - start

    start = time.perf_counter()
    for path in files:
        probe(path)
    header_only_s = time.perf_counter() - start

    with tempfile.TemporaryDirectory() as scratch:
        library = Library(folder, db_path=Path(scratch) / "catalog.sqlite")
        first = library.scan()
        rescan = library.scan()
        entries = library.entries()
    if len(first.added) != len(files) or first.broken or rescan.unchanged != len(files):
        raise RuntimeError(f"unexpected scan results: {first.to_json()} then {rescan.to_json()}")
    if not all(e.rank in RANKS and e.family == "sd1" for e in entries):
        raise RuntimeError("generated files were misclassified")
    return {
        "benchmark": "index_build",
        "files": len(files),
        "total_mb": round(total_bytes / 1e6, 1),
        "mean_file_mb": round(total_bytes / 1e6 / len(files), 1),
        "ours": {
            "what": "Library.scan: sha256 + safetensors header + metadata per file, one SQLite transaction",
            "first_scan_s": round(first.seconds, 4),
            "files_per_s": round(len(files) / first.seconds, 1),
            "rescan_s": round(rescan.seconds, 5),
            "rescan_files_per_s": round(len(files) / rescan.seconds, 1),
            "header_only_probe_s": round(header_only_s, 4),
        },
        "baseline": {
            "what": "sha256 + read_adapter (every tensor loaded and checked) + metadata per file",
            "scan_s": round(baseline_s, 4),
            "files_per_s": round(len(files) / baseline_s, 1),
        },
        "ratio_full_read_over_ours": round(baseline_s / first.seconds, 2),
        "ratio_first_scan_over_rescan": round(first.seconds / rescan.seconds, 1),
        "warmup_read_s": round(warmup_s, 3),
        "hardware": {"cpus": os.cpu_count(), "machine": platform.machine(), "python": platform.python_version()},
    }


def default_cache() -> Path:
    """``$LORA_COMPOSER_CACHE/bench/index_build`` (``.cache/lora-composer`` when unset)."""
    return Path(os.environ.get("LORA_COMPOSER_CACHE", ".cache/lora-composer")) / "bench" / "index_build"


def main(argv: list[str] | None = None) -> int:
    """Parse arguments, run, print one JSON document."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=200, help="number of LoRA files (default 200)")
    parser.add_argument("--quick", action="store_true", help=f"use {QUICK_N} files (for make bench)")
    parser.add_argument("--cache-dir", type=Path, default=None, help="where generated files are kept")
    args = parser.parse_args(argv)
    n = QUICK_N if args.quick else args.n
    document = run(n, args.cache_dir or default_cache())
    json.dump(document, sys.stdout, indent=2)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
