"""Training (accelerate + PEFT): SHiRA adapters, restoration LoRAs and gated-fusion gates, all through the loop of
:mod:`.loop` on images read by :mod:`.data`."""
