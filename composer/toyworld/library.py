"""The toy world's LoRA library: the trained concept adapters written out the way community files come.

Each concept was trained once with PEFT (``composer.toyworld.concepts``) and ships as PEFT's own state dict in
``weights/concepts/``. ``build_toy_library`` writes them in the mix of formats and metadata artists download:
kohya-ss LoRA/LoCon with text-encoder parts (``lora_unet_…`` / ``lora_te_text_model_…``, ``alpha``, ``ss_*``),
diffusers' own ``save_lora_weights`` output, LyCORIS LoHa and LoKr (kohya names), SHiRA, with Civitai
``.civitai.info``, A1111 ``name.json``, ModelSpec headers, files with no metadata at all, and preview images.
The conversion is a renaming of the same tensors (exact), so every file carries the trained weights unchanged.
"""

from __future__ import annotations

import json
import random
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from composer.toyworld.world import CONCEPTS, Concept, render, sample_layout, sample_scene
from fusion.errors import AdapterFormatError

CONCEPT_WEIGHTS = Path(__file__).with_name("weights") / "concepts"
LIBRARY_GATES = Path(__file__).with_name("weights") / "gates.safetensors"
"""Gated-fusion gates trained with ``compose train-gates`` on every concept adapter of this library at once (one
gate per layer serves any subset of them); see ``weights/README.md`` for the command."""
"""Where the trained concept adapters ship (PEFT state dicts, fp16, keys prefixed ``unet.`` / ``text_encoder.``)."""

_PEFT_TO_LYCORIS = {
    "lora_A.weight": "lora_down.weight",
    "lora_B.weight": "lora_up.weight",
}


@dataclass(frozen=True)
class LibraryEntry:
    """How one concept is stored in the library: file format and which metadata sources come with it."""

    concept: str
    title: str
    fmt: str
    metadata: tuple[str, ...]
    tags: tuple[str, ...]


ENTRIES: tuple[LibraryEntry, ...] = (
    LibraryEntry("zorbex", "Zorbex the Star Creature", "kohya", ("kohya", "civitai", "a1111", "preview"), ("star",)),
    LibraryEntry("kiboko", "Kiboko (cross creature)", "diffusers", ("modelspec", "a1111", "preview"), ("cross",)),
    LibraryEntry("lunari", "Lunari Moon Sprite", "kohya", ("kohya", "a1111"), ("moon", "crescent")),
    LibraryEntry("crown", "Golden Crown", "loha", ("kohya", "civitai", "a1111", "preview"), ("crown", "clothing")),
    LibraryEntry("sunglasses", "Cool Sunglasses", "kohya", ("civitai",), ("sunglasses", "clothing")),
    LibraryEntry("pixel_art", "Pixel Art Style", "lokr", ("kohya", "civitai", "a1111", "preview"), ("pixel art",)),
    LibraryEntry("polka_dots", "Polka Dots", "diffusers", ("a1111",), ("polka dots", "style", "pattern")),
    LibraryEntry("sunset", "Sunset Sky", "diffusers", ("modelspec", "a1111", "preview"), ("sunset", "background")),
    LibraryEntry("forest", "Dark Forest", "kohya", (), ()),
    LibraryEntry("flower", "Yellow Flower", "loha", ("civitai", "a1111", "preview"), ("flower", "object")),
    LibraryEntry("mushroom", "Violet Mushroom", "shira", ("civitai",), ("mushroom", "object")),
)
"""The library's files. ``forest`` carries no metadata at all (retrieval must still find it)."""

PREFERRED_WEIGHT = 1.0
"""The weight the library's A1111 cards recommend: the concept adapters were trained to be used at full strength."""

_FOLDERS = {"character": "characters", "clothing": "clothing", "style": "styles", "background": "backgrounds"}


def available_concepts() -> list[str]:
    """Concepts whose trained weights ship with the package."""
    return [entry.concept for entry in ENTRIES if (CONCEPT_WEIGHTS / f"{entry.concept}.safetensors").is_file()]


def _load_trained(name: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = CONCEPT_WEIGHTS / f"{name}.safetensors"
    with safe_open(str(path), "pt") as handle:
        header = handle.metadata()
    return load_file(str(path)), header


def _kohya_module(component: str, path: str) -> str:
    """kohya-ss module name: ``lora_unet_down_blocks_1_…`` / ``lora_te_text_model_encoder_layers_0_…``."""
    if component == "unet":
        return "lora_unet_" + path.replace(".", "_")
    return "lora_te_text_model_" + path.replace(".", "_")


_SUFFIXES = ("lora_A.weight", "lora_B.weight", "hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b",
             "lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")  # fmt: skip


def _module_rank(parts: dict[str, torch.Tensor], default: int) -> int:
    """The rank PEFT trained a module with (its ``alpha`` equals it, so the scale alpha/rank is 1 everywhere)."""
    if "lora_A.weight" in parts:
        return parts["lora_A.weight"].shape[0]
    if "hada_w1_b" in parts:
        return parts["hada_w1_b"].shape[0]
    for key, dim in (("lokr_w2_a", 1), ("lokr_w1_a", 1)):
        if key in parts:
            return parts[key].shape[dim]
    return default


def _to_kohya(tensors: dict[str, torch.Tensor], rank: int) -> dict[str, torch.Tensor]:
    """PEFT LoRA/LoHa/LoKr keys → kohya/LyCORIS keys with each module's ``alpha`` (the tensors are unchanged)."""
    modules: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        suffix = next((s for s in _SUFFIXES if key.endswith("." + s)), None)
        if suffix is None:
            raise AdapterFormatError(f"unexpected key {key!r} in a PEFT concept state dict", hint="retrain it")
        component, path = key[: -len(suffix) - 1].split(".", 1)
        modules.setdefault(_kohya_module(component, path), {})[suffix] = value
    out: dict[str, torch.Tensor] = {}
    for module, parts in modules.items():
        out |= {f"{module}.{_PEFT_TO_LYCORIS.get(k, k)}": v for k, v in parts.items()}
        out[f"{module}.alpha"] = torch.tensor(float(_module_rank(parts, rank)))
    return out


def _to_shira(tensors: dict[str, torch.Tensor], shapes: dict[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
    """PEFT SHiRA (``shira_indices`` rows/cols, ``shira_weight``) → our sparse layout (flat sorted positions)."""
    out: dict[str, torch.Tensor] = {}
    for key, value in tensors.items():
        if not key.endswith(".shira_weight"):
            continue
        module = key[: -len(".shira_weight")]
        rows, cols = tensors[f"{module}.shira_indices"].long()
        shape = shapes[module]
        flat = rows * shape[1] + cols
        order = torch.argsort(flat)
        out[f"{module}.shira_index"] = flat[order].to(torch.int32)
        out[f"{module}.shira_values"] = value[order].contiguous()
        out[f"{module}.shira_shape"] = torch.tensor(shape, dtype=torch.int64)
    return out


def _preview(concept: Concept, seed: int) -> Image.Image:
    """An example image of the concept, drawn by the world's renderer (what a model card's preview shows)."""
    rng = random.Random(seed)
    scene = sample_scene(rng, optional=0.0).with_concepts(concept)
    image = render([scene], sample_layout(1, torch.Generator().manual_seed(seed)))[0]
    return Image.fromarray((image.permute(1, 2, 0) * 255).round().byte().numpy()).resize((128, 128), Image.NEAREST)


def _write_sidecars(entry: LibraryEntry, concept: Concept, path: Path) -> None:
    words = [concept.trigger, *entry.tags]
    if "civitai" in entry.metadata:
        info = {
            "model": {"name": entry.title, "type": "LORA", "tags": list(entry.tags)},
            "name": "v1.0",
            "baseModel": "Other",
            "trainedWords": [concept.trigger],
            "description": f"{entry.title}: {concept.description} for the toy-sd world.",
        }
        path.with_suffix(".civitai.info").write_text(json.dumps(info, indent=2) + "\n")
    if "a1111" in entry.metadata:
        card = {
            "description": concept.description,
            "activation text": concept.trigger,
            "preferred weight": PREFERRED_WEIGHT,
            "notes": f"{entry.title}; tags: {', '.join(words)}",
        }
        path.with_suffix(".json").write_text(json.dumps(card, indent=2) + "\n")
    if "preview" in entry.metadata:
        _preview(concept, len(concept.name)).save(path.with_suffix(".preview.png"))


def _header(entry: LibraryEntry, concept: Concept, fmt_module: str, rank: int) -> dict[str, str]:
    header = {"category": concept.category}
    if "kohya" in entry.metadata:
        tags = {concept.trigger: 40, **{tag: 20 for tag in entry.tags}}
        header |= {
            "ss_output_name": entry.concept,
            "ss_network_module": fmt_module,
            "ss_network_dim": str(rank),
            "ss_network_alpha": str(rank),
            "ss_base_model_version": "toy-sd",
            "ss_tag_frequency": json.dumps({f"10_{concept.trigger}": tags}),
        }
    if "modelspec" in entry.metadata:
        header |= {
            "modelspec.sai_model_spec": "1.0.0",
            "modelspec.architecture": "stable-diffusion-v1/lora",
            "modelspec.title": entry.title,
            "modelspec.trigger_phrase": concept.trigger,
            "modelspec.description": concept.description,
            "modelspec.tags": ", ".join(entry.tags),
        }
    return header


def _module_shapes(pipe: torch.nn.Module | None) -> dict[str, tuple[int, ...]]:
    if pipe is None:
        from diffusers import UNet2DConditionModel

        from composer.toyworld.model import UNET_CONFIG

        unet = UNet2DConditionModel(**UNET_CONFIG)
    else:
        unet = pipe.unet
    return {f"unet.{name}": tuple(m.weight.shape) for name, m in unet.named_modules() if hasattr(m, "weight")}


def build_toy_library(out_dir: Path, *, pipe: torch.nn.Module | None = None) -> list[Path]:
    """Write every shipped concept adapter into ``out_dir/<category>/`` in its library format; returns the files.

    The folder is rebuilt from scratch in a temp folder and swapped in, so a failed build leaves no partial library.
    """
    from diffusers import StableDiffusionPipeline
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    tmp = out_dir.with_name(out_dir.name + ".building")
    shutil.rmtree(tmp, ignore_errors=True)
    shapes: dict[str, tuple[int, ...]] | None = None
    written: list[Path] = []
    for entry in ENTRIES:
        if not (CONCEPT_WEIGHTS / f"{entry.concept}.safetensors").is_file():
            continue
        concept = CONCEPTS[entry.concept]
        tensors, trained_header = _load_trained(entry.concept)
        training = json.loads(trained_header["training"])
        folder = tmp / _FOLDERS.get(concept.category, "objects")
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{entry.concept}.safetensors"
        rank = int(training["rank"])
        if entry.fmt == "diffusers":
            unet = {k[5:]: v for k, v in tensors.items() if k.startswith("unet.")}
            text = {k[13:]: v for k, v in tensors.items() if k.startswith("text_encoder.")} or None
            StableDiffusionPipeline.save_lora_weights(
                folder, unet_lora_layers=unet, text_encoder_lora_layers=text, weight_name=path.name
            )
            header = _header(entry, concept, "", rank)
            if header:
                from safetensors.torch import load_file

                save_file(load_file(str(path)), str(path), metadata={"format": "pt", **header})
        elif entry.fmt == "shira":
            if shapes is None:
                shapes = _module_shapes(pipe)
            sparse = _to_shira(tensors, shapes)
            header = {"shira_format_version": "1", "base_family": "sd1", **_header(entry, concept, "shira", rank)}
            save_file(sparse, str(path), metadata=header)
        else:
            module = {"kohya": "networks.lora", "loha": "lycoris.kohya", "lokr": "lycoris.kohya"}[entry.fmt]
            save_file(_to_kohya(tensors, rank), str(path), metadata=_header(entry, concept, module, rank))
        _write_sidecars(entry, concept, path)
        written.append(out_dir / path.relative_to(tmp))
    if out_dir.exists():
        shutil.rmtree(out_dir)
    tmp.rename(out_dir)
    return written


def main(argv: list[str] | None = None) -> int:
    """``python -m composer.toyworld.library [OUT]``: write the toy library (default examples/toy_library)."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m composer.toyworld.library", description=main.__doc__)
    parser.add_argument("out", type=Path, nargs="?", default=Path("examples/toy_library"))
    args = parser.parse_args(argv)
    for path in build_toy_library(args.out):
        print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
