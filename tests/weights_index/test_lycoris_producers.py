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
    standalone_network,
)

from composer.mixin import make_composable
from fusion.adapters import Dense
from fusion.errors import ComposerError, UnknownLayoutError
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
    "full-diff_b": ("full", {}),
    "diag-oft": ("diag-oft", {"preset": "attn"}),
    "diag-oft-constrained": ("diag-oft", {"preset": "attn", "constraint": 1e-3, "rescaled": True}),
    "boft": ("boft", {"preset": "attn", "text": False}),
    "glora": ("glora", {"preset": "attn"}),
    "locon-norm": ("locon", {"preset": "norm", "train_norm": True}),
}


UNFUSED = ("locon", "loha", "lokr-tucker", "locon-dora", "ia3", "full-diff_b", "boft", "glora", "locon-norm")
"""Cases also checked unfused (the unfused paths are per kind: factors, dense/effective weight; others fused only)."""


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
        got = apply_weight(module, x, delta.reshape(module.weight.shape))
        if isinstance(kind, Dense) and kind.bias is not None:
            channels_first = isinstance(module, (torch.nn.Conv2d, torch.nn.GroupNorm))
            got = got + kind.bias_delta(got.dtype).reshape((1, -1, 1, 1) if channels_first else (-1,))
        errors[name] = relative_error(got, want)
    return errors


def check_producer_file(pipe, network, path: Path, *, unfused: bool = True) -> dict[str, float]:
    """Read exact per layer (the adapter ``add_adapter_file`` registered, read with the pipeline's shapes) and
    composed exact (fused, and unfused if asked) against the applied network; returns the worst errors."""
    want = pipeline_latents(pipe)
    outputs = producer_outputs(network)
    remove(network)
    composable = make_composable(pipe)
    base = pipeline_latents(composable)
    assert relative_error(base, want) > 1e-4, "the adapter must change the output (100× the tolerance)"
    composable.add_adapter_file(path, name="a")
    adapter = composable.adapters["a"]
    layer_errors = _layer_errors(outputs, adapter, pipe)
    assert len(layer_errors) == len(dict(adapter.all_layers()))
    composable.set_composition({"a": 1.0})
    errors = {"layer": max(layer_errors.values()), "fused": relative_error(pipeline_latents(composable), want)}
    if unfused:
        composable.set_composition({"a": 1.0}, fuse=False)
        errors["unfused"] = relative_error(pipeline_latents(composable), want)
    composable.clear_composition()
    return errors


@pytest.mark.parametrize("case", list(CASES))
def test_lycoris_kohya_sd1(tiny_sd, tmp_path: Path, case: str) -> None:
    algo, options = CASES[case]
    options = dict(options)
    network = lycoris_network(tiny_sd, algo, tmp_path, preset=options.pop("preset", "full"), **options)
    path = save(network, tmp_path / f"{case}.safetensors")
    assert probe(path).family == "sd1"
    errors = check_producer_file(tiny_sd, network, path, unfused=case in UNFUSED)
    assert max(errors.values()) <= TOL, errors


@pytest.mark.parametrize(("algo", "options"), [("lokr", {}), ("loha", {"dora_wd": True})])
def test_lycoris_kohya_sdxl(tiny_sdxl, tmp_path: Path, algo: str, options: dict) -> None:
    network = lycoris_network(tiny_sdxl, algo, tmp_path, **options)
    path = save(network, tmp_path / f"{algo}.safetensors")
    assert any(k.startswith("lora_te2_") for k in safe_keys(path))
    errors = check_producer_file(tiny_sdxl, network, path)
    assert max(errors.values()) <= TOL, errors


@pytest.mark.parametrize(("algo", "options"), [("lokr", {}), ("locon", {"dora_wd": True}), ("ia3", {})])
def test_lycoris_kohya_flux(tiny_flux, tmp_path: Path, algo: str, options: dict) -> None:
    network = lycoris_network(tiny_flux, algo, tmp_path, preset="flux", **options)
    path = save(network, tmp_path / f"{algo}.safetensors")
    errors = check_producer_file(tiny_flux, network, path)
    assert max(errors.values()) <= TOL, errors


@pytest.mark.parametrize("algo", ["locon", "loha"])
def test_lycoris_standalone_names(tiny_sd, tmp_path: Path, algo: str) -> None:
    network = standalone_network(tiny_sd, algo)
    path = save(network, tmp_path / f"{algo}.safetensors")
    assert all(k.startswith("lycoris_") for k in safe_keys(path))
    errors = check_producer_file(tiny_sd, network, path)
    assert max(errors.values()) <= TOL, errors


@pytest.mark.parametrize("algo", ["loha", "lokr"])
def test_fp16_files_are_rebuilt_in_fp32(tiny_sd, tmp_path: Path, algo: str) -> None:
    """An fp16 file's factors are exact fp16 values; the rebuilt ΔW must not be rounded to fp16 again."""
    network = lycoris_network(tiny_sd, algo, tmp_path, text=False)
    with torch.no_grad():
        for param in network.parameters():
            param.copy_(param.half().float())
    path = save(network, tmp_path / f"{algo}.safetensors", torch.float16)
    outputs = producer_outputs(network)
    remove(network)
    adapter = read_adapter(path, "sd1", shapes=make_composable(tiny_sd).model_shapes())
    assert all(t.dtype == torch.float32 for t in adapter.tensors())
    errors = _layer_errors(outputs, adapter, tiny_sd)
    assert max(errors.values()) <= 1e-6, max(errors.values())


def test_bias_updates_switch_and_restore_exactly(tiny_sd, tmp_path: Path) -> None:
    """LyCORIS full/diff's bias updates follow the composition's weights fused, unfused and per step, and clearing
    restores every bias bit-exactly."""
    network = lycoris_network(tiny_sd, "full", tmp_path, preset="attn", text=False)
    path = save(network, tmp_path / "full.safetensors")
    remove(network)
    assert any(k.endswith(".diff_b") for k in safe_keys(path))
    pipe = make_composable(tiny_sd)
    before = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    pipe.add_adapter_file(path, name="full")
    pipe.set_composition({"full": 0.5})
    half_fused = pipeline_latents(pipe)
    pipe.set_composition({"full": 0.5}, fuse=False)
    assert relative_error(pipeline_latents(pipe), half_fused) <= TOL
    pipe.set_composition({"full": 1.0})
    merged = pipeline_latents(pipe)
    pipe.set_composition({"full": 1.0}, method="composite")
    assert relative_error(pipeline_latents(pipe), merged) <= TOL
    pipe.set_composition({"full": "0@0,1@1"})
    pipeline_latents(pipe)
    pipe.clear_composition()
    assert all(torch.equal(before[k], v) for k, v in pipe.unet.state_dict().items())


def test_kohya_lora_adapting_only_q_and_v_of_the_text_encoder(tiny_sd, tmp_path: Path) -> None:
    """A plain kohya LoRA (lora_down/lora_up/alpha) whose text-encoder part has no out_proj: diffusers' own key
    inference fails on it (untyped ValueError); we name the layout and read it exactly."""
    network = lycoris_network(tiny_sd, "locon", tmp_path, preset="qv")
    path = save(network, tmp_path / "qv.safetensors")
    assert probe(path).format == "kohya"
    assert any("q_proj" in k for k in safe_keys(path))
    assert not any("out_proj" in k for k in safe_keys(path))
    errors = check_producer_file(tiny_sd, network, path)
    assert max(errors.values()) <= TOL, errors


def test_bfl_named_flux_lycoris_is_refused_with_a_fix(tiny_flux, tmp_path: Path) -> None:
    from safetensors.torch import save_file

    name = "lora_unet_double_blocks_0_img_attn_qkv"
    save_file(
        {f"{name}.lokr_w1": torch.randn(2, 2), f"{name}.lokr_w2": torch.randn(48, 16)}, str(tmp_path / "b.safetensors")
    )
    pipe = make_composable(tiny_flux)
    with pytest.raises(UnknownLayoutError, match="double_blocks") as caught:
        pipe.add_adapter_file(tmp_path / "b.safetensors")
    assert "fix:" in str(caught.value)


def test_relative_kinds_need_shapes(tiny_sd, tmp_path: Path) -> None:
    network = lycoris_network(tiny_sd, "ia3", tmp_path, preset="ia3")
    path = save(network, tmp_path / "ia3.safetensors")
    remove(network)
    with pytest.raises(ComposerError, match="add_adapter_file"):
        read_adapter(path)


def test_stacking_relative_adapters_versus_sequential(tiny_sd, tmp_path: Path) -> None:
    """Two weight-relative adapters (IA3, then diag-OFT) stack as W₀ + ΔW₁ + ΔW₂, each against W₀: exactly what
    LyCORIS computes with both networks applied at once. Merging them one after the other, f₂(f₁(W₀)), differs by a
    second-order term (measured: ~4e-5 relative here, a few % of the adapters' own effect)."""
    first = lycoris_network(tiny_sd, "ia3", tmp_path, preset="ia3", text=False, seed=1)
    first_path = save(first, tmp_path / "ia3.safetensors")
    second = lycoris_network(tiny_sd, "diag-oft", tmp_path, preset="attn", text=False, seed=2)
    second_path = save(second, tmp_path / "oft.safetensors")
    both_applied = pipeline_latents(tiny_sd)
    remove(second)
    remove(first)
    pipe = make_composable(tiny_sd)
    base = pipeline_latents(pipe)
    pipe.add_adapter_file(first_path, name="a")
    pipe.add_adapter_file(second_path, name="b")
    pipe.set_composition({"a": 1.0, "b": 1.0})
    stacked = pipeline_latents(pipe)
    pipe.clear_composition()
    assert relative_error(stacked, both_applied) <= TOL
    shapes = pipe.model_shapes()
    with torch.no_grad():
        for path in (first_path, second_path):
            for key, kind in read_adapter(path, "sd1", shapes=shapes).layers.items():
                weight = pipe.unet.get_submodule(key).weight
                weight.add_(kind.resolve(weight).delta().reshape(weight.shape))
    sequential = pipeline_latents(pipe)
    gap = relative_error(stacked, sequential)
    assert 1e-6 < gap < 0.2 * relative_error(stacked, base), gap


def safe_keys(path: Path) -> list[str]:
    """Tensor names of a safetensors file."""
    from safetensors import safe_open

    with safe_open(str(path), "pt") as handle:
        return list(handle.keys())


def safe_tensor(path: Path, key: str) -> torch.Tensor:
    """One tensor of a safetensors file."""
    from safetensors import safe_open

    with safe_open(str(path), "pt") as handle:
        return handle.get_tensor(key)


def test_library_entries_are_read_with_the_models_shapes(tiny_sd, tmp_path: Path) -> None:
    """A LoHa with conv layers picked from a library by a prompt tag registers with its conv shapes (the catalog
    path reads for the pipeline's model, like ``add_adapter_file``)."""
    from composer.facade import Composer

    library = tmp_path / "library"
    library.mkdir()
    network = lycoris_network(tiny_sd, "loha", tmp_path, text=False)
    save(network, library / "loha_style.safetensors")
    remove(network)
    composer = Composer(model="tiny-sd", library=library)
    _, chosen = composer.choose("a fox <lora:loha_style:1.0>", None)
    with composer.composing(chosen) as pipe:
        layers = pipe.adapters["loha_style"].layers
        assert len(layers["conv_in"].shape) == 4
