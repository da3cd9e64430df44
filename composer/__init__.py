"""Floor 4: pipelines and presets, the mixin, prompt syntax, training entry points, the CLI and the facade."""
