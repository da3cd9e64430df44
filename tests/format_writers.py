"""Write adapter files exactly the way each producer does, with random factors shaped for a given model.

Every writer returns ``(path, expected)`` where ``expected`` maps canonical layer keys (denoiser paths without a
component prefix; ``text_encoder.…`` / ``text_encoder_2.…`` for text encoders) to the dense ΔW the producer means,
computed here independently of the readers (plain products, Hadamard and Kronecker formulas).

Module enumeration: :func:`attention_shapes` lists a denoiser's attention projections (and, optionally, its 3×3
resnet convs for LoCon); :func:`text_shapes` a CLIP text encoder's attention projections.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors.torch import save_file

from fusion.adapters import Sparse
from weights_index.formats.shira import save_shira

Shapes = dict[str, tuple[int, ...]]
Expected = dict[str, torch.Tensor]

_UNET_ATTN = ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "attn2.to_q", "attn2.to_k", "attn2.to_v")
_FLUX_ATTN = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_q_proj", "attn.to_add_out", "proj_out")


def attention_shapes(denoiser: torch.nn.Module, *, convs: bool = False, limit: int | None = None) -> Shapes:
    """Weight shapes of a denoiser's attention projections (UNet or Flux), plus resnet 3×3 convs if ``convs``."""
    found: Shapes = {}
    for name, module in denoiser.named_modules():
        if isinstance(module, torch.nn.Linear) and name.endswith(_UNET_ATTN + _FLUX_ATTN):
            if "single_transformer_blocks" in name and name.endswith("proj_out"):
                continue
            found[name] = tuple(module.weight.shape)
        elif convs and isinstance(module, torch.nn.Conv2d) and ".resnets." in name and name.endswith("conv1"):
            found[name] = tuple(module.weight.shape)
    names = sorted(found)[:limit] if limit else sorted(found)
    return {n: found[n] for n in names}


def text_shapes(text_encoder: torch.nn.Module, prefix: str = "text_encoder", limit: int = 4) -> Shapes:
    """Canonical keys (``<prefix>.<path>``) and shapes of a CLIP text encoder's q/k/v/out projections."""
    found: Shapes = {}
    for name, module in text_encoder.named_modules():
        if isinstance(module, torch.nn.Linear) and name.endswith(("q_proj", "k_proj", "v_proj", "out_proj")):
            found[f"{prefix}.{name}"] = tuple(module.weight.shape)
    return {n: found[n] for n in sorted(found)[:limit]}


def random_lora(shape: tuple[int, ...], rank: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Random (down, up) factors for a weight of ``shape`` (linear, or conv with a 1×1 up factor)."""
    if len(shape) == 4:
        down = torch.randn(rank, shape[1], shape[2], shape[3], generator=gen) * 0.1
        up = torch.randn(shape[0], rank, 1, 1, generator=gen) * 0.1
    else:
        down = torch.randn(rank, shape[1], generator=gen) * 0.1
        up = torch.randn(shape[0], rank, generator=gen) * 0.1
    return down, up


def lora_delta(down: torch.Tensor, up: torch.Tensor, scale: float) -> torch.Tensor:
    """scale · up @ down, reshaped to the weight (the LoRA/LoCon definition)."""
    product = up.reshape(up.shape[0], -1).double() @ down.reshape(down.shape[0], -1).double()
    return (scale * product).reshape(up.shape[0], *down.shape[1:]).float()


def _kohya_name(key: str, ldm_layers_per_block: int | None = None) -> str:
    if key.startswith(("text_encoder.", "text_encoder_2.")):
        component, _, rest = key.partition(".")
        prefix = {"text_encoder": "lora_te", "text_encoder_2": "lora_te2"}[component]
        if ldm_layers_per_block is not None and component == "text_encoder":
            prefix = "lora_te1"
        return f"{prefix}_{rest.replace('.', '_')}"
    if ldm_layers_per_block is not None:
        key = unet_to_ldm(key, ldm_layers_per_block)
    return "lora_unet_" + key.replace(".", "_")


def unet_to_ldm(key: str, layers_per_block: int) -> str:
    """diffusers UNet attention path → the LDM/SGM name kohya uses for SDXL (``input_blocks.4.1.…``)."""
    parts = key.split(".")
    if parts[0] == "down_blocks" and parts[2] == "attentions":
        block = 1 + int(parts[1]) * (layers_per_block + 1) + int(parts[3])
        return ".".join(["input_blocks", str(block), "1", *parts[4:]])
    if parts[0] == "up_blocks" and parts[2] == "attentions":
        block = int(parts[1]) * (layers_per_block + 1) + int(parts[3])
        return ".".join(["output_blocks", str(block), "1", *parts[4:]])
    if parts[0] == "mid_block" and parts[1] == "attentions":
        return ".".join(["middle_block", "1", *parts[3:]])
    raise ValueError(f"no LDM name for {key}")


def write_kohya(
    path: Path,
    shapes: Shapes,
    *,
    rank: int = 4,
    alphas: Mapping[str, float] | float = 2.0,
    seed: int = 0,
    ldm_layers_per_block: int | None = None,
    metadata: Mapping[str, str] | None = None,
    dtype: torch.dtype = torch.float32,
) -> tuple[Path, Expected]:
    """kohya-ss / A1111 LoRA: ``lora_unet_<path_with_underscores>.lora_down.weight`` / ``lora_up`` / ``alpha``.

    ``ldm_layers_per_block`` switches the UNet names to LDM ``input_blocks`` naming (kohya's SDXL) and the first
    text encoder to ``lora_te1_``.
    """
    gen = torch.Generator().manual_seed(seed)
    tensors: dict[str, torch.Tensor] = {}
    expected: Expected = {}
    for key, shape in shapes.items():
        down, up = random_lora(shape, rank, gen)
        alpha = alphas[key] if isinstance(alphas, Mapping) else alphas
        name = _kohya_name(key, ldm_layers_per_block)
        tensors[f"{name}.lora_down.weight"] = down.to(dtype)
        tensors[f"{name}.lora_up.weight"] = up.to(dtype)
        tensors[f"{name}.alpha"] = torch.tensor(float(alpha)).to(dtype)
        expected[key] = lora_delta(down.to(dtype), up.to(dtype), alpha / rank)
    save_file(tensors, str(path), metadata=dict(metadata or {}))
    return path, expected


def write_diffusers(
    path: Path,
    shapes: Shapes,
    *,
    component: str = "unet",
    rank: int = 4,
    seed: int = 0,
    lora_alpha: float | None = None,
    metadata: Mapping[str, str] | None = None,
) -> tuple[Path, Expected]:
    """diffusers ``save_lora_weights``: ``unet.<path>.lora_A.weight`` / ``lora_B`` (``transformer.`` for Flux).

    With ``lora_alpha`` the scale goes where diffusers ≥ 0.34 puts it: ``lora_adapter_metadata`` (per component).
    """
    gen = torch.Generator().manual_seed(seed)
    tensors: dict[str, torch.Tensor] = {}
    expected: Expected = {}
    scale = 1.0 if lora_alpha is None else lora_alpha / rank
    for key, shape in shapes.items():
        down, up = random_lora(shape, rank, gen)
        name = key if key.startswith("text_encoder") else f"{component}.{key}"
        tensors[f"{name}.lora_A.weight"] = down
        tensors[f"{name}.lora_B.weight"] = up
        expected[key] = lora_delta(down, up, scale)
    meta = dict(metadata or {})
    if lora_alpha is not None:
        packed: dict[str, object] = {}
        components = {k.split(".")[0] for k in tensors if k.startswith("text_encoder")} | {component}
        for name in components:
            packed.update({f"{name}.r": rank, f"{name}.lora_alpha": lora_alpha, f"{name}.target_modules": ["to_q"]})
        meta["lora_adapter_metadata"] = json.dumps(packed)
    save_file(tensors, str(path), metadata=meta)
    return path, expected


def write_peft(path: Path, shapes: Shapes, *, rank: int = 4, lora_alpha: float = 8.0, seed: int = 0):
    """PEFT ``save_pretrained``: ``base_model.model.<path>.lora_A.weight`` plus ``adapter_config.json`` beside it."""
    gen = torch.Generator().manual_seed(seed)
    tensors: dict[str, torch.Tensor] = {}
    expected: Expected = {}
    for key, shape in shapes.items():
        down, up = random_lora(shape, rank, gen)
        tensors[f"base_model.model.{key}.lora_A.weight"] = down
        tensors[f"base_model.model.{key}.lora_B.weight"] = up
        expected[key] = lora_delta(down, up, lora_alpha / rank)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata={"format": "pt"})
    config = {"peft_type": "LORA", "r": rank, "lora_alpha": lora_alpha, "target_modules": ["to_q", "to_k"]}
    path.with_name("adapter_config.json").write_text(json.dumps(config))
    return path, expected


_FLUX_DOUBLE = {
    "img_attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
    "img_attn.proj": ("attn.to_out.0",),
    "txt_attn.qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
    "txt_attn.proj": ("attn.to_add_out",),
}
_XLABS = {"qkv_lora1": "img_attn.qkv", "proj_lora1": "img_attn.proj", "qkv_lora2": "txt_attn.qkv"}


def _flux_fused(transformer: torch.nn.Module, block: int, bfl: str) -> tuple[list[str], list[int], int]:
    targets = [f"transformer_blocks.{block}.{t}" for t in _FLUX_DOUBLE[bfl]]
    outs = [transformer.get_submodule(t).weight.shape[0] for t in targets]
    inp = transformer.get_submodule(targets[0]).weight.shape[1]
    return targets, outs, inp


def write_flux_kohya(
    path: Path, transformer: torch.nn.Module, *, rank: int = 4, alpha: float = 2.0, seed: int = 0
) -> tuple[Path, Expected]:
    """kohya-ss sd-scripts Flux LoRA: BFL module names (``lora_unet_double_blocks_0_img_attn_qkv``), fused qkv."""
    gen = torch.Generator().manual_seed(seed)
    tensors: dict[str, torch.Tensor] = {}
    expected: Expected = {}
    for block in range(len(transformer.transformer_blocks)):
        for bfl in _FLUX_DOUBLE:
            targets, outs, inp = _flux_fused(transformer, block, bfl)
            down, up = random_lora((sum(outs), inp), rank, gen)
            name = f"lora_unet_double_blocks_{block}_{bfl.replace('.', '_')}"
            tensors[f"{name}.lora_down.weight"] = down
            tensors[f"{name}.lora_up.weight"] = up
            tensors[f"{name}.alpha"] = torch.tensor(alpha)
            for target, chunk in zip(targets, lora_delta(down, up, alpha / rank).split(outs)):
                expected[target] = chunk
    save_file(
        tensors, str(path), metadata={"ss_base_model_version": "flux1", "ss_network_module": "networks.lora_flux"}
    )
    return path, expected


def write_flux_xlabs(path: Path, transformer: torch.nn.Module, *, rank: int = 4, seed: int = 0):
    """XLabs-AI x-flux LoRA: ``double_blocks.0.processor.qkv_lora1.down.weight`` (no alpha: scale 1)."""
    gen = torch.Generator().manual_seed(seed)
    tensors: dict[str, torch.Tensor] = {}
    expected: Expected = {}
    for block in range(len(transformer.transformer_blocks)):
        for xlabs, bfl in _XLABS.items():
            targets, outs, inp = _flux_fused(transformer, block, bfl)
            down, up = random_lora((sum(outs), inp), rank, gen)
            tensors[f"double_blocks.{block}.processor.{xlabs}.down.weight"] = down
            tensors[f"double_blocks.{block}.processor.{xlabs}.up.weight"] = up
            for target, chunk in zip(targets, lora_delta(down, up, 1.0).split(outs)):
                expected[target] = chunk
    save_file(tensors, str(path))
    return path, expected


def write_loha(
    path: Path, shapes: Shapes, *, rank: int = 2, alpha: float = 1.0, seed: int = 0, tucker: bool = False
) -> tuple[Path, Expected]:
    """LyCORIS LoHa (kohya names): ``hada_w1_a`` (out, r), ``hada_w1_b`` (r, in), ``hada_w2_a/b``, ``alpha``.

    Conv factors are stored flattened, (r, in·kh·kw), as LyCORIS does. With ``tucker`` (conv layers only)
    w1a/w1b are (r, out)/(r, in) and ``hada_t1/t2`` are (r, r, kh, kw).
    """
    gen = torch.Generator().manual_seed(seed)
    tensors: dict[str, torch.Tensor] = {}
    expected: Expected = {}
    for key, shape in shapes.items():
        name = _kohya_name(key)
        out, inp = shape[0], shape[1]
        if tucker and len(shape) == 4:
            parts = {
                "hada_w1_a": torch.randn(rank, out, generator=gen),
                "hada_w1_b": torch.randn(rank, inp, generator=gen),
                "hada_w2_a": torch.randn(rank, out, generator=gen),
                "hada_w2_b": torch.randn(rank, inp, generator=gen),
                "hada_t1": torch.randn(rank, rank, *shape[2:], generator=gen),
                "hada_t2": torch.randn(rank, rank, *shape[2:], generator=gen),
            }
            w1 = torch.zeros(shape, dtype=torch.float64)
            w2 = torch.zeros(shape, dtype=torch.float64)
            for i in range(rank):
                for j in range(rank):
                    outer1 = torch.outer(parts["hada_w1_a"][i], parts["hada_w1_b"][j]).double()
                    outer2 = torch.outer(parts["hada_w2_a"][i], parts["hada_w2_b"][j]).double()
                    w1 += outer1[:, :, None, None] * parts["hada_t1"][i, j].double()
                    w2 += outer2[:, :, None, None] * parts["hada_t2"][i, j].double()
            delta = w1 * w2
        else:
            flat_in = int(torch.tensor(shape[1:]).prod())
            b_shape = (rank, flat_in)
            parts = {
                "hada_w1_a": torch.randn(out, rank, generator=gen),
                "hada_w1_b": torch.randn(*b_shape, generator=gen),
                "hada_w2_a": torch.randn(out, rank, generator=gen),
                "hada_w2_b": torch.randn(*b_shape, generator=gen),
            }
            w1 = parts["hada_w1_a"].double() @ parts["hada_w1_b"].reshape(rank, -1).double()
            w2 = parts["hada_w2_a"].double() @ parts["hada_w2_b"].reshape(rank, -1).double()
            delta = (w1 * w2).reshape(shape)
        for part, value in parts.items():
            tensors[f"{name}.{part}"] = value
        tensors[f"{name}.alpha"] = torch.tensor(alpha)
        expected[key] = (delta * (alpha / rank)).float()
    save_file(
        tensors, str(path), metadata={"ss_network_module": "lycoris.kohya", "ss_network_args": '{"algo": "loha"}'}
    )
    return path, expected


def write_lokr(
    path: Path,
    shapes: Shapes,
    *,
    factor: int = 4,
    rank: int | None = 2,
    alpha: float = 1.0,
    seed: int = 0,
    decompose_w1: bool = False,
) -> tuple[Path, Expected]:
    """LyCORIS LoKr (kohya names): W1 (factor × factor) ⊗ W2; W2 as ``lokr_w2_a/b`` of ``rank`` or full if None.

    ``decompose_w1`` stores W1 as ``lokr_w1_a/b`` too. Scale alpha/rank applies unless both factors are full.
    """
    gen = torch.Generator().manual_seed(seed)
    tensors: dict[str, torch.Tensor] = {}
    expected: Expected = {}
    for key, shape in shapes.items():
        name = _kohya_name(key)
        out, inp = shape[0], shape[1]
        a, m = factor, factor
        c, d = out // a, inp // m
        if decompose_w1:
            w1a, w1b = torch.randn(a, 1, generator=gen), torch.randn(1, m, generator=gen)
            tensors[f"{name}.lokr_w1_a"], tensors[f"{name}.lokr_w1_b"] = w1a, w1b
            w1 = w1a.double() @ w1b.double()
        else:
            w1 = torch.randn(a, m, generator=gen)
            tensors[f"{name}.lokr_w1"] = w1
            w1 = w1.double()
        if rank is None:
            w2 = torch.randn(c, d, generator=gen)
            tensors[f"{name}.lokr_w2"] = w2
            w2 = w2.double()
        else:
            w2a, w2b = torch.randn(c, rank, generator=gen), torch.randn(rank, d, generator=gen)
            tensors[f"{name}.lokr_w2_a"], tensors[f"{name}.lokr_w2_b"] = w2a, w2b
            w2 = w2a.double() @ w2b.double()
        tensors[f"{name}.alpha"] = torch.tensor(alpha)
        decomposed_rank = rank if rank is not None else (1 if decompose_w1 else None)
        scale = 1.0 if decomposed_rank is None else alpha / decomposed_rank
        expected[key] = (torch.kron(w1, w2) * scale).float()
    save_file(
        tensors, str(path), metadata={"ss_network_module": "lycoris.kohya", "ss_network_args": '{"algo": "lokr"}'}
    )
    return path, expected


def random_sparse(shape: tuple[int, ...], density: float, gen: torch.Generator) -> Sparse:
    """A random sparse update with ``density`` of the entries set."""
    numel = int(torch.tensor(shape).prod())
    count = max(1, int(numel * density))
    index = torch.randperm(numel, generator=gen)[:count].sort().values
    return Sparse(index=index, values=torch.randn(count, generator=gen), shape=shape)


def write_shira(
    path: Path, shapes: Shapes, *, family: str, density: float = 0.05, seed: int = 0, extra: Mapping[str, str] = ()
) -> tuple[Path, Expected]:
    """Our SHiRA layout via :func:`weights_index.formats.shira.save_shira`."""
    gen = torch.Generator().manual_seed(seed)
    layers = {key: random_sparse(shape, density, gen) for key, shape in shapes.items()}
    meta = {"base_family": family, "mask_type": "random", "density": str(density), "base_fingerprint": "test"}
    save_shira(layers, path, {**meta, **dict(extra)})
    return path, {k: v.delta() for k, v in layers.items()}


def write_peft_shira(path: Path, shapes: Shapes, *, r: int = 2, seed: int = 0) -> tuple[Path, Expected]:
    """PEFT ``ShiraModel.save_pretrained``: ``base_model.model.<path>.shira_indices`` (int32 2×K) / ``shira_weight``."""
    gen = torch.Generator().manual_seed(seed)
    tensors: dict[str, torch.Tensor] = {}
    expected: Expected = {}
    for key, (out, inp) in shapes.items():
        count = min(out * inp, r * (out + inp))
        flat = torch.randperm(out * inp, generator=gen)[:count]
        rows, cols = flat // inp, flat % inp
        values = torch.randn(count, generator=gen)
        tensors[f"base_model.model.{key}.shira_indices"] = torch.stack([rows, cols]).to(torch.int32)
        tensors[f"base_model.model.{key}.shira_weight"] = values
        dense = torch.zeros(out, inp)
        dense[rows, cols] = values
        expected[key] = dense
    save_file(tensors, str(path), metadata={"format": "pt"})
    return path, expected
