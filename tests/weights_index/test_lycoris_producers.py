"""LyCORIS files written by LyCORIS itself (lycoris-lora 4.1.3), checked against LyCORIS's own forward pass.

Per layer: the update we read must reproduce each wrapped module's output difference. Whole pipeline: the latents
of our composition (merge, weight 1, fused and unfused) must equal the latents with LyCORIS's network applied.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from producers import (
    apply_weight,
    lycoris_network,
    pipeline_latents,
    producer_outputs,
    relative_error,
    remove,
    save,
)

from composer.mixin import make_composable
from fusion.relative import Relative
from weights_index.reader import probe, read_adapter

TOL = 1e-5

CASES = {
    "locon": ("locon", {}),
    "locon-tucker": ("locon", {"use_tucker": True}),
    "locon-dora": ("locon", {"dora_wd": True}),
    "locon-rs-scalar": ("locon", {"rs_lora": True, "use_scalar": True}),
    "loha": ("loha", {}),
    "loha-tucker": ("loha", {"use_tucker": True}),
    "loha-dora": ("loha", {"dora_wd": True}),
    "lokr": ("lokr", {}),
    "lokr-tucker": ("lokr", {"use_tucker": True}),
    "lokr-decompose-both": ("lokr", {"decompose_both": True, "factor": 4}),
    "lokr-full-matrix": ("lokr", {"full_matrix": True}),
    "lokr-dora": ("lokr", {"dora_wd": True}),
    "ia3": ("ia3", {"preset": "ia3"}),
    "full": ("full", {}),
    "diag-oft": ("diag-oft", {"preset": "attn"}),
    "diag-oft-constrained": ("diag-oft", {"preset": "attn", "constraint": 1e-3, "rescaled": True}),
    "boft": ("boft", {"preset": "attn", "text": False}),
    "glora": ("glora", {"preset": "attn"}),
}


def _module_keys(pipe) -> dict[int, str]:
    """id(module) → canonical key, found by identity in the pipeline (independent of any name mapping)."""
    keys = {}
    denoiser = pipe.unet if getattr(pipe, "unet", None) is not None else pipe.transformer
    for name, module in denoiser.named_modules():
        keys[id(module)] = name
    for component in ("text_encoder", "text_encoder_2"):
        encoder = getattr(pipe, component, None)
        if encoder is not None:
            for name, module in encoder.named_modules():
                keys[id(module)] = f"{component}.{name}"
    return keys


def _layer_errors(outputs, adapter, pipe) -> dict[str, float]:
    keys = _module_keys(pipe)
    layers = dict(adapter.all_layers())
    errors = {}
    for name, (module, x, want) in outputs.items():
        key = keys[id(module)]
        kind = layers.get(key) or layers[key.replace("text_encoder.", "text_encoder.text_model.", 1)]
        delta = kind.resolve(module.weight).delta() if isinstance(kind, Relative) else kind.delta(torch.float32)
        errors[name] = relative_error(apply_weight(module, x, delta.reshape(module.weight.shape)), want)
    return errors


def check_producer_file(pipe, network, path: Path) -> dict[str, float]:
    """Read exact per layer and composed exact (fused and unfused) against the applied network; returns errors."""
    want = pipeline_latents(pipe)
    outputs = producer_outputs(network)
    remove(network)
    composable = make_composable(pipe)
    adapter = read_adapter(path, composable.family, shapes=composable.model_shapes())
    layer_errors = _layer_errors(outputs, adapter, pipe)
    assert len(layer_errors) == len(dict(adapter.all_layers()))
    base = pipeline_latents(pipe)
    assert relative_error(base, want) > 1e-3, "the adapter must change the output"
    composable.add_adapter_file(path, name="a")
    composable.set_composition({"a": 1.0})
    fused = pipeline_latents(composable)
    composable.set_composition({"a": 1.0}, fuse=False)
    unfused = pipeline_latents(composable)
    composable.clear_composition()
    assert torch.equal(pipeline_latents(composable), base)
    errors = {"layer": max(layer_errors.values()), "fused": relative_error(fused, want)}
    errors["unfused"] = relative_error(unfused, want)
    return errors


def _zero_bias_diffs(network) -> None:
    """Make LyCORIS full/diff modules store diff_b = 0 (bias updates are refused; see the test below)."""
    with torch.no_grad():
        for module in network.loras:
            if getattr(module, "bias", None) is not None and module.org_bias is not None:
                module.bias.copy_(module.org_bias[0])


@pytest.mark.parametrize("case", list(CASES))
def test_lycoris_kohya_sd1(tiny_sd, tmp_path: Path, case: str) -> None:
    algo, options = CASES[case]
    options = dict(options)
    network = lycoris_network(tiny_sd, algo, tmp_path, preset=options.pop("preset", "full"), **options)
    if algo == "full":
        _zero_bias_diffs(network)
    path = save(network, tmp_path / f"{case}.safetensors")
    assert probe(path).family == "sd1"
    errors = check_producer_file(tiny_sd, network, path)
    assert max(errors.values()) <= TOL, errors
