"""Single-file base-model checkpoints (SD 1.x, SD 2.x, SDXL, FLUX.1): reading their layout from the header, sizing
the shipped architecture configs from the file, loading them offline, and listing those in a models folder.

Importing this package or :mod:`composer.checkpoints.layout` and :mod:`composer.checkpoints.files` loads no torch;
:mod:`composer.checkpoints.load` builds the pipeline.
"""
