"""The toy world: a procedural scene generator, the ``toy-sd`` model trained on it, its judge and its LoRA library.

Nothing can be downloaded on the machines LoRA Composer is built on, so this is the real model every offline image,
demo and quality benchmark uses: small enough to train in minutes on a GPU and to sample in seconds on a CPU, with a
judge that reads each generated image exactly. See ``world`` (the scenes), ``model`` (the pipeline), ``train``
(the command that made the shipped weights), ``judge``, ``concepts`` (LoRA training) and ``library`` (the files).
"""
