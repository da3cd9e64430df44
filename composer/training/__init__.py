"""Training entry points (accelerate + PEFT): SHiRA adapters now; restoration and gate training reuse :mod:`.data`."""
