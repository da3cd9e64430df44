"""Model presets: tiny offline pipelines with seeded random weights, benchmark-sized shapes, and known hub models.

``load_preset("tiny-sd")`` gives a complete StableDiffusionPipeline in well under a second without any network: every
component is built from a config below with weights drawn from a seed derived from the preset name, so the same name
gives bit-identical weights on every run (for a given torch version). A preset is built once and saved under the cache
directory; later loads come from disk. The cache is written to a temp directory and renamed into place, so a killed
build never leaves a half cache, and a fingerprint of the configs decides whether a cached copy is still current.

Any other name is a local diffusers folder, a known alias from ``KNOWN_MODELS`` or a hub id, handed to
``DiffusionPipeline.from_pretrained``; only aliases and hub ids may reach the network.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import diffusers
import torch
import transformers
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    DiffusionPipeline,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    FluxKontextPipeline,
    FluxPipeline,
    FluxTransformer2DModel,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    T5Config,
    T5EncoderModel,
)

from composer.checkpoints.layout import is_checkpoint_path
from composer.tokenizers import CLIP_VOCAB_SIZE, build_clip_tokenizer, build_t5_tokenizer, t5_vocab
from fusion.errors import PresetError
from weights_index.families import pipeline_family

logger = logging.getLogger(__name__)

PRESET_FORMAT_VERSION = 1
"""Bumped when the way presets are built or saved changes; part of every cache fingerprint."""

CACHE_ENV = "LORA_COMPOSER_CACHE"
"""Environment variable naming LoRA Composer's cache root; presets live in ``$LORA_COMPOSER_CACHE/presets/<name>``."""

MARKER_FILE = "preset.json"
"""Written last into a preset's cache folder; names the preset and the fingerprint of the configs it was built from."""

# --- component builders -------------------------------------------------------------------------------------------
# A component spec is (kind, config): kind names a builder below, config is plain JSON so it can be fingerprinted.

_MODEL_BUILDERS: dict[str, Callable[[dict[str, Any]], torch.nn.Module]] = {
    "UNet2DConditionModel": lambda cfg: UNet2DConditionModel(**cfg),
    "FluxTransformer2DModel": lambda cfg: FluxTransformer2DModel(**cfg),
    "AutoencoderKL": lambda cfg: AutoencoderKL(**cfg),
    "CLIPTextModel": lambda cfg: CLIPTextModel(CLIPTextConfig(**cfg)),
    "CLIPTextModelWithProjection": lambda cfg: CLIPTextModelWithProjection(CLIPTextConfig(**cfg)),
    "T5EncoderModel": lambda cfg: T5EncoderModel(T5Config(**cfg)),
}
_OTHER_BUILDERS: dict[str, Callable[[dict[str, Any]], Any]] = {
    "clip-tokenizer": lambda cfg: build_clip_tokenizer(**cfg),
    "t5-tokenizer": lambda cfg: build_t5_tokenizer(**cfg),
    "DDIMScheduler": lambda cfg: DDIMScheduler(**cfg),
    "EulerDiscreteScheduler": lambda cfg: EulerDiscreteScheduler(**cfg),
    "FlowMatchEulerDiscreteScheduler": lambda cfg: FlowMatchEulerDiscreteScheduler(**cfg),
}

_SD_SCHEDULER = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "clip_sample": False,
    "set_alpha_to_one": False,
    "steps_offset": 1,
}
_SDXL_SCHEDULER = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "timestep_spacing": "leading",
    "steps_offset": 1,
}
_FLUX_SCHEDULER = {
    "num_train_timesteps": 1000,
    "shift": 3.0,
    "use_dynamic_shifting": True,
    "base_shift": 0.5,
    "max_shift": 1.15,
    "base_image_seq_len": 256,
    "max_image_seq_len": 4096,
}


def _tiny_vae(latent_channels: int, scaling_factor: float, *, flux: bool = False) -> tuple[str, dict[str, Any]]:
    """A 4-level VAE (8× downsampling like the real ones) with 32 channels per level: cheap at 64²."""
    config: dict[str, Any] = {
        "in_channels": 3,
        "out_channels": 3,
        "down_block_types": ["DownEncoderBlock2D"] * 4,
        "up_block_types": ["UpDecoderBlock2D"] * 4,
        "block_out_channels": [32, 32, 32, 32],
        "layers_per_block": 1,
        "latent_channels": latent_channels,
        "norm_num_groups": 32,
        "sample_size": 64,
        "scaling_factor": scaling_factor,
    }
    if flux:
        config |= {"shift_factor": 0.1159, "use_quant_conv": False, "use_post_quant_conv": False}
    return "AutoencoderKL", config


def _clip_text(
    hidden: int, *, layers: int = 2, heads: int = 4, intermediate: int = 37, act: str = "quick_gelu"
) -> dict:
    """A CLIP text config with real CLIP token ids (vocab 49,408, BOS 49406, EOS 49407) and the given width."""
    return {
        "vocab_size": CLIP_VOCAB_SIZE,
        "hidden_size": hidden,
        "intermediate_size": intermediate,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "max_position_embeddings": 77,
        "hidden_act": act,
        "bos_token_id": 49406,
        "eos_token_id": 49407,
        "pad_token_id": 49407,
    }


def _tiny_sd() -> dict[str, tuple[str, dict[str, Any]]]:
    """Tiny SD 1.x: two UNet levels (attention at the high-resolution level, like SD 1.5), CLIP text width 32."""
    return {
        "unet": (
            "UNet2DConditionModel",
            {
                "sample_size": 8,
                "in_channels": 4,
                "out_channels": 4,
                "block_out_channels": [32, 64],
                "layers_per_block": 2,
                "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
                "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
                "cross_attention_dim": 32,
                "attention_head_dim": [2, 4],
                "norm_num_groups": 32,
            },
        ),
        "vae": _tiny_vae(4, 0.18215),
        "text_encoder": ("CLIPTextModel", _clip_text(32)),
        "tokenizer": ("clip-tokenizer", {}),
        "scheduler": ("DDIMScheduler", _SD_SCHEDULER),
    }


def _small_sd() -> dict[str, tuple[str, dict[str, Any]]]:
    """Benchmark-sized SD 1.x: three UNet levels (64, 128, 256), cross-attention width 768 like SD 1.5."""
    return {
        "unet": (
            "UNet2DConditionModel",
            {
                "sample_size": 16,
                "in_channels": 4,
                "out_channels": 4,
                "block_out_channels": [64, 128, 256],
                "layers_per_block": 2,
                "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
                "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
                "cross_attention_dim": 768,
                "attention_head_dim": 8,
            },
        ),
        "vae": _tiny_vae(4, 0.18215),
        "text_encoder": ("CLIPTextModel", _clip_text(768, heads=12, intermediate=3072)),
        "tokenizer": ("clip-tokenizer", {}),
        "scheduler": ("DDIMScheduler", _SD_SCHEDULER),
    }


def _sd15_shapes() -> dict[str, tuple[str, dict[str, Any]]]:
    """Real SD 1.5 component sizes (860M-parameter UNet, CLIP ViT-L/14 text encoder) with random weights."""
    return {
        "unet": (
            "UNet2DConditionModel",
            {
                "sample_size": 64,
                "block_out_channels": [320, 640, 1280, 1280],
                "layers_per_block": 2,
                "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
                "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
                "cross_attention_dim": 768,
                "attention_head_dim": 8,
            },
        ),
        "vae": (
            "AutoencoderKL",
            {
                "block_out_channels": [128, 256, 512, 512],
                "down_block_types": ["DownEncoderBlock2D"] * 4,
                "up_block_types": ["UpDecoderBlock2D"] * 4,
                "layers_per_block": 2,
                "latent_channels": 4,
                "sample_size": 512,
            },
        ),
        "text_encoder": ("CLIPTextModel", _clip_text(768, layers=12, heads=12, intermediate=3072)),
        "tokenizer": ("clip-tokenizer", {}),
        "scheduler": ("DDIMScheduler", _SD_SCHEDULER),
    }


def _tiny_sdxl() -> dict[str, tuple[str, dict[str, Any]]]:
    """Tiny SDXL: two CLIP encoders (the second with a projection) and text-time addition embeddings."""
    return {
        "unet": (
            "UNet2DConditionModel",
            {
                "sample_size": 8,
                "in_channels": 4,
                "out_channels": 4,
                "block_out_channels": [32, 64],
                "layers_per_block": 2,
                "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"],
                "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"],
                "transformer_layers_per_block": [1, 2],
                "attention_head_dim": [2, 4],
                "use_linear_projection": True,
                "addition_embed_type": "text_time",
                "addition_time_embed_dim": 8,
                "projection_class_embeddings_input_dim": 6 * 8 + 32,
                "cross_attention_dim": 64,
                "norm_num_groups": 32,
            },
        ),
        "vae": _tiny_vae(4, 0.13025),
        "text_encoder": ("CLIPTextModel", _clip_text(32)),
        "text_encoder_2": ("CLIPTextModelWithProjection", _clip_text(32, act="gelu") | {"projection_dim": 32}),
        "tokenizer": ("clip-tokenizer", {}),
        "tokenizer_2": ("clip-tokenizer", {"pad_token": "!"}),
        "scheduler": ("EulerDiscreteScheduler", _SDXL_SCHEDULER),
    }


def _tiny_flux() -> dict[str, tuple[str, dict[str, Any]]]:
    """Tiny FLUX.1: two double-stream and two single-stream blocks, CLIP + T5 encoders, a 16-channel VAE."""
    return {
        "transformer": (
            "FluxTransformer2DModel",
            {
                "patch_size": 1,
                "in_channels": 64,
                "num_layers": 2,
                "num_single_layers": 2,
                "attention_head_dim": 16,
                "num_attention_heads": 2,
                "joint_attention_dim": 32,
                "pooled_projection_dim": 32,
                "guidance_embeds": True,
                "axes_dims_rope": [4, 6, 6],
            },
        ),
        "vae": _tiny_vae(16, 0.3611, flux=True),
        "text_encoder": ("CLIPTextModel", _clip_text(32)),
        "tokenizer": ("clip-tokenizer", {}),
        "text_encoder_2": (
            "T5EncoderModel",
            {
                "vocab_size": len(t5_vocab()),
                "d_model": 32,
                "d_kv": 8,
                "d_ff": 64,
                "num_layers": 2,
                "num_heads": 4,
                "relative_attention_num_buckets": 8,
                "feed_forward_proj": "gated-gelu",
                "is_encoder_decoder": False,
            },
        ),
        "tokenizer_2": ("t5-tokenizer", {}),
        "scheduler": ("FlowMatchEulerDiscreteScheduler", _FLUX_SCHEDULER),
    }


_SD_EXTRAS = {"safety_checker": None, "feature_extractor": None, "requires_safety_checker": False}


def _minor(version: str) -> str:
    """``major.minor`` of a version string: releases that may change default initialisation invalidate caches."""
    return ".".join(version.split("+")[0].split(".")[:2])


@dataclass(frozen=True)
class PresetSpec:
    """One built-in preset: its pipeline class, component configs, family and what it is for.

    ``seed_key`` names the weight stream: presets sharing it (Flux and Flux Kontext) share weights.
    """

    name: str
    family: str
    pipeline_class: type[DiffusionPipeline]
    components: Callable[[], dict[str, tuple[str, dict[str, Any]]]]
    description: str
    seed_key: str
    extras: dict[str, Any]

    @property
    def denoiser_name(self) -> str:
        """The pipeline attribute holding the denoiser: ``unet`` or ``transformer``."""
        return "transformer" if "transformer" in self.components() else "unet"

    def fingerprint(self) -> str:
        """A hash of everything the built weights depend on; a cached copy with another fingerprint is stale."""
        payload = {
            "format": PRESET_FORMAT_VERSION,
            "pipeline": self.pipeline_class.__name__,
            "seed_key": self.seed_key,
            "components": self.components(),
            "versions": [_minor(torch.__version__), _minor(diffusers.__version__), _minor(transformers.__version__)],
        }
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def _spec(name: str, family: str, cls: type, components: Callable, description: str, **kw: Any) -> PresetSpec:
    """Shorthand for a ``PresetSpec`` whose seed stream is its own name unless ``seed_key`` says otherwise."""
    return PresetSpec(name, family, cls, components, description, kw.pop("seed_key", name), kw)


PRESETS: dict[str, PresetSpec] = {
    spec.name: spec
    for spec in (
        _spec("tiny-sd", "sd1", StableDiffusionPipeline, _tiny_sd, "tiny SD 1.x for tests", **_SD_EXTRAS),
        _spec("tiny-sdxl", "sdxl", StableDiffusionXLPipeline, _tiny_sdxl, "tiny SDXL for tests"),
        _spec("tiny-flux", "flux", FluxPipeline, _tiny_flux, "tiny FLUX.1 for tests"),
        _spec(
            "tiny-flux-kontext",
            "flux",
            FluxKontextPipeline,
            _tiny_flux,
            "tiny FLUX.1 Kontext for tests (same weights as tiny-flux)",
            seed_key="tiny-flux",
        ),
        _spec("small-sd", "sd1", StableDiffusionPipeline, _small_sd, "small SD 1.x for CPU benchmarks", **_SD_EXTRAS),
        _spec(
            "sd15-shapes",
            "sd1",
            StableDiffusionPipeline,
            _sd15_shapes,
            "real SD 1.5 shapes, random weights (5 GB; benchmarks only, see build_denoiser)",
            **_SD_EXTRAS,
        ),
    )
}
"""Built-in offline presets by name."""

TOY_PRESET = "toy-sd"
"""The trained toy-world model shipped with the package (composer/toyworld): real images offline, the default."""


class KnownModel(NamedTuple):
    """A real model on the Hugging Face hub that LoRA Composer supports, for users with network access."""

    hub_id: str
    family: str


KNOWN_MODELS: dict[str, KnownModel] = {
    "sd15": KnownModel("stable-diffusion-v1-5/stable-diffusion-v1-5", "sd1"),
    "sdxl": KnownModel("stabilityai/stable-diffusion-xl-base-1.0", "sdxl"),
    "flux-dev": KnownModel("black-forest-labs/FLUX.1-dev", "flux"),
    "flux-schnell": KnownModel("black-forest-labs/FLUX.1-schnell", "flux"),
    "flux-kontext": KnownModel("black-forest-labs/FLUX.1-Kontext-dev", "flux"),
}
"""Aliases for real base models; ``load_preset(alias)`` downloads (or reuses the hub cache) like a hub id."""


# --- building ---------------------------------------------------------------------------------------------------


def _get_spec(name: str) -> PresetSpec:
    """The built-in preset called ``name``, or a PresetError listing the names that exist."""
    if name not in PRESETS:
        raise PresetError(f"unknown preset {name!r}", hint=f"use one of {', '.join(PRESETS)}")
    return PRESETS[name]


def _seed(seed_key: str, component: str) -> int:
    """A stable 63-bit seed for one component of one preset (independent of Python's hash randomisation)."""
    digest = hashlib.sha256(f"lora-composer/{seed_key}/{component}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def _build_component(spec: PresetSpec, component: str, kind: str, config: dict[str, Any]) -> Any:
    """Build one component; models get weights from their own seed, leaving the global RNG untouched."""
    if kind in _OTHER_BUILDERS:
        return _OTHER_BUILDERS[kind](config)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(_seed(spec.seed_key, component))
        model = _MODEL_BUILDERS[kind](config)
    return model.eval()


def build_preset(name: str) -> DiffusionPipeline:
    """Build a built-in preset in memory (no cache) on CPU with seeded weights, bit-identical on every call."""
    spec = _get_spec(name)
    components = {part: _build_component(spec, part, kind, cfg) for part, (kind, cfg) in spec.components().items()}
    return spec.pipeline_class(**components, **spec.extras)


def build_denoiser(name: str) -> torch.nn.Module:
    """Build only the denoiser (UNet or Flux transformer) of a built-in preset, with the same weights as the pipeline.

    This is the cheap way to get real SD 1.5 shapes for benchmarks: ``build_denoiser("sd15-shapes")``.
    """
    spec = _get_spec(name)
    kind, config = spec.components()[spec.denoiser_name]
    return _build_component(spec, spec.denoiser_name, kind, config)


# --- the on-disk cache -------------------------------------------------------------------------------------------


def preset_cache_root(cache_dir: str | Path | None = None) -> Path:
    """Where presets are cached: ``cache_dir``, else ``$LORA_COMPOSER_CACHE/presets``, else the user's cache.

    The user's cache is ``~/.cache/lora-composer/presets``; each preset gets a folder named after it inside.
    """
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    env = os.environ.get(CACHE_ENV)
    base = Path(env).expanduser() if env else Path.home() / ".cache" / "lora-composer"
    return base / "presets"


def _is_current(folder: Path, spec: PresetSpec) -> bool:
    """Whether ``folder`` holds a complete build of ``spec`` with today's fingerprint."""
    try:
        marker = json.loads((folder / MARKER_FILE).read_text())
    except (OSError, ValueError):
        return False
    return marker == {"name": spec.name, "fingerprint": spec.fingerprint()}


def _install(built: Path, target: Path, spec: PresetSpec) -> None:
    """Move a finished build into place; a stale copy is moved aside first, a concurrent fresh one is kept."""
    stale = None
    if target.exists():
        stale = Path(tempfile.mkdtemp(prefix=f".{spec.name}.", suffix=".stale", dir=target.parent))
        os.replace(target, stale / "old")
    try:
        os.replace(built, target)
    except OSError:
        if not _is_current(target, spec):
            raise
    finally:
        if stale is not None:
            shutil.rmtree(stale, ignore_errors=True)


def ensure_preset(name: str, cache_dir: str | Path | None = None) -> Path:
    """Return the cache folder of a built-in preset, building and saving it first if it is missing or stale.

    The build goes to a hidden ``.<name>.*.partial`` folder beside the target and is renamed into place only after
    the marker file is written, so readers never see a half-written cache; leftovers of killed builds are ignored.
    """
    spec = _get_spec(name)
    root = preset_cache_root(cache_dir)
    target = root / name
    if _is_current(target, spec):
        return target
    try:
        root.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(prefix=f".{name}.", suffix=".partial", dir=root))
    except OSError as exc:
        raise PresetError(
            f"cannot write the preset cache: {exc}", path=root, hint=f"set {CACHE_ENV} or cache_dir"
        ) from exc
    logger.info("building the %s preset into %s (first use, or its cached copy is stale)", name, target)
    try:
        build_preset(name).save_pretrained(work, safe_serialization=True)
        (work / MARKER_FILE).write_text(json.dumps({"name": name, "fingerprint": spec.fingerprint()}))
        _install(work, target, spec)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return target


# --- loading -----------------------------------------------------------------------------------------------------

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def _finish(pipe: DiffusionPipeline, device: str | torch.device | None) -> DiffusionPipeline:
    """Move a loaded pipeline to ``device`` when one was asked for."""
    return pipe.to(device) if device is not None else pipe


def _from_pretrained(source: str, *, offline: bool, torch_dtype: torch.dtype | None, what: str, hint: str) -> Any:
    """``DiffusionPipeline.from_pretrained`` with every failure turned into a PresetError that says what to do
    (a local folder missing a listed component is refused before loading)."""
    if Path(source).is_dir():
        _refuse_missing_components(Path(source))
    kwargs: dict[str, Any] = {"local_files_only": offline}
    if torch_dtype is not None:
        kwargs["torch_dtype"] = torch_dtype
    try:
        if not offline:
            return DiffusionPipeline.from_pretrained(source, **kwargs)
        with _quiet_loading():
            return DiffusionPipeline.from_pretrained(source, **kwargs)
    except Exception as exc:
        raise PresetError(f"could not load {what}: {type(exc).__name__}: {exc}", path=source, hint=hint) from exc


def _refuse_missing_components(folder: Path) -> None:
    """Refuse a pipeline folder whose model_index.json lists a component it has no subfolder for.

    diffusers does not fail there for tokenizers: it builds one with an empty vocabulary, and every prompt then reads
    as unknown tokens, so the model draws without its text (the toy world's training command once trained adapters
    that way). Checked before loading, so nothing is built from a half folder.
    """
    index = folder / "model_index.json"
    if not index.is_file():
        return
    listed = json.loads(index.read_text())
    missing = [
        name
        for name, value in listed.items()
        if not name.startswith("_")
        and isinstance(value, list)
        and value[0] is not None
        and not (folder / name).is_dir()
    ]
    if missing:
        folders = ", ".join(f"{name}/" for name in missing)
        raise PresetError(
            f"{folder} lists {', '.join(missing)} in model_index.json but has no {folders} folder; diffusers would fill"
            " a missing tokenizer with an empty vocabulary and read every prompt as unknown tokens",
            path=folder,
            hint=f"restore {folders} from the model it came from (save_pretrained writes every component)",
        )


@contextlib.contextmanager
def _quiet_loading() -> Iterator[None]:
    """Hide diffusers' and transformers' per-component loading bars for local loads (they take well under a second)."""
    diffusers_was_on = diffusers.utils.logging.is_progress_bar_enabled()
    transformers_was_on = transformers.utils.logging.is_progress_bar_enabled()
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()
    try:
        yield
    finally:
        if diffusers_was_on:
            diffusers.utils.logging.enable_progress_bar()
        if transformers_was_on:
            transformers.utils.logging.enable_progress_bar()


def refuse_checkpoint_options(name: str, vae: str | Path | None, text_encoders: str | Path | None) -> None:
    """A PresetError when ``vae`` or ``text_encoders`` is given for a model that is no single-file checkpoint (a
    preset, a diffusers folder, a hub id): they would have nothing to apply to."""
    if is_checkpoint_path(name) or (vae is None and text_encoders is None):
        return
    raise PresetError(
        f"--vae and --text-encoders apply to single-file checkpoints; {name!r} is not one",
        hint="name a .safetensors checkpoint with --model, or leave the options out",
    )


def load_preset(
    name: str,
    *,
    cache_dir: str | Path | None = None,
    torch_dtype: torch.dtype | None = None,
    device: str | torch.device | None = None,
    vae: str | Path | None = None,
    text_encoders: str | Path | None = None,
) -> DiffusionPipeline:
    """Load a pipeline by preset name, known alias, single-file checkpoint, local diffusers folder or hub id.

    Built-in presets (``PRESETS``) are built once into the cache and loaded from disk, offline. A ``.safetensors``
    checkpoint (SD 1.x, SD 2.x, SDXL, FLUX.1) is read offline by :func:`composer.checkpoints.load.load_checkpoint`, with
    ``vae`` overriding its autoencoder and ``text_encoders`` (a folder) supplying the text encoders it lacks. Aliases
    in ``KNOWN_MODELS`` and names shaped like ``owner/model`` go to the hub (or its local cache); a local folder never
    touches the network. Failures raise PresetError with a hint.
    """
    if is_checkpoint_path(name):
        from composer.checkpoints.load import load_checkpoint

        with _quiet_loading():
            pipe = load_checkpoint(name, vae=vae, text_encoders=text_encoders, torch_dtype=torch_dtype)
        return _finish(pipe, device)
    refuse_checkpoint_options(name, vae, text_encoders)
    if name == TOY_PRESET:
        from composer.toyworld.model import load_toy_pipeline

        with _quiet_loading():
            return _finish(load_toy_pipeline(torch_dtype), device)
    if name in PRESETS:
        folder = ensure_preset(name, cache_dir)
        pipe = _from_pretrained(
            str(folder),
            offline=True,
            torch_dtype=torch_dtype,
            what=f"the cached preset {name!r}",
            hint=f"delete {folder} so it is rebuilt",
        )
        return _finish(pipe, device)
    path = Path(name).expanduser()
    if path.is_dir():
        pipe = _from_pretrained(
            str(path),
            offline=True,
            torch_dtype=torch_dtype,
            what="a local pipeline folder",
            hint="point at a diffusers pipeline folder (one with model_index.json), e.g. made by save_pretrained",
        )
        return _finish(pipe, device)
    hub_id = KNOWN_MODELS[name].hub_id if name in KNOWN_MODELS else name
    if not _HUB_ID.match(hub_id):
        known = ", ".join([TOY_PRESET, *PRESETS, *KNOWN_MODELS])
        raise PresetError(
            f"{name!r} is not a preset, a known model, a checkpoint file, an existing folder or a hub id",
            hint=f"use one of {known}, a .safetensors checkpoint, a diffusers folder, or a hub id like owner/model",
        )
    pipe = _from_pretrained(
        hub_id,
        offline=False,
        torch_dtype=torch_dtype,
        what=f"the hub model {hub_id!r}",
        hint="check the id and your network (HF_HUB_OFFLINE must be unset to download), or use a local folder",
    )
    return _finish(pipe, device)


# --- helpers for callers -----------------------------------------------------------------------------------------


def preset_family(pipe: Any) -> str:
    """The base-model family of any loaded pipeline: "sd1", "sd2", "sdxl", "flux" or "unknown".

    The codebase's one pipeline-family rule, :func:`weights_index.families.pipeline_family` (SD 2.x by its
    1024-wide cross-attention).
    """
    return pipeline_family(pipe)


def kontext_call_kwargs(height: int, width: int) -> dict[str, Any]:
    """Call kwargs that make a FluxKontextPipeline run at exactly ``height`` × ``width``.

    Kontext silently rescales the output to ``max_area`` (default 1024²) and snaps the input image to one of its
    preferred resolutions; for a 64² test that means minutes at 1024². Pass these with ``**`` to keep the size:
    ``pipe(prompt="…", image=img, **kontext_call_kwargs(64, 64))`` (Kontext's first positional argument is the
    image, so pass the prompt by keyword). The input image should be ``height`` × ``width`` too.
    """
    return {"height": height, "width": width, "max_area": height * width, "_auto_resize": False}
