"""Weight features computed from an adapter's factors alone: exact per-layer spectra and a fixed-size summary.

A LoRA's singular values come from a QR-core SVD of its factors (:func:`fusion.adapters.qr_core_svd`), so ΔW is
never formed for low-rank layers. The summary vector buckets layers into a fixed set of groups (self-attention,
cross-attention, feed-forward, convolution, text encoder, …) and describes each group's spectra with a few
scale-aware and scale-free statistics, so adapters with different layer sets and ranks map to the same space.
"""

from __future__ import annotations

import math
import re

import torch

from fusion.adapters import Adapter, AdapterKind, LowRank, qr_core_svd

TOP_SINGULAR = 8
"""How many leading normalised singular values describe each group."""

GROUPS = (
    "self_attn.qk",
    "self_attn.v",
    "self_attn.out",
    "cross_attn.q",
    "cross_attn.kv",
    "cross_attn.out",
    "feed_forward",
    "projection",
    "convolution",
    "text_encoder",
    "other",
)
"""Fixed layer groups of the spectral feature vector (UNet and Flux names map onto the same groups)."""

STATS_PER_GROUP = 3 + TOP_SINGULAR
"""log layer count, mean log energy, mean stable rank, then the mean top normalised singular values."""

FEATURE_DIM = len(GROUPS) * STATS_PER_GROUP

_INDEX = re.compile(r"^\d+$")


def layer_type(key: str) -> str:
    """A layer's type: its last two non-numeric path components (``attn2.to_k``, ``attn.add_k_proj``).

    Text-encoder keys keep their component prefix (``text_encoder:self_attn.q_proj``) so they never share a type
    with denoiser layers. Layers of one type play the same role in every block.
    """
    parts = [p for p in key.split(".") if not _INDEX.match(p)]
    kind = ".".join(parts[-2:])
    if key.startswith("text_encoder"):
        return f"{parts[0]}:{kind}"
    return kind


def layer_group(key: str) -> str:
    """Which of :data:`GROUPS` a layer key belongs to."""
    if key.startswith("text_encoder"):
        return "text_encoder"
    name = key.lower()
    last = [p for p in name.split(".") if not _INDEX.match(p)][-1]
    if ".attn2." in name or any(t in last for t in ("add_k_proj", "add_v_proj", "add_q_proj", "to_add_out")):
        if last in ("to_q", "add_q_proj"):
            return "cross_attn.q"
        if last in ("to_out", "to_add_out"):
            return "cross_attn.out"
        return "cross_attn.kv"
    if ".attn" in name:
        if last in ("to_q", "to_k"):
            return "self_attn.qk"
        if last == "to_v":
            return "self_attn.v"
        if last == "to_out":
            return "self_attn.out"
    if ".ff." in name or ".ff_context." in name or "proj_mlp" in last or (last == "proj_out" and "single" in name):
        return "feed_forward"
    if last.startswith("conv") or "resnets" in name:
        return "convolution"
    if "proj" in last or "embed" in last:
        return "projection"
    return "other"


def singular_values(update: AdapterKind) -> torch.Tensor:
    """Exact singular values of one layer's ΔW (fp64, descending); QR-core SVD for low-rank, never forming ΔW."""
    if isinstance(update, LowRank):
        return qr_core_svd(update).S
    delta = update.delta(torch.float64)
    return torch.linalg.svdvals(delta.reshape(delta.shape[0], -1))


def spectra(adapter: Adapter) -> dict[str, torch.Tensor]:
    """Singular values of every layer (denoiser and text encoders), keyed like the adapter's layers."""
    return {key: singular_values(update) for key, update in adapter.all_layers()}


def _group_stats(values: list[torch.Tensor]) -> torch.Tensor:
    """Fixed-size statistics of a group's per-layer spectra (zeros for an empty group)."""
    stats = torch.zeros(STATS_PER_GROUP, dtype=torch.float64)
    if not values:
        return stats
    energies, stable_ranks, tops = [], [], []
    for s in values:
        energy = float((s**2).sum())
        energies.append(math.log(energy + 1e-20))
        stable_ranks.append(energy / float(s[0] ** 2) if s.numel() and s[0] > 0 else 0.0)
        top = torch.zeros(TOP_SINGULAR, dtype=torch.float64)
        norm = math.sqrt(energy)
        if norm > 0:
            n = min(TOP_SINGULAR, s.numel())
            top[:n] = s[:n] / norm
        tops.append(top)
    stats[0] = math.log(len(values))
    stats[1] = sum(energies) / len(energies)
    stats[2] = sum(stable_ranks) / len(stable_ranks)
    stats[3:] = torch.stack(tops).mean(0)
    return stats


def spectral_features(adapter: Adapter) -> torch.Tensor:
    """The adapter's fixed-size spectral feature vector (length :data:`FEATURE_DIM`, float32).

    Per group of :data:`GROUPS`: log number of adapted layers, mean log ‖ΔW‖²_F, mean stable rank
    (‖ΔW‖²_F / σ₁²) and the mean of the leading :data:`TOP_SINGULAR` singular values divided by ‖ΔW‖_F.
    """
    grouped: dict[str, list[torch.Tensor]] = {group: [] for group in GROUPS}
    for key, values in spectra(adapter).items():
        grouped[layer_group(key)].append(values)
    return torch.cat([_group_stats(grouped[group]) for group in GROUPS]).float()
