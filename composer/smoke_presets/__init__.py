"""Random-weight smoke-test pipelines: ``tiny-sd``, ``tiny-sdxl``, ``tiny-flux``, ``tiny-flux-kontext``, ``small-sd``
and ``sd15-shapes``, like diffusers' tiny test models but built offline from configs with seeded weights.

They draw noise, not pictures: they exist to check that a composition runs end to end on every supported family
(tests, examples, CPU benchmarks) without a download. :mod:`.components` holds their configs, :mod:`.registry` the
presets and how they are built, :mod:`.cache` the on-disk copies ``load_preset`` reads, and :mod:`.tokenizers` the
offline CLIP and T5 tokenizers they use (the CLIP one, with real CLIP ids, also serves single-file checkpoints and the
toy world). ``composer.presets.load_preset(name)`` loads any of them by name.
"""
