"""The SHiRA mask types by name (METHODS.md §7), importable without torch for the CLI's choices."""

MASK_TYPES = ("random", "wm", "grad", "snip", "struct")
"""The SHiRA mask types, in METHODS.md order: random, top-|W|, top-|grad|, SNIP, structured."""
