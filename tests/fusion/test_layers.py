"""Composed layers against the dense ground truth: y = x·(W + Σ wᵢΔWᵢ)ᵀ, unfused, fused and per sample."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fusion.adapters import Dense, LowRank, Sparse
from fusion.layers import ComposedConv2d, ComposedLayer, ComposedLinear, GateState


def _updates(shape: tuple[int, ...], g: torch.Generator) -> dict[str, object]:
    """Two LoRAs of different rank and alpha, one dense and one sparse update for a weight of ``shape``."""
    conv = len(shape) == 4
    tail = [1, 1] if conv else []
    numel = torch.Size(shape).numel()
    index = torch.randperm(numel, generator=g)[: numel // 10].sort().values
    return {
        "lo2": LowRank(torch.randn(2, *shape[1:], generator=g), torch.randn(shape[0], 2, *tail, generator=g), 1.0),
        "lo5": LowRank(torch.randn(5, *shape[1:], generator=g), torch.randn(shape[0], 5, *tail, generator=g), 10.0),
        "dense": Dense(torch.randn(shape, generator=g), scale=0.5),
        "sparse": Sparse(index, torch.randn(index.numel(), generator=g), shape),
    }


def _attach(layer: ComposedLayer, updates: dict[str, object]) -> list[str]:
    names = list(updates)
    for name in names:
        layer.add(name, updates[name])  # type: ignore[arg-type]
    layer.reindex({name: i for i, name in enumerate(names)})
    return names


def _reference(base: nn.Module, updates: dict[str, object], weights: list[float], x: torch.Tensor) -> torch.Tensor:
    delta = sum(w * u.delta(torch.float64) for w, u in zip(weights, updates.values()))  # type: ignore[attr-defined]
    weight = base.weight.double() + delta
    if isinstance(base, nn.Linear):
        return F.linear(x.double(), weight, base.bias.double())
    return F.conv2d(x.double(), weight, base.bias.double(), base.stride, base.padding)


@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_unfused_fused_and_restore(kind: str) -> None:
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    if kind == "linear":
        base: nn.Module = nn.Linear(12, 7)
        x = torch.randn(3, 4, 12, generator=g)
        cls: type[ComposedLayer] = ComposedLinear
    else:
        base = nn.Conv2d(6, 5, kernel_size=3, stride=2, padding=1)
        x = torch.randn(2, 6, 9, 9, generator=g)
        cls = ComposedConv2d
    pristine = base.weight.detach().clone()
    updates = _updates(tuple(base.weight.shape), g)
    state = GateState(1, torch.device("cpu"))
    layer = cls(base, "layer", 0, state)
    _attach(layer, updates)
    weights = [0.7, -0.3, 0.25, 1.5]
    state.set(torch.tensor([weights]), None)
    expected = _reference(base, updates, weights, x).float()
    torch.testing.assert_close(layer(x), expected, atol=1e-4, rtol=1e-4)
    unfused = layer(x)

    layer.fuse(torch.tensor(weights))
    assert layer.fused
    torch.testing.assert_close(layer(x), unfused, atol=1e-5, rtol=1e-5)
    layer.fuse(torch.tensor([0.0, 1.0, 0.0, 0.0]))
    layer.unfuse()
    assert torch.equal(base.weight, pristine)

    state.set(torch.tensor([[0.0, 0.0, 0.0, 0.0]]), None)
    assert torch.equal(layer(x), base(x))


@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_per_sample_gates_give_each_sample_its_adapter(kind: str) -> None:
    g = torch.Generator().manual_seed(2)
    base: nn.Module = nn.Linear(8, 6) if kind == "linear" else nn.Conv2d(4, 3, 3, padding=1)
    shape = (3, 5, 8) if kind == "linear" else (3, 4, 6, 6)
    cls: type[ComposedLayer] = ComposedLinear if kind == "linear" else ComposedConv2d
    one = torch.randn(shape[1:], generator=g)
    x = one.expand(*shape).contiguous()
    updates = _updates(tuple(base.weight.shape), g)
    del updates["sparse"]
    state = GateState(1, torch.device("cpu"))
    layer = cls(base, "layer", 0, state)
    _attach(layer, updates)
    per_sample = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.5, 0.0], [0.0, 0.0, 2.0]])
    state.set(torch.zeros(1, 3), per_sample[:, None, :])
    out = layer(x)
    for i in range(3):
        expected = _reference(base, updates, per_sample[i].tolist(), x[i : i + 1]).float()[0]
        torch.testing.assert_close(out[i], expected, atol=1e-4, rtol=1e-4)


def test_removing_an_adapter_keeps_the_others_columns() -> None:
    g = torch.Generator().manual_seed(3)
    base = nn.Linear(10, 9)
    updates = _updates((9, 10), g)
    state = GateState(1, torch.device("cpu"))
    layer = ComposedLinear(base, "layer", 0, state)
    _attach(layer, updates)
    layer.remove("lo2")
    del updates["lo2"]
    layer.reindex({name: i for i, name in enumerate(updates)})
    assert layer.rank == 5
    x = torch.randn(4, 10, generator=g)
    weights = [0.4, 0.9, -1.0]
    state.set(torch.tensor([weights]), None)
    torch.testing.assert_close(layer(x), _reference(base, updates, weights, x).float(), atol=1e-4, rtol=1e-4)
    assert layer.in_features == 10, "attribute lookups fall through to the base module"


def test_index_tensors_built_under_inference_mode_still_serve_autograd() -> None:
    g = torch.Generator().manual_seed(6)
    updates = {name: kind for name, kind in _updates((9, 10), g).items() if name.startswith("lo")}
    with torch.inference_mode():  # the first attach may run inside a pipeline call
        _attach(ComposedLinear(nn.Linear(10, 9), "first", 0, GateState(1, torch.device("cpu"))), updates)
    state = GateState(1, torch.device("cpu"))
    layer = ComposedLinear(nn.Linear(10, 9), "second", 0, state)
    _attach(layer, updates)  # same index lists: the same shared tensors
    assert not layer._owner.is_inference()
    weights = torch.tensor([[0.5, -0.3]], requires_grad=True)
    state.set(weights, None)
    layer(torch.randn(3, 10, generator=g)).sum().backward()
    assert weights.grad is not None


@pytest.mark.parametrize(
    ("device", "dtype"),
    [
        ("cpu", torch.bfloat16),
        pytest.param("cuda", torch.float16, marks=pytest.mark.gpu),
        pytest.param("cuda", torch.bfloat16, marks=pytest.mark.gpu),
    ],
)
def test_half_precision(device: str, dtype: torch.dtype) -> None:
    """Factors follow the base weight's device and dtype; fused ≈ unfused; unfuse is still bit-exact."""
    g = torch.Generator().manual_seed(4)
    base = nn.Linear(64, 32).to(device, dtype)
    pristine = base.weight.detach().clone()
    updates = {k: v.to(device, dtype) for k, v in _updates((32, 64), g).items()}  # type: ignore[attr-defined]
    del updates["lo5"]  # keep the low-rank factors thinner than the weight: the two-matmul path
    del updates["dense"], updates["sparse"]
    state = GateState(1, torch.device(device))
    layer = ComposedLinear(base, "layer", 0, state)
    _attach(layer, updates)
    state.set(torch.tensor([[0.05]], device=device), None)
    x = torch.randn(2, 64, generator=g).to(device, dtype)
    unfused = layer(x)
    assert unfused.dtype == dtype
    assert layer._effective is None, "rank 2 on a 32×64 weight takes the factor path"
    expected = _reference(
        copy.deepcopy(base).float(), {k: v.to(device, torch.float32) for k, v in updates.items()}, [0.05], x
    )
    torch.testing.assert_close(unfused.double(), expected, atol=0.05, rtol=0.02)
    layer.fuse(torch.tensor([0.05], device=device))
    torch.testing.assert_close(layer(x).float(), unfused.float(), atol=0.05, rtol=0.02)
    layer.unfuse()
    assert torch.equal(base.weight, pristine)


@torch.no_grad()
def test_weights_changing_every_call_take_the_cheaper_path_and_cache_nothing() -> None:
    """Many rows: a transient W + ΣwΔW for the call (not kept); few rows: the factor path. Both match the truth."""
    g = torch.Generator().manual_seed(2)
    base = nn.Linear(16, 16)
    updates = {k: v for k, v in _updates((16, 16), g).items() if k.startswith("lo")}
    state = GateState(1, torch.device("cpu"))
    layer = ComposedLinear(base, "layer", 0, state)
    _attach(layer, updates)
    assert layer._transient_rows == 8.0  # 16·16 / (16 + 16)
    for step, rows in enumerate([64, 4, 64, 4, 64]):
        weights = [0.1 * step, 1.0 - 0.2 * step]
        state.set(torch.tensor([weights]), None)
        x = torch.randn(rows, 16, generator=g)
        assert (layer(x).double() - _reference(base, updates, weights, x)).abs().max() <= 1e-4
        assert layer._effective is None, "weights that change every call leave no cached weight"
