"""One ordinary LoRA file from a static composition, or from one adapter (LoRA-Squeeze for users).

:func:`export_composition` composes the adapters a prompt's ``<lora:…>`` tags (or a list spec) name on the pipeline
exactly as generation would (merge: weights, block vectors, text-encoder weights; weight-relative kinds resolved
against the base weights), takes every adapted layer's exact Σ wᵢ·ΔWᵢ (:meth:`ComposableMixin.merged_updates`),
squeezes it to ordinary factors (:mod:`fusion.squeeze`: exact at full rank, the best rank-R approximation below) and
writes a kohya or diffusers LoRA file (:func:`weights_index.formats.lora_writer.save_lora`).

:func:`squeeze_adapter_file` does the same for one adapter file; it needs no model for LoRA/LoCon, diffusers, PEFT
and SHiRA files and uses the model for LyCORIS files (conv factors stored flat, weight-relative kinds).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fusion.adapters import AdapterKind, Dense, LowRank, Sparse
from fusion.errors import CompositionError
from fusion.squeeze import Squeezed, squeeze_update
from weights_index.formats.lora_writer import save_lora
from weights_index.reader import probe, read_adapter


@dataclass(frozen=True)
class SqueezeReport:
    """What was written: the file, its format and family, per-layer ranks and retained energy, the sources (adapter →
    weight spec) and totals."""

    out: Path
    format: str
    family: str
    layers: dict[str, Squeezed]
    sources: dict[str, str]

    @property
    def retained(self) -> float:
        """Retained energy over all layers, Σ kept σ² / Σ σ² (1.0 at full rank)."""
        total = sum(item.energy for item in self.layers.values())
        kept = sum(item.energy * item.retained for item in self.layers.values())
        return 1.0 if total == 0.0 else kept / total

    @property
    def file_size(self) -> int:
        """Bytes of the written file."""
        return self.out.stat().st_size

    def rows(self) -> list[dict[str, Any]]:
        """One row per layer for tables and JSON."""
        return [
            {"layer": key, "rank_in": s.rank_before, "rank": s.rank_after, "retained": s.retained}
            for key, s in self.layers.items()
        ]


def _squeeze_all(
    updates: Mapping[str, LowRank | Dense | Sparse], rank: int | None, energy: float | None
) -> dict[str, Squeezed]:
    if rank is None and energy is None:
        energy = 1.0
    return {key: squeeze_update(update, rank=rank, energy=energy) for key, update in updates.items()}


def _write(
    squeezed: dict[str, Squeezed], out: Path, family: str, format: str, sources: dict[str, str]
) -> SqueezeReport:
    layers = {key: item.update for key, item in squeezed.items()}
    meta = {"lora_composer_sources": repr(sources)}
    path = save_lora(layers, out, family=family, format=format, metadata=meta)
    return SqueezeReport(out=path, format=format, family=family, layers=squeezed, sources=sources)


def export_composition(
    composer: Any,
    prompt: str,
    out: str | Path,
    *,
    loras: str | None = None,
    format: str = "kohya",
    rank: int | None = None,
    energy: float | None = None,
) -> SqueezeReport:
    """Write the static merge of the adapters ``prompt`` (tags) and ``loras`` name as one LoRA file; see the module.

    ``composer`` is a :class:`composer.facade.Composer` (its pipeline and library resolve the names). Without
    ``rank``/``energy`` every layer keeps its full exact rank.
    """
    _, chosen = composer.choose(prompt, loras)
    if not chosen:
        raise CompositionError("nothing to export: the prompt names no adapter", hint="add <lora:name:weight> tags")
    specs = {item.name: composer.spec(item) for item in chosen}
    with composer.composing(chosen) as pipe:
        pipe.set_composition(specs, method="merge", fuse=False)
        updates = pipe.merged_updates()
    squeezed = _squeeze_all(updates, rank, energy)
    return _write(squeezed, Path(out), composer.family, format, {k: repr(v) for k, v in specs.items()})


def squeeze_adapter_file(
    path: str | Path,
    out: str | Path,
    *,
    composer: Any = None,
    format: str = "kohya",
    rank: int | None = None,
    energy: float | None = None,
) -> SqueezeReport:
    """Re-write one adapter file as an ordinary LoRA at ``rank`` / ``energy`` (see the module). ``composer`` (a
    :class:`composer.facade.Composer`) supplies the model; LyCORIS files need it."""
    path = Path(path)
    if composer is not None:
        name = "squeezed-input"
        composer.pipe.add_adapter_file(path, name=name)
        try:
            composer.pipe.set_composition({name: 1.0}, method="merge", fuse=False)
            updates = composer.pipe.merged_updates()
        finally:
            composer.pipe.clear_composition()
            composer.pipe.remove_adapter(name)
        family = composer.family
    else:
        header = probe(path)
        if header.format.startswith("lycoris"):
            raise CompositionError(
                f"{header.format} files store conv factors flattened and may hold kinds defined by the base weights",
                hint="pass --model (the base model the adapter was made for) so the layers get their true shapes",
            )
        adapter = read_adapter(path)
        updates = {key: _plain(key, kind) for key, kind in adapter.all_layers()}
        family = adapter.family
    squeezed = _squeeze_all(updates, rank, energy)
    return _write(squeezed, Path(out), family, format, {path.name: "1.0"})


def _plain(key: str, kind: AdapterKind) -> LowRank | Dense | Sparse:
    if isinstance(kind, (LowRank, Dense, Sparse)):
        return kind
    raise CompositionError(f"layer {key!r} is defined relative to the base weights", hint="pass --model")
