"""Per-step re-weighting cost: our precomputed weight table vs diffusers ``set_adapters``, with 1…20 adapters loaded.

``python -m benchmarks.reweight_step [--quick]`` builds the ``small-sd`` preset (``tiny-sd`` with ``--quick``), gives
it k rank-16 LoRAs on every attention projection, and times what a scheduled composition (keyframes, block weights)
must do at every step to change adapter weights:

- ``ours``: one lookup in the generation's weight table (``weight[adapter, group, step]``), installed with
  ``FusionEngine.set_weights``, plus the lazy gate refresh every composed layer does on its next forward;
- ``ours_install``: the lookup and install alone (what the step itself pays; the refresh rides on the forward);
- ``peer``: diffusers ``pipe.set_adapters(names, weights)`` with the same per-step weights (PEFT walks every
  LoRA module to set each adapter's scale).

Prints one JSON document with per-k milliseconds per step and the ratio peer/ours. Target: ours ≤ 0.5 ms per step
and flat in k; the peer grows with the adapters loaded.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from collections.abc import Callable
from typing import Any

import torch

from benchmarks._common import peft_state_dict, random_lora
from composer.mixin import make_composable
from composer.presets import load_preset
from fusion.adapters import Adapter

RANK = 16


def _per_step_ms(work: Callable[[int], None], steps: int, repeats: int) -> float:
    """Median over ``repeats`` of the mean time per call of ``work(step)`` over ``steps`` steps, in ms."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for step in range(steps):
            work(step)
        times.append((time.perf_counter() - start) / steps)
    times.sort()
    return 1000.0 * times[len(times) // 2]


def run(quick: bool) -> dict[str, Any]:
    """Time both paths for each k and return the JSON document."""
    preset = "tiny-sd" if quick else "small-sd"
    ks = (1, 5) if quick else (1, 5, 10, 20)
    steps, repeats = (10, 3) if quick else (30, 5)
    ours_pipe = make_composable(load_preset(preset))
    peer = load_preset(preset)
    loras = [random_lora(ours_pipe.unet, seed, RANK) for seed in range(max(ks))]
    loaded = 0
    results = []
    for k in ks:
        names = [f"a{i}" for i in range(k)]
        with torch.no_grad():
            while loaded < k:
                ours_pipe.add_adapter(Adapter(names[loaded], "sd1", loras[loaded]))
                peer.load_lora_weights(peft_state_dict(loras[loaded]), adapter_name=names[loaded])
                loaded += 1
        # a schedule that changes every step for every adapter: the worst case for re-weighting
        specs = {name: f"{0.2 + 0.1 * (i % 5)}@0,1@1" for i, name in enumerate(names)}
        ours_pipe.set_composition(specs, method="merge", fuse=False)
        engine = ours_pipe.composition_engine
        table = engine.weight_table(specs, steps)
        layers = list(engine.layers.values())

        def install(step: int, table: torch.Tensor = table, engine: Any = engine) -> None:
            engine.set_weights(table[:, :, step])

        def install_and_refresh(step: int, layers: list = layers) -> None:
            install(step)
            for layer in layers:
                layer.effective_weight()

        per_step = [[float(table[a, 0, s]) for a in range(k)] for s in range(steps)]

        def peer_step(step: int, names: list[str] = names, per_step: list = per_step) -> None:
            peer.set_adapters(names, per_step[step])

        peer_step(0)
        ours_ms = _per_step_ms(install_and_refresh, steps, repeats)
        install_ms = _per_step_ms(install, steps, repeats)
        peer_ms = _per_step_ms(peer_step, steps, max(1, repeats // 2))
        results.append(
            {
                "k": k,
                "ours_ms": round(ours_ms, 4),
                "ours_install_ms": round(install_ms, 4),
                "peer_set_adapters_ms": round(peer_ms, 3),
                "ratio_peer_over_ours": round(peer_ms / ours_ms, 1),
                "composed_layers": len(layers),
            }
        )
    return {
        "benchmark": "reweight_step",
        "preset": preset,
        "rank": RANK,
        "steps_timed": steps,
        "device": "cpu",
        "torch_threads": torch.get_num_threads(),
        "machine": platform.processor() or platform.machine(),
        "results": results,
        "target": "ours <= 0.5 ms per step and flat in k",
    }


def main(argv: list[str] | None = None) -> int:
    """Parse ``--quick`` and print one JSON document."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny preset, k in (1, 5): a few seconds")
    args = parser.parse_args(argv)
    json.dump(run(args.quick), sys.stdout, indent=2)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
