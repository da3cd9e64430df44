"""Catalog build speed: our header-only scan vs a scan that loads every tensor, hashing timed apart, with a cold and
a warm page cache; and the no-change rescan.

``python -m benchmarks.index_build [--n 200] [--quick]`` generates N SD-1.5-shaped kohya LoRA files once
(rank 8–32 on the UNet's 128 attention projections and the text encoder's 48, fp32, ~9–35 MB each) into
``$LORA_COMPOSER_CACHE/bench/index_build/nN`` and prints one JSON document with, per page-cache state:

- ``hash_s``: SHA-256 of every file alone (what any catalog that keys files by content pays; I/O-bound cold);
- ``header_probe_s``: our classification, the safetensors header only (:func:`probe`), no hashing;
- ``full_read_s``: a classification that loads every tensor (:func:`read_adapter`), no hashing;
- ``library_scan_s``: :meth:`Library.scan` on a fresh catalog (hash + header + metadata + SQLite), the real command;

and the ratios full-read/header-probe (parsing alone) and (hash + full read)/scan (whole catalog builds).
"cold": before each pass every file is dropped from the page cache (``posix_fadvise(DONTNEED)``, which drops clean
pages without root; the JSON says whether it was available); "warm": every file was read just before. A rescan of
the unchanged library (stat only) is timed once.
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


def _evict(files: list[Path]) -> bool:
    """Drop the files' pages from the page cache (clean pages; no root needed); False where unsupported."""
    if not hasattr(os, "posix_fadvise"):
        return False
    for path in files:
        descriptor = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(descriptor, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(descriptor)
    return True


def _warm(files: list[Path]) -> None:
    for path in files:
        with open(path, "rb") as handle:
            while handle.read(1 << 24):
                pass


def _passes(files: list[Path], folder: Path, cold: bool) -> dict[str, float]:
    """Time each pass over ``files`` with the page cache cold (evicted before each) or warm (read before each)."""

    def timed(work: Any) -> float:
        if cold:
            _evict(files)
        else:
            _warm(files)
        start = time.perf_counter()
        work()
        return round(time.perf_counter() - start, 4)

    def scan() -> None:
        with tempfile.TemporaryDirectory() as scratch:
            report = Library(folder, db_path=Path(scratch) / "catalog.sqlite").scan()
        if len(report.added) != len(files) or report.broken:
            raise RuntimeError(f"unexpected scan results: {report.to_json()}")

    return {
        "hash_s": timed(lambda: [file_sha256(p) for p in files]),
        "header_probe_s": timed(lambda: [probe(p) for p in files]),
        "full_read_s": timed(lambda: [read_adapter(p) for p in files]),
        "library_scan_s": timed(scan),
    }


def run(n: int, cache: Path) -> dict[str, Any]:
    """Generate (once) and measure; returns the JSON document."""
    folder = ensure_library(n, cache)
    files = sorted(folder.glob("*.safetensors"))[:n]
    if len(files) != len(list(folder.glob("*.safetensors"))):
        raise RuntimeError(f"{folder} holds more than {n} files; use its own cache folder")
    total_bytes = sum(p.stat().st_size for p in files)
    read_adapter(files[0])  # one-time imports (diffusers' converters) are not per-file work
    evictable = _evict(files[:1])
    states = {"cold": _passes(files, folder, cold=True), "warm": _passes(files, folder, cold=False)}
    with tempfile.TemporaryDirectory() as scratch:
        library = Library(folder, db_path=Path(scratch) / "catalog.sqlite")
        library.scan()
        rescan = library.scan()
        entries = library.entries()
    if rescan.unchanged != len(files) or not all(e.rank in RANKS and e.family == "sd1" for e in entries):
        raise RuntimeError("generated files were misclassified")
    ratios = {
        state: {
            "parse_full_read_over_header": round(t["full_read_s"] / t["header_probe_s"], 1),
            "hash_share_of_scan": round(t["hash_s"] / t["library_scan_s"], 2),
            "hash_plus_full_read_over_scan": round((t["hash_s"] + t["full_read_s"]) / t["library_scan_s"], 2),
        }
        for state, t in states.items()
    }
    return {
        "benchmark": "index_build",
        "files": len(files),
        "total_mb": round(total_bytes / 1e6, 1),
        "mean_file_mb": round(total_bytes / 1e6 / len(files), 1),
        "page_cache": "cold = posix_fadvise(DONTNEED) per file before each pass" if evictable else "warm only",
        "seconds": states,
        "ratios": ratios,
        "rescan_s": round(rescan.seconds, 5),
        "ratio_cold_scan_over_rescan": round(states["cold"]["library_scan_s"] / rescan.seconds, 1),
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
