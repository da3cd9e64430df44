"""Floor 4: the public API at this package's root (the mixin, the facade, the service, presets, prompt syntax, image
records, export) and its rooms: :mod:`.cli` (the ``compose`` command), :mod:`.training`, :mod:`.restoration`,
:mod:`.checkpoints` (single-file base models), :mod:`.smoke_presets` (random-weight test pipelines) and
:mod:`.toyworld` (the shipped toy model and its judge).

Public names are imported lazily so that light entry points (``compose --help``, prompt parsing) do not pay
for importing diffusers.
"""

from __future__ import annotations

from fusion.lazy_exports import lazy_exports

__all__, __getattr__ = lazy_exports(
    __name__,
    {
        ".presets": ("load_preset", "preset_family", "KNOWN_MODELS"),
        ".mixin": ("ComposableMixin", "make_composable"),
        ".facade": ("Composer",),
    },
)
