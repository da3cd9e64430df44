"""Load a single-file base-model checkpoint (SD 1.x, SD 2.x, SDXL, FLUX.1 dev/schnell/Kontext) offline.

diffusers' own converters (``convert_ldm_unet_checkpoint``, ``convert_ldm_vae_checkpoint``,
``convert_ldm_clip_checkpoint``, ``convert_open_clip_checkpoint``, ``convert_sd3_t5_checkpoint_to_diffusers``,
``convert_flux_transformer_checkpoint_to_diffusers``) turn the original key layouts into diffusers' names; what
``from_single_file`` would fetch from the hub comes from the package instead: the architecture configs in
``composer/checkpoints/configs`` (sizes read from the file, :mod:`composer.checkpoints.sizes`) and CLIP tokenizers
rebuilt from open_clip's BPE vocabulary. Each component is built without initialising weights and takes the file's
tensors, cast to the compute dtype (fp16, bf16 and fp8-stored files alike), so every weight equals the file's.

A VAE or text encoder baked into the file is used; ``vae=`` (a VAE file in the LDM layout or a diffusers folder)
overrides the baked one, as in A1111; ``text_encoders=`` (a diffusers folder with ``text_encoder/``,
``text_encoder_2/`` and their tokenizers, such as a FLUX.1 repository) fills in text encoders the file lacks.
A part that is missing from both raises a PresetError naming it and the option that supplies it.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import diffusers
import torch
from accelerate import init_empty_weights
from diffusers import (
    AutoencoderKL,
    DiffusionPipeline,
    FluxTransformer2DModel,
    UNet2DConditionModel,
)
from diffusers.loaders import single_file_utils as sfu
from transformers import (
    AutoTokenizer,
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    T5Config,
    T5EncoderModel,
)

from composer.checkpoints import sizes
from composer.checkpoints.layout import UNET_PREFIX, CheckpointLayout, describe_checkpoint, family_config
from composer.checkpoints.pipelines import PIPELINES, assemble_pipeline
from composer.smoke_presets.tokenizers import build_clip_tokenizer
from fusion.errors import PresetError
from weights_index.safetensors_file import load_tensors, read_header

logger = logging.getLogger(__name__)

Tensors = dict[str, torch.Tensor]

_FLUX_WIDTH = 3072
"""The transformer width diffusers' FLUX converter assumes (every FLUX.1 release has it)."""


def _strip(tensors: Mapping[str, Any], prefix: str) -> dict[str, Any]:
    """The entries under ``prefix`` with the prefix removed."""
    return {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}


def _cast(tensors: Tensors, dtype: torch.dtype) -> Tensors:
    """Floating tensors in ``dtype`` (fp8 and fp16 storage included); integer tensors unchanged."""
    return {k: v.to(dtype) if v.is_floating_point() else v for k, v in tensors.items()}


def _assemble(
    build: Callable[[], torch.nn.Module], state: Tensors, dtype: torch.dtype, *, part: str, path: Path
) -> torch.nn.Module:
    """Build a module without initialising its weights and give it ``state`` (cast to ``dtype``).

    Every parameter and persistent buffer must come from ``state``: one still unset means the file lacks it, a typed
    error. Entries the module does not have are ignored (logged at debug level).
    """
    with init_empty_weights():
        module = build()
    state = {k: v for k, v in _cast(state, dtype).items() if not k.endswith("position_ids")}
    result = module.load_state_dict(state, strict=False, assign=True)
    if hasattr(module, "tie_weights"):
        module.tie_weights()
    unset = [name for name, tensor in [*module.named_parameters(), *module.named_buffers()] if tensor.is_meta]
    if unset:
        raise PresetError(
            f"the {part} in {path.name} is incomplete: {len(unset)} weights are missing, e.g. {unset[:3]}",
            path=path,
            hint="the file may be truncated or from another architecture",
        )
    if result.unexpected_keys:
        logger.debug("%s: ignored %d entries the %s does not have", path.name, len(result.unexpected_keys), part)
    return module.eval()


def _from_pretrained(cls: Any, folder: Path, dtype: torch.dtype | None, what: str) -> Any:
    """``cls.from_pretrained(folder)`` offline (in ``dtype`` for models), failures as a PresetError naming ``what``."""
    kwargs = {} if dtype is None else {"dtype": dtype}
    try:
        return cls.from_pretrained(str(folder), local_files_only=True, **kwargs)
    except Exception as exc:
        raise PresetError(f"could not load {what} from {folder}: {type(exc).__name__}: {exc}", path=folder) from exc


# --- components ---------------------------------------------------------------------------------------------------


def _unet(layout: CheckpointLayout, config: dict[str, Any], pooled: int | None, dtype: torch.dtype) -> Any:
    """The UNet from the file's ``model.diffusion_model.`` tensors through diffusers' LDM converter."""
    raw = load_tensors(layout.path, layout.keys_under(UNET_PREFIX), header=layout.header)
    shapes = {k: tuple(v.shape) for k, v in _strip(raw, UNET_PREFIX).items()}
    unet_cfg = sizes.unet_config(config["unet"], shapes, layout.family, pooled)
    state = sfu.convert_ldm_unet_checkpoint(raw, unet_cfg)
    return _assemble(lambda: UNet2DConditionModel(**unet_cfg), state, dtype, part="UNet", path=layout.path)


def _flux_wide_single_blocks(raw: Tensors) -> tuple[Tensors, int]:
    """Lay a narrower FLUX transformer's fused single-block projections out at FLUX.1's width, where diffusers'
    converter splits them; returns the tensors and the true width (cut back by :func:`_flux_narrow`)."""
    width = raw["img_in.weight"].shape[0]
    if width == _FLUX_WIDTH:
        return raw, width
    slots = (0, _FLUX_WIDTH, 2 * _FLUX_WIDTH, 3 * _FLUX_WIDTH)
    parts = (width, width, width, 4 * width)
    out = dict(raw)
    for key, value in raw.items():
        if key.startswith("single_blocks.") and key.endswith(("linear1.weight", "linear1.bias")):
            wide = value.new_zeros((7 * _FLUX_WIDTH, *value.shape[1:]))
            for slot, piece in zip(slots, value.split(parts, dim=0)):
                wide[slot : slot + piece.shape[0]] = piece
            out[key] = wide
    return out, width


def _flux_narrow(state: Tensors, width: int) -> Tensors:
    """Undo :func:`_flux_wide_single_blocks` on the converted single-block q/k/v/mlp projections."""
    if width == _FLUX_WIDTH:
        return state
    keep = {"attn.to_q": width, "attn.to_k": width, "attn.to_v": width, "proj_mlp": 4 * width}
    out = {}
    for key, value in state.items():
        name = key.rsplit(".", 1)[0].split(".", 2)[-1] if key.startswith("single_transformer_blocks.") else ""
        out[key] = value[: keep[name]].clone() if name in keep else value
    return out


def _transformer(layout: CheckpointLayout, config: dict[str, Any], dtype: torch.dtype) -> Any:
    """The FLUX transformer from the file's BFL/ComfyUI tensors through diffusers' FLUX converter."""
    raw = _strip(load_tensors(layout.path, layout.denoiser_keys(), header=layout.header), layout.denoiser_prefix)
    flux_cfg = sizes.flux_config(config["transformer"], {k: tuple(v.shape) for k, v in raw.items()})
    wide, width = _flux_wide_single_blocks(raw)
    state = _flux_narrow(sfu.convert_flux_transformer_checkpoint_to_diffusers(wide), width)
    return _assemble(
        lambda: FluxTransformer2DModel(**flux_cfg), state, dtype, part="FLUX transformer", path=layout.path
    )


def _vae_from_tensors(raw: Tensors, base: dict[str, Any], dtype: torch.dtype, path: Path) -> Any:
    """An autoencoder from LDM-layout tensors (``encoder.down.…``, any ``first_stage_model.``/``vae.`` prefix)."""
    prefix = next((p for p in sfu.LDM_VAE_KEYS if any(k.startswith(p) for k in raw)), "")
    vae_cfg = sizes.vae_config(base, {k: tuple(v.shape) for k, v in _strip(raw, prefix).items()})
    state = sfu.convert_ldm_vae_checkpoint(raw, vae_cfg)
    return _assemble(lambda: AutoencoderKL(**vae_cfg), state, dtype, part="autoencoder", path=path)


def load_vae(source: str | Path, base: dict[str, Any], dtype: torch.dtype) -> Any:
    """``--vae``: a VAE file in the LDM layout (A1111's ``vae-ft-mse-…``, FLUX's ``ae.safetensors``) or a diffusers
    autoencoder folder (with ``config.json``)."""
    path = Path(source).expanduser()
    if path.is_dir():
        return _from_pretrained(AutoencoderKL, path, dtype, "the autoencoder")
    header = read_header(path)
    if not any(".down." in k for k in header.tensors) and any(".down_blocks." in k for k in header.tensors):
        raise PresetError(
            f"{path.name} is an autoencoder in diffusers' layout, which carries no config in the file",
            path=path,
            hint="pass the folder that holds it with its config.json, or the VAE's original single file",
        )
    return _vae_from_tensors(load_tensors(path, header=header), base, dtype, path)


def _baked_vae(layout: CheckpointLayout, base: dict[str, Any], dtype: torch.dtype) -> Any:
    """The autoencoder baked into the checkpoint."""
    assert layout.vae_prefix is not None
    raw = load_tensors(layout.path, layout.keys_under(layout.vae_prefix), header=layout.header)
    return _vae_from_tensors(raw, base, dtype, layout.path)


def _clip_state(raw: Tensors, prefix: str, with_wrapper: bool) -> Tensors:
    """transformers-layout CLIP tensors under ``prefix`` through diffusers' converter, fitted to the model class
    (``CLIPTextModel`` has no ``text_model.`` wrapper since transformers 5.6)."""
    state = sfu.convert_ldm_clip_checkpoint(_strip_keep(raw, prefix), remove_prefix=prefix)
    return state if with_wrapper else {k.removeprefix("text_model."): v for k, v in state.items()}


def _strip_keep(raw: Tensors, prefix: str) -> Tensors:
    """The entries under ``prefix``, names unchanged (the converters strip prefixes themselves)."""
    return {k: v for k, v in raw.items() if k.startswith(prefix)}


def _baked_text(layout: CheckpointLayout, part: str, base: dict[str, Any], dtype: torch.dtype) -> Any:
    """A text encoder baked into the checkpoint: CLIP-L, OpenCLIP (SD 2.x, SDXL's second) or T5-XXL (FLUX)."""
    prefix = layout.text_prefixes[part]
    raw = load_tensors(layout.path, layout.keys_under(prefix), header=layout.header)
    shapes = {k: tuple(v.shape) for k, v in _strip(raw, prefix).items()}
    family = layout.family
    what = f"{part} ({family})"
    if family == "flux" and part == "text_encoder_2":
        cfg = sizes.t5_config(base, shapes)
        state = sfu.convert_sd3_t5_checkpoint_to_diffusers(raw)
        return _assemble(lambda: T5EncoderModel(T5Config(**cfg)), state, dtype, part=what, path=layout.path)
    if prefix.endswith(".model."):  # OpenCLIP: SD 2.x's only encoder, SDXL's second
        sd2 = family == "sd2"
        cfg = sizes.open_clip_config(base, shapes, drop_last=sd2)
        if sd2:  # SD 2.x reads the penultimate layer: its last block is not part of the text encoder
            last = cfg["num_hidden_layers"]
            raw = {k: v for k, v in raw.items() if not k.startswith(f"{prefix}transformer.resblocks.{last}.")}
        cls = CLIPTextModel if sd2 else CLIPTextModelWithProjection
        with init_empty_weights():
            shell = cls(CLIPTextConfig(**cfg))
        state = sfu.convert_open_clip_checkpoint(shell, raw, prefix=prefix)
        if sd2:
            state = {k.removeprefix("text_model."): v for k, v in state.items() if k != "text_projection.weight"}
        return _assemble(lambda: cls(CLIPTextConfig(**cfg)), state, dtype, part=what, path=layout.path)
    cfg = sizes.clip_config(base, shapes)
    cls = CLIPTextModelWithProjection if "text_projection.weight" in shapes else CLIPTextModel
    state = _clip_state(raw, prefix, with_wrapper=cls is CLIPTextModelWithProjection)
    return _assemble(lambda: cls(CLIPTextConfig(**cfg)), state, dtype, part=what, path=layout.path)


def _folder_text(folder: Path, part: str, dtype: torch.dtype) -> Any:
    """A text encoder from a diffusers folder's ``text_encoder/`` or ``text_encoder_2/``."""
    config_file = folder / part / "config.json"
    try:
        config = json.loads(config_file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise PresetError(
            f"{config_file} is not a readable config.json: {exc}",
            path=config_file,
            hint=f"restore {part}/config.json in the --text-encoders folder",
        ) from exc
    if not isinstance(config, dict):
        raise PresetError(f"{config_file} holds no config object", path=config_file)
    classes = {"CLIPTextModel": CLIPTextModel, "CLIPTextModelWithProjection": CLIPTextModelWithProjection}
    name = (config.get("architectures") or ["CLIPTextModel"])[0]
    cls = T5EncoderModel if config.get("model_type") == "t5" else classes.get(name, CLIPTextModel)
    return _from_pretrained(cls, folder / part, dtype, f"{part}/")


_TEXT_NAMES = {
    ("flux", "text_encoder"): "CLIP-L text encoder",
    ("flux", "text_encoder_2"): "T5-XXL text encoder",
    ("sdxl", "text_encoder"): "CLIP-L text encoder",
    ("sdxl", "text_encoder_2"): "OpenCLIP-bigG text encoder",
    ("sd1", "text_encoder"): "CLIP-L text encoder",
    ("sd2", "text_encoder"): "OpenCLIP-H text encoder",
}


def _missing_parts(layout: CheckpointLayout, vae: Path | None, text_dir: Path | None) -> list[str]:
    """What the pipeline needs that neither the file nor the named VAE / text-encoder folder provides."""
    missing = []
    for part in family_config(layout.family):
        if not part.startswith("text_encoder") or part in layout.text_prefixes:
            continue
        if text_dir is None or not (text_dir / part / "config.json").is_file():
            missing.append(f"{_TEXT_NAMES[(layout.family, part)]} ({part}/)")
    if layout.family == "flux" and (text_dir is None or not (text_dir / "tokenizer_2").is_dir()):
        missing.append("T5 tokenizer (tokenizer_2/)")
    folder_vae = text_dir is not None and (text_dir / "vae" / "config.json").is_file()
    if vae is None and layout.vae_prefix is None and not folder_vae:
        missing.append("autoencoder")
    return missing


def _denoiser_latent_channels(layout: CheckpointLayout) -> int | None:
    """How many latent channels the file's denoiser reads (FLUX packs 2×2 latent patches into ``img_in``)."""
    if layout.family == "flux":
        shape = layout.shapes.get(f"{layout.denoiser_prefix}img_in.weight")
        return None if shape is None or len(shape) != 2 else shape[1] // 4
    shape = layout.shapes.get(f"{UNET_PREFIX}input_blocks.0.0.weight")
    return None if shape is None or len(shape) < 2 else shape[1]


def _vae_file_latent_channels(path: Path) -> int | None:
    """The latent channels of an LDM-layout VAE file, from its header (None when the header does not say)."""
    for name, info in read_header(path).tensors.items():
        if name.endswith("decoder.conv_in.weight") and len(info.shape) >= 2:
            return info.shape[1]
    return None


def _refuse_other_latents(layout: CheckpointLayout, latents: int | None, source: str) -> None:
    """A PresetError when the autoencoder from ``source`` has other latent channels than the denoiser reads."""
    wanted = _denoiser_latent_channels(layout)
    if latents is None or wanted is None or latents == wanted:
        return
    raise PresetError(
        f"the autoencoder from {source} has {latents} latent channels, but the denoiser in {layout.path.name} reads"
        f" {wanted}: it belongs to another model family",
        path=layout.path,
        hint=f"pass a {layout.family.upper()} VAE with --vae, or leave --vae out to use the checkpoint's own",
    )


def _refuse_missing(layout: CheckpointLayout, vae: Path | None, text_dir: Path | None) -> None:
    """A PresetError naming every missing part and the option that supplies it, before anything is loaded; also a
    ``--vae`` that does not exist or whose latent channels differ from the denoiser's."""
    if vae is not None and not vae.exists():
        raise PresetError(f"no VAE file or folder at {vae}", path=vae, hint="check the path given to --vae")
    if vae is not None and vae.is_file():
        _refuse_other_latents(layout, _vae_file_latent_channels(vae), vae.name)
    missing = _missing_parts(layout, vae, text_dir)
    if not missing:
        return
    holds = "only the FLUX transformer" if layout.family == "flux" else f"an {layout.family.upper()} model"
    listed = missing[0] if len(missing) == 1 else ", ".join(missing[:-1]) + " and " + missing[-1]
    options = []
    if any("text" in m or "tokenizer" in m for m in missing):
        options.append("--text-encoders DIR (a diffusers folder with text_encoder/, text_encoder_2/, tokenizer_2/)")
    if "autoencoder" in missing:
        options.append("--vae FILE (e.g. ae.safetensors) or a vae/ folder inside --text-encoders")
    where = f" in {text_dir}" if text_dir is not None else ""
    raise PresetError(
        f"{layout.path.name} holds {holds}: its {listed} are missing, and nothing{where} provides them",
        path=layout.path,
        hint="name them with " + " and ".join(options),
    )


def _tokenizers(layout: CheckpointLayout, config: dict[str, Any], text_dir: Path | None) -> dict[str, Any]:
    """CLIP tokenizers built offline, or the text-encoder folder's own for an encoder loaded from that folder; FLUX's
    T5 tokenizer from the folder."""
    out: dict[str, Any] = {}
    for part, encoder in (("tokenizer", "text_encoder"), ("tokenizer_2", "text_encoder_2")):
        t5 = layout.family == "flux" and part == "tokenizer_2"  # never rebuilt: always the folder's
        if part not in config and not t5:
            continue
        from_folder = t5 or encoder not in layout.text_prefixes  # the folder's tokenizer goes with its encoder
        if from_folder and text_dir is not None and (text_dir / part).is_dir():
            out[part] = _from_pretrained(AutoTokenizer, text_dir / part, None, f"{part}/")
        elif part in config:
            out[part] = build_clip_tokenizer(**config[part])
    return out


def _scheduler(layout: CheckpointLayout, config: dict[str, Any]) -> Any:
    """The family's scheduler from its shipped config (FLUX schnell: its own, un-shifted one)."""
    spec = dict(config["scheduler_schnell" if layout.variant == "schnell" else "scheduler"])
    cls = getattr(diffusers, spec.pop("_class_name"))
    if "prediction_type" in spec:
        spec["prediction_type"] = layout.prediction_type
    return cls.from_config(spec)


def load_checkpoint(
    path: str | Path,
    *,
    vae: str | Path | None = None,
    text_encoders: str | Path | None = None,
    torch_dtype: torch.dtype | None = None,
) -> DiffusionPipeline:
    """A diffusers pipeline from a single-file checkpoint, offline (see the module docstring).

    ``torch_dtype`` is the compute dtype every weight is cast to (default float32); pickled files are refused with
    the command that converts them, and a missing part is named before anything is loaded.
    """
    layout = describe_checkpoint(path)
    vae_path = None if vae is None else Path(vae).expanduser()
    text_dir = None if text_encoders is None else Path(text_encoders).expanduser()
    if text_dir is not None and not text_dir.is_dir():
        raise PresetError(f"--text-encoders must be a folder; {text_dir} is not one", path=text_dir)
    _refuse_missing(layout, vae_path, text_dir)
    dtype = torch_dtype or torch.float32
    config = family_config(layout.family)
    logger.info("loading %s as %s (%s)", layout.path.name, layout.family, layout.reason)
    parts: dict[str, Any] = {}
    for part in config:
        if not part.startswith("text_encoder"):
            continue
        if part in layout.text_prefixes:
            parts[part] = _baked_text(layout, part, config[part], dtype)
        else:
            assert text_dir is not None
            parts[part] = _folder_text(text_dir, part, dtype)
    if layout.family == "flux":
        parts["transformer"] = _transformer(layout, config, dtype)
    else:
        pooled = getattr(getattr(parts.get("text_encoder_2"), "config", None), "projection_dim", None)
        parts["unet"] = _unet(layout, config, pooled, dtype)
    if vae_path is not None:
        parts["vae"] = load_vae(vae_path, config["vae"], dtype)
    elif layout.vae_prefix is not None:
        parts["vae"] = _baked_vae(layout, config["vae"], dtype)
    else:
        assert text_dir is not None
        parts["vae"] = _from_pretrained(AutoencoderKL, text_dir / "vae", dtype, "vae/")
    if vae_path is not None:
        source = vae_path.name
    elif layout.vae_prefix is not None:
        source = layout.path.name
    else:
        source = f"{text_dir}/vae"
    _refuse_other_latents(layout, getattr(parts["vae"].config, "latent_channels", None), source)
    parts.update(_tokenizers(layout, config, text_dir))
    parts["scheduler"] = _scheduler(layout, config)
    return assemble_pipeline(PIPELINES[(layout.family, layout.variant)], parts)
