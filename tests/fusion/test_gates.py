"""Gate modules: the formula of docs/methods.md#gated-fusion, reference init, the zero-initialised timestep
input, per-adapter outputs."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from diffusers.models.embeddings import get_timestep_embedding
from safetensors import safe_open
from torch import nn

from fusion.adapters import LowRank
from fusion.errors import CompositionError, ShapeMismatchError
from fusion.gates import GateBank, GateRecorder, LayerGate, timestep_embedding
from fusion.layers import ComposedLinear, GateState

SHIPPED_GATES = Path(__file__).parents[2] / "composer" / "toyworld" / "weights" / "gates.safetensors"


def _reference_gate(gate: LayerGate, b: torch.Tensor, lora: torch.Tensor) -> torch.Tensor:
    """The reference formula written out (no timestep term), for K adapter outputs ``lora`` (K, …, out)."""
    nb = torch.nn.functional.layer_norm(b, b.shape[-1:])
    nl = torch.nn.functional.layer_norm(lora, lora.shape[-1:])
    g = torch.sigmoid(nb * gate.u_b + nl * gate.u_l + nb * nl * gate.u_c + gate.beta)
    return b + (gate.u_out * g * lora).sum(0)


def test_fresh_gate_equals_the_reference_and_ignores_time_until_trained() -> None:
    g = torch.Generator().manual_seed(0)
    gate = LayerGate(6, generator=torch.Generator().manual_seed(1))
    assert torch.equal(gate.u_out, torch.ones(6))
    b, lora = torch.randn(2, 5, 6, generator=g), torch.randn(3, 2, 5, 6, generator=g)
    temb = timestep_embedding(torch.tensor([0.1, 0.9]))
    y, gates = gate(b, lora, temb)
    assert gates.shape == (3, 2, 5, 6)
    torch.testing.assert_close(y, _reference_gate(gate, b, lora))
    with torch.no_grad():
        gate.time.weight.normal_()
    y_early, _ = gate(b, lora, timestep_embedding(torch.tensor([0.1])))
    y_late, _ = gate(b, lora, timestep_embedding(torch.tensor([0.9])))
    assert not torch.allclose(y_early, y_late), "a trained timestep projection makes the gate depend on t"


def test_timestep_embedding_is_diffusers_sines_first_at_the_scheduler_scale() -> None:
    """The layout the shipped gates were trained with: diffusers' embedding of 1000·t, sines first, frequencies
    10000^(−i/16) for the 32 wide embedding the shipped checkpoint records."""
    with safe_open(str(SHIPPED_GATES), "pt") as checkpoint:
        assert '"time_dim": 32' in checkpoint.metadata()["gates"]
    t = torch.cat([torch.linspace(0, 1, 101), torch.rand(64, generator=torch.Generator().manual_seed(0))])
    embedding = timestep_embedding(t)
    expected = get_timestep_embedding(1000 * t, 32, flip_sin_to_cos=False, downscale_freq_shift=0)
    assert torch.equal(embedding, expected)
    assert torch.equal(timestep_embedding(torch.zeros(1)), torch.cat([torch.zeros(1, 16), torch.ones(1, 16)], 1))
    for i in (0, 7, 15):
        angle = 1000 * 0.37 * 10000 ** (-i / 16)
        value = timestep_embedding(torch.tensor([0.37]))[0]
        assert math.isclose(value[i], math.sin(angle), abs_tol=1e-4)
        assert math.isclose(value[16 + i], math.cos(angle), abs_tol=1e-4)


def test_gate_rejects_a_timestep_batch_that_does_not_fit() -> None:
    gate = LayerGate(4)
    with pytest.raises(CompositionError, match="timestep"):
        gate(torch.randn(2, 3, 4), torch.randn(1, 2, 3, 4), timestep_embedding(torch.rand(3)))


def test_adapter_outputs_are_each_adapters_own_update() -> None:
    """Mixed ranks: one padded batched op gives wₖ·scaleₖ·Bₖ·Aₖ·x for every adapter."""
    g = torch.Generator().manual_seed(3)
    base = nn.Linear(10, 7)
    state = GateState(1, torch.device("cpu"))
    layer = ComposedLinear(base, "layer", 0, state)
    kinds = [
        LowRank(torch.randn(r, 10, generator=g), torch.randn(7, r, generator=g), alpha) for r, alpha in ((2, 1), (5, 5))
    ]
    for i, kind in enumerate(kinds):
        layer.add(f"a{i}", kind)
    layer.reindex({"a0": 0, "a1": 1})
    weights = [0.5, -2.0]
    state.set(torch.tensor([weights]), None)
    x = torch.randn(4, 3, 10, generator=g)
    outputs = layer.adapter_outputs(x)
    assert outputs.shape == (2, 4, 3, 7)
    for i, (kind, w) in enumerate(zip(kinds, weights)):
        torch.testing.assert_close(outputs[i], w * x @ kind.delta().T, atol=1e-5, rtol=1e-5)
    assert layer.output_owners.tolist() == [0, 1]


def test_bank_round_trips_through_tensors_and_records_means() -> None:
    bank = GateBank({"a.to_q": 4, "b.to_k": 6}, seed=2)
    again = GateBank.from_tensors(bank.to_tensors())
    assert again.keys == bank.keys
    for first, second in zip(bank.gates, again.gates):
        for (name, p), (_, q) in zip(first.state_dict().items(), second.state_dict().items()):
            assert torch.equal(p, q), name
    with pytest.raises(ShapeMismatchError):
        GateBank.from_tensors({"nocolon": torch.zeros(3)})
    recorder = GateRecorder(["a.to_q", "b.to_k"], ["x", "y", "z"], 2, torch.device("cpu"))
    recorder.step = 1
    recorder.record("b.to_k", torch.tensor([2, 0]), torch.stack([torch.full((3, 6), 0.25), torch.full((3, 6), 0.75)]))
    values = recorder.result()
    assert values[1, 1].tolist() == [0.75, pytest.approx(float("nan"), nan_ok=True), 0.25]
    assert torch.isnan(values[0]).all()


def test_recorder_averages_every_forward_of_a_step() -> None:
    """CFG's halves under shares (or a true-CFG pipeline) run the denoiser twice per step: both count."""
    recorder = GateRecorder(["a.to_q"], ["x", "y"], 1, torch.device("cpu"))
    owners = torch.tensor([0, 1])
    recorder.record("a.to_q", owners, torch.stack([torch.full((2, 4), 0.2), torch.full((2, 4), 0.6)]))
    recorder.record("a.to_q", owners, torch.stack([torch.full((2, 4), 0.4), torch.full((2, 4), 1.0)]))
    assert recorder.result()[0, 0].tolist() == [pytest.approx(0.3), pytest.approx(0.8)]
