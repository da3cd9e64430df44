"""The SHiRA mask types by name (docs/methods.md#shira), importable without torch for the CLI's choices."""

MASK_TYPES = ("random", "wm", "grad", "snip", "struct")
"""The SHiRA mask types, in the order of docs/methods.md#shira: random, top-|W|, top-|grad|, SNIP, structured."""
