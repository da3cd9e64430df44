"""Layer groups and weight schedules: A1111 block orders and presets, loractl keyframes, the precomputed table."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from diffusers import FluxTransformer2DModel, UNet2DConditionModel

from composer.mixin import make_composable
from fusion.adapters import Adapter, LowRank
from fusion.errors import CompositionError
from fusion.layer_groups import BlockLayout
from fusion.schedules import (
    AdapterSchedule,
    Keyframes,
    build_weight_table,
    parse_block_vector,
    parse_keyframes,
    parse_spec,
    preset_vector,
    step_weights,
)

# The extension's own tables (sd-webui-lora-block-weight), written out independently of our code.
A1111_17 = [
    "BASE",
    "IN01",
    "IN02",
    "IN04",
    "IN05",
    "IN07",
    "IN08",
    "M00",
    "OUT03",
    "OUT04",
    "OUT05",
    "OUT06",
    "OUT07",
    "OUT08",
    "OUT09",
    "OUT10",
    "OUT11",
]
A1111_26 = ["BASE", *(f"IN{i:02d}" for i in range(12)), "M00", *(f"OUT{i:02d}" for i in range(12))]
A1111_12 = ["BASE", "IN04", "IN05", "IN07", "IN08", "M00", "OUT00", "OUT01", "OUT02", "OUT03", "OUT04", "OUT05"]
A1111_20 = ["BASE", *(f"IN{i:02d}" for i in range(9)), "M00", *(f"OUT{i:02d}" for i in range(9))]
A1111_FLUX_61 = ["CLIP", "T5", "IN", *(f"D{i:02d}" for i in range(19)), *(f"S{i:02d}" for i in range(38)), "OUT"]
A1111_SD1_PRESETS = {
    "NONE": "0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0",
    "ALL": "1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1",
    "INS": "1,1,1,1,0,0,0,0,0,0,0,0,0,0,0,0,0",
    "IND": "1,0,0,0,1,1,1,0,0,0,0,0,0,0,0,0,0",
    "INALL": "1,1,1,1,1,1,1,0,0,0,0,0,0,0,0,0,0",
    "MIDD": "1,0,0,0,1,1,1,1,1,1,1,1,0,0,0,0,0",
    "OUTD": "1,0,0,0,0,0,0,0,1,1,1,1,0,0,0,0,0",
    "OUTS": "1,0,0,0,0,0,0,0,0,0,0,0,1,1,1,1,1",
    "OUTALL": "1,0,0,0,0,0,0,0,1,1,1,1,1,1,1,1,1",
}
# SDXL: S = IN04 IN05 OUT03-05 (shallow), D = IN07 IN08 OUT00-02 (deep).
SDXL_PRESETS = {
    "INS": "1,1,1,0,0,0,0,0,0,0,0,0",
    "IND": "1,0,0,1,1,0,0,0,0,0,0,0",
    "INALL": "1,1,1,1,1,0,0,0,0,0,0,0",
    "MIDD": "1,0,0,1,1,1,1,1,1,0,0,0",
    "OUTD": "1,0,0,0,0,0,1,1,1,0,0,0",
    "OUTS": "1,0,0,0,0,0,0,0,0,1,1,1",
    "OUTALL": "1,0,0,0,0,0,1,1,1,1,1,1",
}


def _vector(text: str) -> tuple[float, ...]:
    return tuple(float(v) for v in text.split(","))


@pytest.fixture(scope="module")
def sd1() -> BlockLayout:
    with torch.device("meta"):
        unet = UNet2DConditionModel(cross_attention_dim=768)  # SD 1.5 shapes
    return BlockLayout.from_denoiser("sd1", unet)


@pytest.fixture(scope="module")
def sdxl() -> BlockLayout:
    with torch.device("meta"):
        unet = UNet2DConditionModel(
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            block_out_channels=(320, 640, 1280),
            transformer_layers_per_block=(1, 2, 10),
            cross_attention_dim=2048,
            addition_embed_type="text_time",
            projection_class_embeddings_input_dim=2816,
            addition_time_embed_dim=256,
        )
    return BlockLayout.from_denoiser("sdxl", unet)


@pytest.fixture(scope="module")
def flux() -> BlockLayout:
    with torch.device("meta"):
        transformer = FluxTransformer2DModel()  # FLUX.1 shapes: 19 double, 38 single blocks
    return BlockLayout.from_denoiser("flux", transformer)


@pytest.fixture(scope="module")
def tiny() -> BlockLayout:
    """The tiny-sd preset's UNet shape: attention only in the first level, two levels."""
    names = [
        f"{side}.{b}.{part}.{j}"
        for side, blocks in (("down_blocks", 2), ("up_blocks", 2))
        for b in range(blocks)
        for part, count in (("resnets", 2 if side == "down_blocks" else 3),)
        for j in range(count)
    ]
    names += [
        "conv_in",
        "down_blocks.0.attentions.0",
        "down_blocks.0.attentions.1",
        "down_blocks.0.downsamplers.0",
        "mid_block.attentions.0",
        "up_blocks.0.upsamplers.0",
        *(f"up_blocks.1.attentions.{j}" for j in range(3)),
    ]
    return BlockLayout.from_module_names("sd1", names)


def test_sd1_and_sd2_orders_match_a1111(sd1: BlockLayout) -> None:
    assert list(sd1.short.slots) == A1111_17
    assert list(sd1.full.slots) == A1111_26


def test_sdxl_orders_match_a1111(sdxl: BlockLayout) -> None:
    assert list(sdxl.short.slots) == A1111_12
    assert list(sdxl.full.slots) == A1111_20


def test_flux_orders(flux: BlockLayout) -> None:
    assert list(flux.full.slots) == A1111_FLUX_61
    assert len(flux.short) == 1 + 19 + 38
    weights = flux.vector_weights([0.5] + [1.0] * 19 + [0.0] * 38)
    assert weights["CLIP"] == weights["T5"] == 0.5
    assert weights["S37"] == 0.0
    assert weights["D18"] == 1.0
    assert weights["IN"] == weights["OUT"] == 1.0  # the short form never scales embedders


@pytest.mark.parametrize(
    ("key", "group"),
    [
        ("down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q", "IN01"),
        ("down_blocks.0.resnets.1.conv1", "IN02"),
        ("down_blocks.0.downsamplers.0.conv", "IN03"),
        ("down_blocks.1.attentions.1.proj_in", "IN05"),
        ("down_blocks.2.attentions.0.transformer_blocks.0.attn2.to_k", "IN07"),
        ("down_blocks.3.resnets.1.conv2", "IN11"),
        ("mid_block.attentions.0.transformer_blocks.0.attn2.to_v", "M00"),
        ("up_blocks.0.resnets.2.conv1", "OUT02"),
        ("up_blocks.0.upsamplers.0.conv", "OUT02"),
        ("up_blocks.1.attentions.0.proj_out", "OUT03"),
        ("up_blocks.3.attentions.2.transformer_blocks.0.ff.net.2", "OUT11"),
        ("conv_in", "IN00"),
        ("time_embedding.linear_1", "OTHER"),
        ("conv_out", "OTHER"),
        ("text_encoder.text_model.encoder.layers.0.self_attn.q_proj", "BASE"),
        ("down_blocks.1.attentions.0", "IN04"),  # engine group prefixes work too
    ],
)
def test_sd1_module_groups(sd1: BlockLayout, key: str, group: str) -> None:
    assert sd1.group_of(key) == group


def test_sdxl_and_flux_module_groups(sdxl: BlockLayout, flux: BlockLayout) -> None:
    assert sdxl.group_of("down_blocks.1.attentions.1.transformer_blocks.1.attn1.to_out.0") == "IN05"
    assert sdxl.group_of("up_blocks.1.attentions.2.proj_in") == "OUT05"
    assert sdxl.group_of("add_embedding.linear_1") == "OTHER"
    assert sdxl.group_of("text_encoder_2.text_model.encoder.layers.3.mlp.fc1") == "BASE"
    assert flux.group_of("transformer_blocks.7.attn.to_q") == "D07"
    assert flux.group_of("single_transformer_blocks.12.proj_mlp") == "S12"
    assert flux.group_of("x_embedder") == "IN"
    assert flux.group_of("proj_out") == "OUT"
    assert flux.group_of("text_encoder_2.encoder.block.0.layer.0.SelfAttention.q") == "T5"


def test_tiny_unet_vector_adapts_by_structure(tiny: BlockLayout) -> None:
    assert list(tiny.short.slots) == ["BASE", "IN01", "IN02", "M00", "OUT03", "OUT04", "OUT05"]
    assert len(tiny.full) == 1 + 6 + 1 + 6
    assert preset_vector("INS", tiny) == (1, 1, 0, 0, 0, 0, 0)
    assert preset_vector("OUTS", tiny) == (1, 0, 0, 0, 0, 1, 1)
    assert preset_vector("MIDD", tiny) == (1, 0, 1, 1, 1, 0, 0)


@pytest.mark.parametrize("name", list(A1111_SD1_PRESETS))
def test_sd1_presets_equal_the_extension(sd1: BlockLayout, name: str) -> None:
    assert preset_vector(name, sd1) == _vector(A1111_SD1_PRESETS[name])
    assert preset_vector(name.lower(), sd1) == _vector(A1111_SD1_PRESETS[name])


@pytest.mark.parametrize("name", list(SDXL_PRESETS))
def test_sdxl_presets(sdxl: BlockLayout, name: str) -> None:
    assert preset_vector(name, sdxl) == _vector(SDXL_PRESETS[name])


def test_flux_has_only_none_and_all(flux: BlockLayout) -> None:
    assert set(preset_vector("ALL", flux)) == {1.0}
    with pytest.raises(CompositionError, match="only NONE and ALL"):
        preset_vector("OUTALL", flux)


def test_short_vector_zeroes_unlisted_blocks_like_a1111(sd1: BlockLayout) -> None:
    weights = sd1.vector_weights([0.5] * 17)
    assert weights["IN01"] == weights["OUT11"] == weights["BASE"] == 0.5
    assert weights["IN00"] == weights["IN03"] == weights["OUT00"] == 0.0  # to26: unlisted numbered blocks → 0
    assert weights["OTHER"] == 1.0  # modules outside numbered blocks are never block-weighted
    full = sd1.vector_weights([float(i) for i in range(26)])
    assert full["IN03"] == 4.0
    assert full["M00"] == 13.0
    assert full["OUT11"] == 25.0


def test_wrong_vector_length_names_both_lengths(sd1: BlockLayout) -> None:
    with pytest.raises(CompositionError, match=r"needs 17 values .* or 26 .* got 12"):
        sd1.vector_weights([1.0] * 12)


def test_keyframe_fraction_interpolation_exact() -> None:
    values = parse_keyframes("0@0,1@0.5").values(11)  # positions at t/10: 0 → 0, 0.5 → step 5
    expected = torch.tensor([0, 0.2, 0.4, 0.6, 0.8, 1, 1, 1, 1, 1, 1], dtype=torch.float64)
    assert torch.allclose(values, expected, atol=1e-12)


def test_keyframe_step_numbers_and_constant_outside() -> None:
    values = parse_keyframes("1@2; 0@6").values(9)
    expected = torch.tensor([1, 1, 1, 0.75, 0.5, 0.25, 0, 0, 0], dtype=torch.float64)
    assert torch.allclose(values, expected, atol=1e-12)


def test_keyframe_jump_and_unsorted_input() -> None:
    values = parse_keyframes("1@0.5, 0@0.5, 1@0").values(5)  # 1 until halfway, then a jump to 0
    assert values.tolist() == [1.0, 1.0, 0.0, 0.0, 0.0]
    assert parse_keyframes("0.7").values(3).tolist() == [0.7, 0.7, 0.7]
    assert Keyframes(((2.0, 0.0),)).values(1).tolist() == [2.0]


@pytest.mark.parametrize("bad", ["0@", "a@0.5", "1@-1", "1@0.5,,x", "", "1@0@2"])
def test_bad_keyframes_are_typed(bad: str) -> None:
    with pytest.raises(CompositionError):
        parse_keyframes(bad)


def test_callable_schedule_and_bad_return() -> None:
    assert step_weights(lambda s, n: s / n, 4).tolist() == [0.0, 0.25, 0.5, 0.75]
    with pytest.raises(CompositionError, match="step 0"):
        step_weights(lambda s, n: float("nan"), 2)


def test_parse_spec_forms() -> None:
    assert parse_spec(0.8) == AdapterSchedule(weight=0.8)
    assert parse_spec("0.8") == AdapterSchedule(weight=0.8)
    assert parse_spec("outall").blocks == "OUTALL"
    assert parse_spec("1,0,0.5").blocks == (1.0, 0.0, 0.5)
    assert parse_spec([1, 0]).blocks == (1.0, 0.0)
    assert isinstance(parse_spec("0@0,1@1").steps, Keyframes)
    assert parse_block_vector(" 1, 0.5 ,0") == (1.0, 0.5, 0.0)
    with pytest.raises(CompositionError):
        parse_spec({"weight": 1, "block": "ALL"})
    with pytest.raises(CompositionError):
        parse_spec("FOO")
    with pytest.raises(CompositionError):
        parse_spec(True)


def test_table_is_weight_times_blocks_times_steps(tiny: BlockLayout) -> None:
    specs = {
        "a": 0.8,
        "b": {"weight": 0.5, "blocks": "OUTALL", "steps": "0@0,1@1"},
        "c": lambda step, n: float(step),
    }
    table = build_weight_table(specs, tiny, "sd1", num_steps=3)
    assert table.weights.shape == (3, len(tiny.groups), 3)
    groups = {g: i for i, g in enumerate(table.groups)}
    assert torch.all(table.weights[0] == 0.8)
    b = table.weights[1]
    assert b[groups["OUT04"]].tolist() == [0.0, 0.25, 0.5]
    assert b[groups["IN01"]].tolist() == [0.0, 0.0, 0.0]
    assert b[groups["OTHER"]].tolist() == [0.0, 0.25, 0.5]
    assert table.weights[2, groups["M00"]].tolist() == [0.0, 1.0, 2.0]
    assert torch.equal(table.at(1), table.weights[:, :, 1])
    assert torch.equal(table.at(99), table.weights[:, :, 2])  # extra calls clamp to the last step
    assert not table.is_static
    assert build_weight_table({"a": "OUTS"}, tiny, num_steps=4).is_static


def test_table_rows_follow_adapter_names_and_errors_name_the_adapter(tiny: BlockLayout) -> None:
    table = build_weight_table({"b": 2.0}, tiny, num_steps=2, adapter_names=["a", "b"])
    assert table.adapters == ("a", "b")
    assert torch.all(table.weights[0] == 0)
    assert torch.all(table.weights[1] == 2)
    with pytest.raises(CompositionError, match=r"adapter 'b'.*needs 7 values"):
        build_weight_table({"b": [1.0] * 17}, tiny, num_steps=2)
    with pytest.raises(CompositionError, match="not among"):
        build_weight_table({"z": 1.0}, tiny, adapter_names=["a"])


def test_regroup_to_engine_keys(sd1: BlockLayout) -> None:
    table = build_weight_table({"a": "OUTALL"}, sd1, num_steps=1)
    engine = table.regroup(["down_blocks.0.attentions.0", "up_blocks.3.attentions.1", "text_encoder"], sd1)
    assert engine.weights[0, :, 0].tolist() == [0.0, 1.0, 1.0]
    assert engine.groups == ("down_blocks.0.attentions.0", "up_blocks.3.attentions.1", "text_encoder")


def _attention_lora(unet: torch.nn.Module, seed: int) -> dict[str, LowRank]:
    """Random LoRA on every attention projection inside the UNet's transformer blocks (what per-block scales reach)."""
    g = torch.Generator().manual_seed(seed)
    layers = {}
    for name, module in unet.named_modules():
        if isinstance(module, torch.nn.Linear) and ".attentions." in name and ".attn" in name:
            down = torch.randn(3, module.in_features, generator=g) * 0.3
            layers[name] = LowRank(down=down, up=torch.randn(module.out_features, 3, generator=g) * 0.3)
    return layers


# The same block weights in both representations: our short vector, and diffusers' per-block dict (down/up keyed by
# diffusers block index, one scale per transformer in the block).
BLOCK_CASES = {
    "tiny_sd": (
        [1.0, 0.3, 0.7, 0.5, 0.2, 1.2, 0.4],  # BASE IN01 IN02 M00 OUT03 OUT04 OUT05
        {"down": {"block_0": [0.3, 0.7]}, "mid": 0.5, "up": {"block_1": [0.2, 1.2, 0.4]}},
    ),
    "tiny_sdxl": (
        [1.0, 0.3, 0.7, 0.5, 0.2, 1.2, 0.4],  # BASE IN04 IN05 M00 OUT00 OUT01 OUT02
        {"down": {"block_1": [0.3, 0.7]}, "mid": 0.5, "up": {"block_0": [0.2, 1.2, 0.4]}},
    ),
}


@pytest.mark.slow
@pytest.mark.parametrize("preset", list(BLOCK_CASES))
@pytest.mark.parametrize("fuse", [None, False])
def test_block_weight_merge_equals_diffusers_per_block_scales(
    preset: str, fuse: bool | None, request: pytest.FixtureRequest
) -> None:
    vector, per_block = BLOCK_CASES[preset]
    weight = 0.9
    ours_pipe = make_composable(request.getfixturevalue(preset))
    family = "sdxl" if preset == "tiny_sdxl" else "sd1"
    layers = _attention_lora(ours_pipe.unet, seed=3)
    ours_pipe.add_adapter(Adapter("a", family, layers))
    ours_pipe.set_composition({"a": {"weight": weight, "blocks": vector}}, method="merge", fuse=fuse)
    ours = _denoise(ours_pipe)

    peer = request.getfixturevalue("fresh_pipeline")(preset.replace("_", "-"))
    with torch.no_grad():
        state = {f"unet.{k}.lora_A.weight": v.down.clone() for k, v in layers.items()}
        state |= {f"unet.{k}.lora_B.weight": v.up.clone() for k, v in layers.items()}
        peer.load_lora_weights(state, adapter_name="a")
    scaled = {
        "down": {b: [weight * s for s in v] for b, v in per_block["down"].items()},
        "mid": weight * per_block["mid"],
        "up": {b: [weight * s for s in v] for b, v in per_block["up"].items()},
    }
    peer.set_adapters(["a"], [{"unet": scaled}])
    expected = _denoise(peer)
    assert float((ours - expected).abs().max() / expected.abs().max()) <= 1e-5
    peer.set_adapters(["a"], [weight])
    assert float((_denoise(peer) - expected).abs().max() / expected.abs().max()) > 1e-4  # block weights matter


def _denoise(pipe: Any) -> torch.Tensor:
    with torch.inference_mode():
        out = pipe(
            "a corgi astronaut",
            num_inference_steps=3,
            height=32,
            width=32,
            output_type="latent",
            generator=torch.Generator().manual_seed(0),
        )
    return out.images
