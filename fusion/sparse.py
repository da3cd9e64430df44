"""SHiRA math on tensors: mask budgets and the five masks, fused sparse switching, overlap metrics, base fingerprints.

A SHiRA adapter (docs/methods.md#shira) fine-tunes K = r·(out+in) entries of a weight in place (as many as a rank-r
LoRA). Which entries is the mask:

- ``random``: K positions drawn uniformly (PEFT's own ``random_mask`` in training; :func:`random_mask` here);
- ``wm``: top-K |W|; ``grad``: top-K accumulated |∇W| over calibration batches; ``snip``: top-K |W ⊙ ∇W|;
- ``struct``: every f-th row and column plus the diagonal, with f chosen so the pattern covers K entries, thinned
  evenly to exactly K.

Writing adapters into weights and switching between them is :mod:`fusion.sparse_switching`.

Two adapters interfere little when their supports barely overlap: :func:`overlap` reports, per layer, AWOM = ‖S1ᵀS2‖₂
(spectral norm) and AWOR = the sparsity (fraction of zeros) of S1ᵀS2, and :func:`adapter_overlap` summarises them.

:func:`base_fingerprint` identifies the base weights an adapter was trained against (dtype-robust: fp16/bf16 copies
of the same base match) so that an adapter for another base is refused (:func:`check_base_fingerprint`).
"""

from __future__ import annotations

import hashlib
import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from fusion.adapters import Adapter, Sparse, to_sparse
from fusion.errors import CompositionError, FamilyMismatchError, ShapeMismatchError

FINGERPRINT_VERSION = "fp1"
_FINGERPRINT_SAMPLES = 8
"""Weight entries sampled per adapted layer for the fingerprint."""
_FINGERPRINT_RTOL = 2e-2
"""Relative tolerance (of the layer's largest sampled magnitude) under which two sampled entries match: bf16 ≈ 4e-3."""
_DENSE_AWOM_LIMIT = 4096
"""Largest ``in`` dimension for which AWOM is an exact dense spectral norm; above it a randomized SVD estimates it."""


class BaseMismatchError(FamilyMismatchError):
    """A SHiRA adapter's base fingerprint does not match the model it is attached to (trained on another base)."""


# ----- masks -------------------------------------------------------------------------------------------------------


def shira_budget(shape: Sequence[int], r: int) -> int:
    """K = r·(out+in) for a 2-D weight (as many entries as a rank-r LoRA), capped at the weight's size."""
    if len(shape) != 2:
        raise ShapeMismatchError(f"SHiRA masks need a 2-D (linear) weight, got shape {tuple(shape)}")
    if r <= 0:
        raise CompositionError(f"SHiRA r must be a positive integer, got {r}")
    out_features, in_features = int(shape[0]), int(shape[1])
    return min(out_features * in_features, r * (out_features + in_features))


def top_k_mask(scores: torch.Tensor, k: int) -> torch.Tensor:
    """A {0,1} mask (bool, shaped like ``scores``) with ones at the ``k`` largest scores (ties broken by position)."""
    flat = scores.detach().reshape(-1).float()
    k = max(0, min(int(k), flat.numel()))
    mask = torch.zeros(flat.numel(), dtype=torch.bool, device=flat.device)
    if k:
        mask[torch.topk(flat, k, sorted=False).indices] = True
    return mask.reshape(scores.shape)


def random_mask(shape: Sequence[int], k: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """A bool mask with ``k`` ones at uniformly random positions (what PEFT's ``random_mask`` draws)."""
    numel = math.prod(shape)
    mask = torch.zeros(numel, dtype=torch.bool)
    mask[torch.randperm(numel, generator=generator)[: min(k, numel)]] = True
    return mask.reshape(tuple(shape))


def wm_mask(weight: torch.Tensor, k: int) -> torch.Tensor:
    """WM mask: the top-K |W| entries."""
    return top_k_mask(weight.abs(), k)


def grad_mask(grad_abs: torch.Tensor, k: int) -> torch.Tensor:
    """Gradient mask: the top-K entries of |∇W| accumulated over calibration batches."""
    return top_k_mask(grad_abs.abs(), k)


def snip_mask(weight: torch.Tensor, grad_abs: torch.Tensor, k: int) -> torch.Tensor:
    """SNIP mask: the top-K |W ⊙ ∇W| (connection sensitivity) entries."""
    return top_k_mask((weight.float() * grad_abs.float()).abs(), k)


def _struct_count(rows: int, cols: int, f: int) -> int:
    """Entries covered by every f-th row, every f-th column and the diagonal of a rows×cols matrix."""
    line_rows, line_cols, diag = math.ceil(rows / f), math.ceil(cols / f), min(rows, cols)
    return line_rows * cols + line_cols * rows - line_rows * line_cols + diag - math.ceil(diag / f)


def struct_mask(shape: Sequence[int], k: int) -> torch.Tensor:
    """Structured mask: the diagonal plus every f-th row and column, with exactly ``k`` ones.

    f is the largest stride whose pattern still covers ``k`` entries. Entries are taken in order — the diagonal,
    then rows 0, f, 2f, … interleaved with columns 0, f, 2f, … — so every line is whole except possibly the last
    one (PEFT requires the count to be exactly r·(out+in)).
    """
    rows, cols = int(shape[0]), int(shape[1])
    k = min(int(k), rows * cols)
    stride = next(f for f in range(max(rows, cols), 0, -1) if _struct_count(rows, cols, f) >= k)
    order = torch.full((rows, cols), 2 * (max(rows, cols) + 1), dtype=torch.long)
    span = min(rows, cols)
    order[torch.arange(span), torch.arange(span)] = 0
    for line, start in enumerate(range(0, max(rows, cols), stride)):
        if start < rows:
            order[start] = torch.clamp(order[start], max=2 * line + 1)
        if start < cols:
            order[:, start] = torch.clamp(order[:, start], max=2 * line + 2)
    chosen = torch.argsort(order.reshape(-1), stable=True)[:k]
    mask = torch.zeros(rows * cols, dtype=torch.bool)
    mask[chosen] = True
    return mask.reshape(rows, cols)


def mask_to_sparse_index(mask: torch.Tensor) -> torch.Tensor:
    """Sorted flat int64 positions of a {0,1} mask's ones (row-major, the order PEFT's ``torch.where`` gives)."""
    return torch.nonzero(mask.reshape(-1) != 0).squeeze(1)


# ----- LoRA → SHiRA conversion -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LayerConversion:
    """One layer of a LoRA → sparse conversion: entries kept, the weight's size, and energies ‖·‖²."""

    key: str
    nnz: int
    numel: int
    kept_energy: float
    total_energy: float

    @property
    def retained(self) -> float:
        """‖ΔW_kept‖² / ‖ΔW‖² (1.0 for an all-zero ΔW)."""
        return 1.0 if self.total_energy == 0.0 else self.kept_energy / self.total_energy


@dataclass(frozen=True)
class Conversion:
    """A converted adapter with its per-layer report; ``retained`` is the energy-weighted overall fraction."""

    adapter: Adapter
    layers: list[LayerConversion]

    @property
    def retained(self) -> float:
        """Σ kept energy / Σ total energy over every layer."""
        total = sum(layer.total_energy for layer in self.layers)
        return 1.0 if total == 0.0 else sum(layer.kept_energy for layer in self.layers) / total


def convert_to_sparse(adapter: Adapter, density: float) -> Conversion:
    """Keep the top-K |ΔW| entries of every layer (K = ceil(density·numel)); density 1.0 reproduces ΔW exactly."""
    if not 0.0 < density <= 1.0:
        raise CompositionError(f"density must be in (0, 1], got {density}", hint="e.g. --density 0.02")
    converted: dict[str, Sparse] = {}
    report: list[LayerConversion] = []
    for key, kind in adapter.all_layers():
        sparse, retained = to_sparse(kind, density)
        kept = float((sparse.values.double() ** 2).sum())
        total = kept / retained if retained > 0.0 else 0.0
        converted[key] = sparse
        report.append(LayerConversion(key, sparse.nnz, math.prod(sparse.shape), kept, total))
    result = Adapter(
        name=adapter.name,
        family=adapter.family,
        layers={k: v for k, v in converted.items() if k in adapter.layers},
        text_encoder_layers={k: v for k, v in converted.items() if k in adapter.text_encoder_layers},
        task_prompt=adapter.task_prompt,
        needs_input_image=adapter.needs_input_image,
        meta={**adapter.meta, "mask_type": "lora-topk", "density": density},
        source=adapter.source,
    )
    return Conversion(result, report)


# ----- overlap metrics ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LayerOverlap:
    """Overlap of two sparse updates of one layer.

    ``awom`` = ‖S1ᵀS2‖₂ (spectral norm; small means the adapters act on near-orthogonal input directions),
    ``awor`` = fraction of zero entries of S1ᵀS2 (1.0 = no interaction), ``shared`` = shared positions / smaller nnz.
    """

    key: str
    awom: float
    awor: float
    shared: float


@dataclass(frozen=True)
class OverlapSummary:
    """AWOM/AWOR between two adapters over the layers both adapt: per-layer values and a summary.

    ``mean_awor`` weights each layer by the size of its S1ᵀS2 (in²); ``max_awom`` / ``mean_awom`` over layers.
    """

    layers: list[LayerOverlap]
    mean_awor: float
    mean_awom: float
    max_awom: float
    mean_shared: float

    def to_json(self) -> dict:
        """A JSON-ready dict (per-layer list plus the summary numbers)."""
        return {
            "mean_awor": self.mean_awor,
            "mean_awom": self.mean_awom,
            "max_awom": self.max_awom,
            "mean_shared": self.mean_shared,
            "layers": [vars(layer) for layer in self.layers],
        }


def _coo(update: Sparse) -> torch.Tensor:
    rows, cols = int(update.shape[0]), int(math.prod(update.shape[1:]))
    index = update.index.long()
    return torch.sparse_coo_tensor(
        torch.stack([index // cols, index % cols]), update.values.double(), (rows, cols), check_invariants=False
    ).coalesce()


def overlap(first: Sparse, second: Sparse, key: str = "") -> LayerOverlap:
    """AWOM, AWOR and shared-support fraction of two sparse updates of one weight (conv weights flattened to 2-D)."""
    if first.shape != second.shape:
        raise ShapeMismatchError(f"layer {key!r}: cannot compare updates of shapes {first.shape} and {second.shape}")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*[Ss]parse CSR tensor support.*")
        product = torch.sparse.mm(_coo(first).t().coalesce(), _coo(second)).coalesce()
    size = product.shape[0] * product.shape[1]
    nonzero = int((product.values() != 0).sum())
    if product.shape[0] <= _DENSE_AWOM_LIMIT:
        awom = float(torch.linalg.matrix_norm(product.to_dense(), ord=2)) if nonzero else 0.0
    else:
        awom = float(torch.svd_lowrank(product, q=4, niter=8)[1][0]) if nonzero else 0.0
    shared = torch.isin(first.index, second.index).sum().item() / max(1, min(first.nnz, second.nnz))
    return LayerOverlap(key=key, awom=awom, awor=1.0 - nonzero / max(1, size), shared=float(shared))


def adapter_overlap(first: Adapter, second: Adapter) -> OverlapSummary:
    """Per-layer :func:`overlap` over the sparse layers both adapters adapt, with a size-weighted summary.

    Layers only one adapter touches cannot interfere and are left out; no common layer gives AWOR 1 and AWOM 0.
    """
    first_layers = dict(first.all_layers())
    results: list[LayerOverlap] = []
    sizes: list[int] = []
    for key, kind in second.all_layers():
        other = first_layers.get(key)
        if isinstance(kind, Sparse) and isinstance(other, Sparse):
            results.append(overlap(other, kind, key))
            sizes.append(int(math.prod(kind.shape[1:])) ** 2)
    if not results:
        return OverlapSummary(layers=[], mean_awor=1.0, mean_awom=0.0, max_awom=0.0, mean_shared=0.0)
    total = sum(sizes)
    return OverlapSummary(
        layers=results,
        mean_awor=sum(r.awor * s for r, s in zip(results, sizes)) / total,
        mean_awom=sum(r.awom for r in results) / len(results),
        max_awom=max(r.awom for r in results),
        mean_shared=sum(r.shared for r in results) / len(results),
    )


# ----- base fingerprints -------------------------------------------------------------------------------------------


def _sample_positions(key: str, numel: int) -> torch.Tensor:
    seed = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "little") & (2**63 - 1)
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, numel, (_FINGERPRINT_SAMPLES,), generator=generator)


def base_fingerprint(weights: Mapping[str, torch.Tensor]) -> str:
    """A short string identifying the base weights of the adapted layers (``key → weight``).

    It holds a hash of the keys and shapes plus a few entries sampled at key-seeded positions (4 significant digits),
    so copies of one base in fp32/fp16/bf16 match (:func:`fingerprints_match`) and another base does not.
    """
    structure = hashlib.sha256()
    samples: list[str] = []
    for key in sorted(weights):
        weight = weights[key].detach()
        structure.update(f"{key}:{tuple(weight.shape)};".encode())
        picked = weight.reshape(-1)[_sample_positions(key, weight.numel()).to(weight.device)].float().cpu()
        samples += [f"{v:.4g}" for v in picked.tolist()]
    return f"{FINGERPRINT_VERSION}:{structure.hexdigest()[:16]}:{','.join(samples)}"


def fingerprints_match(expected: str, actual: str) -> bool:
    """True when two fingerprints name the same layers and shapes and every sampled entry agrees to ~2%."""
    try:
        version_a, structure_a, values_a = expected.split(":", 2)
        version_b, structure_b, values_b = actual.split(":", 2)
        a = torch.tensor([float(v) for v in values_a.split(",") if v], dtype=torch.float64)
        b = torch.tensor([float(v) for v in values_b.split(",") if v], dtype=torch.float64)
    except ValueError:
        return False
    if (version_a, structure_a) != (version_b, structure_b) or a.shape != b.shape:
        return False
    if not a.numel():
        return True
    scale = torch.maximum(a.abs(), b.abs()).reshape(-1, _FINGERPRINT_SAMPLES).amax(1, keepdim=True).clamp_min(1e-12)
    return bool(((a - b).abs().reshape(-1, _FINGERPRINT_SAMPLES) <= _FINGERPRINT_RTOL * scale + 1e-6).all())


def check_base_fingerprint(adapter: Adapter, weights: Mapping[str, torch.Tensor]) -> None:
    """Raise :class:`BaseMismatchError` if ``adapter`` records a ``base_fingerprint`` that ``weights`` do not match.

    ``weights`` maps the model's layer keys to weights (only the adapter's keys are read). Adapters without a
    fingerprint (LoRA files, PEFT checkpoints) pass.
    """
    meta = adapter.meta.get("safetensors_metadata", adapter.meta)
    expected = meta.get("base_fingerprint") if isinstance(meta, Mapping) else None
    if not expected:
        return
    keys = [key for key, _ in adapter.all_layers()]
    missing = [key for key in keys if key not in weights]
    if missing:
        raise BaseMismatchError(
            f"adapter {adapter.name!r} adapts {missing[0]!r}, which this model does not have",
            path=adapter.source,
        )
    if not fingerprints_match(expected, base_fingerprint({key: weights[key] for key in keys})):
        raise BaseMismatchError(
            f"adapter {adapter.name!r} was trained against other base weights than this model's",
            path=adapter.source,
            hint="SHiRA values are tied to the exact base checkpoint; use the base it was trained on",
        )
