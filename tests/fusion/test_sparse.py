"""SHiRA tensor math: mask budgets and types, overlap metrics, fingerprints, LoRA conversion."""

from __future__ import annotations

import pytest
import torch

from fusion.adapters import Adapter, LowRank, Sparse
from fusion.errors import CompositionError, FamilyMismatchError, ShapeMismatchError
from fusion.sparse import (
    BaseMismatchError,
    adapter_overlap,
    base_fingerprint,
    check_base_fingerprint,
    convert_to_sparse,
    fingerprints_match,
    grad_mask,
    mask_to_sparse_index,
    overlap,
    random_mask,
    shira_budget,
    snip_mask,
    struct_mask,
    top_k_mask,
    wm_mask,
)


def _sparse(shape: tuple[int, int], k: int, gen: torch.Generator, dtype: torch.dtype = torch.float32) -> Sparse:
    index = torch.randperm(shape[0] * shape[1], generator=gen)[:k].sort().values
    return Sparse(index, torch.randn(k, generator=gen).to(dtype), shape)


def test_budget_is_lora_parameter_count_capped_at_size() -> None:
    assert shira_budget((320, 768), 32) == 32 * (320 + 768)
    assert shira_budget((4, 3), 8) == 12
    with pytest.raises(ShapeMismatchError):
        shira_budget((4, 3, 3, 3), 2)
    with pytest.raises(CompositionError):
        shira_budget((4, 3), 0)


@pytest.mark.parametrize("shape", [(64, 32), (40, 96), (7, 5)])
@pytest.mark.parametrize("r", [1, 3])
def test_every_mask_has_exactly_k_ones(shape: tuple[int, int], r: int) -> None:
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(shape, generator=gen)
    grad = torch.rand(shape, generator=gen)
    k = shira_budget(shape, r)
    masks = [
        random_mask(shape, k, gen),
        wm_mask(weight, k),
        grad_mask(grad, k),
        snip_mask(weight, grad, k),
        struct_mask(shape, k),
    ]
    for mask in masks:
        assert mask.shape == shape
        assert mask.dtype == torch.bool
        assert int(mask.sum()) == k


def test_score_masks_pick_the_largest_scores() -> None:
    gen = torch.Generator().manual_seed(1)
    weight = torch.randn(30, 20, generator=gen)
    grad = torch.rand(30, 20, generator=gen)
    k = 50
    wm = wm_mask(weight, k)
    assert weight.abs()[wm].min() >= weight.abs()[~wm].max()
    g = grad_mask(grad, k)
    assert grad[g].min() >= grad[~g].max()
    score = (weight * grad).abs()
    snip = snip_mask(weight, grad, k)
    assert score[snip].min() >= score[~snip].max()
    assert not torch.equal(snip, wm)
    assert torch.equal(mask_to_sparse_index(wm), torch.nonzero(wm.reshape(-1)).squeeze(1))
    assert int(top_k_mask(torch.zeros(3, 3), 20).sum()) == 9


def test_struct_mask_is_diagonal_plus_strided_lines() -> None:
    shape = (96, 64)
    mask = struct_mask(shape, shira_budget(shape, 4))
    assert mask.diagonal().all()
    full_rows = mask.all(1).nonzero().squeeze(1)
    full_cols = mask.all(0).nonzero().squeeze(1)
    assert full_rows.numel() >= 2
    assert full_cols.numel() >= 2
    strides = torch.cat([full_rows.diff(), full_cols.diff()])
    assert strides.min() >= 2
    lines = torch.zeros(shape, dtype=torch.bool)
    lines[full_rows] = True
    lines[:, full_cols] = True
    off_pattern = mask & ~lines
    off_pattern.fill_diagonal_(False)
    assert int(off_pattern.sum()) < shape[1] + shape[0]
    tiny = struct_mask((10, 10), 4)
    assert tiny.diagonal()[:4].all()
    assert int(tiny.sum()) == 4


def test_overlap_metrics_match_dense_definitions() -> None:
    gen = torch.Generator().manual_seed(4)
    first, second = _sparse((30, 20), 80, gen), _sparse((30, 20), 80, gen)
    result = overlap(first, second, "x")
    product = first.delta().double().T @ second.delta().double()
    assert result.awom == pytest.approx(float(torch.linalg.matrix_norm(product, ord=2)), rel=1e-9)
    assert result.awor == pytest.approx(float((product == 0).double().mean()))
    shared = len(set(first.index.tolist()) & set(second.index.tolist())) / 80
    assert result.shared == pytest.approx(shared)
    top = Sparse(torch.arange(0, 5), torch.ones(5), (4, 6))
    disjoint_rows = overlap(top, Sparse(torch.tensor([17, 23]), torch.ones(2), (4, 6)))
    assert disjoint_rows.awor == 1.0
    assert disjoint_rows.awom == 0.0
    same_row = overlap(top, Sparse(torch.tensor([5]), torch.ones(1), (4, 6)))
    assert same_row.awor == pytest.approx(1 - 5 / 36)
    assert same_row.shared == 0.0


def test_adapter_overlap_summarises_common_layers() -> None:
    gen = torch.Generator().manual_seed(5)
    a = Adapter("a", "sd1", {"x": _sparse((20, 10), 30, gen), "y": _sparse((10, 40), 30, gen)})
    b = Adapter("b", "sd1", {"x": _sparse((20, 10), 30, gen), "z": _sparse((5, 5), 3, gen)})
    summary = adapter_overlap(a, b)
    assert [layer.key for layer in summary.layers] == ["x"]
    assert summary.mean_awor == summary.layers[0].awor
    assert summary.max_awom == summary.layers[0].awom > 0
    assert summary.to_json()["layers"][0]["key"] == "x"
    self_overlap = adapter_overlap(a, a)
    assert self_overlap.mean_shared == 1.0
    assert adapter_overlap(a, Adapter("c", "sd1", {})).mean_awor == 1.0


def test_fingerprint_survives_half_precision_and_rejects_another_base() -> None:
    gen = torch.Generator().manual_seed(6)
    base = {"l1": torch.randn(64, 32, generator=gen), "l2": torch.randn(32, 32, generator=gen)}
    fingerprint = base_fingerprint(base)
    assert fingerprints_match(fingerprint, base_fingerprint({k: v.half() for k, v in base.items()}))
    assert fingerprints_match(fingerprint, base_fingerprint({k: v.bfloat16() for k, v in base.items()}))
    other = {k: torch.randn(v.shape, generator=gen) for k, v in base.items()}
    assert not fingerprints_match(fingerprint, base_fingerprint(other))
    assert not fingerprints_match(fingerprint, base_fingerprint({"l1": base["l1"]}))
    assert not fingerprints_match(fingerprint, "garbage")
    layers = {k: Sparse(torch.tensor([0]), torch.tensor([1.0]), tuple(v.shape)) for k, v in base.items()}
    adapter = Adapter("s", "sd1", layers, meta={"safetensors_metadata": {"base_fingerprint": fingerprint}})
    check_base_fingerprint(adapter, base)
    with pytest.raises(BaseMismatchError, match="other base weights") as info:
        check_base_fingerprint(adapter, other)
    assert isinstance(info.value, FamilyMismatchError)
    check_base_fingerprint(Adapter("lora", "sd1", layers), other)


def test_convert_to_sparse_reports_energy_and_is_exact_at_full_density() -> None:
    gen = torch.Generator().manual_seed(7)
    lora = Adapter(
        "l",
        "sd1",
        {"a": LowRank(torch.randn(4, 20, generator=gen), torch.randn(30, 4, generator=gen), alpha=2.0)},
        text_encoder_layers={
            "text_encoder.q": LowRank(torch.randn(2, 8, generator=gen), torch.randn(8, 2, generator=gen))
        },
    )
    full = convert_to_sparse(lora, 1.0)
    assert full.retained == pytest.approx(1.0)
    for key, kind in lora.all_layers():
        assert torch.equal(dict(full.adapter.all_layers())[key].delta(), kind.delta())
    assert set(full.adapter.text_encoder_layers) == {"text_encoder.q"}
    partial = convert_to_sparse(lora, 0.1)
    layer = partial.layers[0]
    assert layer.nnz == 60
    delta = lora.layers["a"].delta().reshape(-1)
    kept = delta.abs().topk(60).values
    assert layer.retained == pytest.approx(float((kept**2).sum() / (delta**2).sum()), rel=1e-5)
    assert 0 < partial.retained < 1
    with pytest.raises(CompositionError):
        convert_to_sparse(lora, 0.0)
