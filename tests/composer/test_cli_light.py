"""Commands that need no pipeline (`--help`, `index`, `info`, `search` without weight signals) import no torch.

Each runs in a fresh interpreter (the test process has torch loaded already) and reports which heavy modules it
ended up importing; `compose --help` must stay a pure-Python parser build.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

REPO = Path(__file__).resolve().parents[2]
HEAVY = ("torch", "diffusers", "transformers", "open_clip", "faiss", "gradio", "numpy")
CROSS_K = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k"

_RUN = """
import contextlib, io, json, sys
from composer.cli import main
with contextlib.redirect_stdout(io.StringIO()):
    try:
        code = main(json.loads(sys.argv[1]))
    except SystemExit as exit:  # argparse's --help
        code = exit.code
print(json.dumps({"code": code, "heavy": [m for m in json.loads(sys.argv[2]) if m in sys.modules]}))
"""


def _run(argv: list[str]) -> dict:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run(
        [sys.executable, "-c", _RUN, json.dumps(argv), json.dumps(HEAVY)],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
        timeout=120,
        check=True,
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def library(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A one-adapter library, indexed once for the module by a cold scan that imports no torch."""
    root = tmp_path_factory.mktemp("light") / "loras"
    root.mkdir()
    tensors = {
        f"{CROSS_K}.lora_down.weight": torch.randn(4, 768),
        f"{CROSS_K}.lora_up.weight": torch.randn(320, 4),
        f"{CROSS_K}.alpha": torch.tensor(4.0),
    }
    save_file(tensors, str(root / "corgi.safetensors"), metadata={"modelspec.trigger_phrase": "crgstr"})
    cold = _run(["index", str(root)])  # headers only, through safetensors' numpy reader
    assert cold["code"] == 0
    assert not {"torch", "diffusers", "transformers"} & set(cold["heavy"]), cold
    return root


def test_help_imports_nothing_heavy() -> None:
    assert _run(["--help"]) == {"code": 0, "heavy": []}


@pytest.mark.parametrize(
    "argv",
    [
        ["index", "{lib}"],
        ["info", "corgi", "--library", "{lib}"],
        ["search", "a crgstr dog", "--library", "{lib}"],
        ["search", "a dog", "--library", "{lib}", "--json"],
    ],
    ids=["index", "info", "search", "search-json"],
)
def test_catalog_commands_import_no_torch(library: Path, argv: list[str]) -> None:
    assert _run([part.format(lib=library) for part in argv]) == {"code": 0, "heavy": []}


@pytest.mark.parametrize(
    "argv",
    [
        ["a dog", "--loras", "nosuch", "--library", "{lib}"],
        ["a dog <lora:nosuch:0.5>", "--loras", "auto", "--library", "{lib}"],
        ["a dog", "--loras", "corgi,missing.safetensors"],
    ],
    ids=["listed", "prompt-tag", "no-library"],
)
def test_a_name_that_cannot_load_is_refused_before_the_model_stack_loads(library: Path, argv: list[str]) -> None:
    from composer.cli import EXIT_ERROR

    result = _run([part.format(lib=library) for part in argv])
    assert result["code"] == EXIT_ERROR
    assert not {"torch", "diffusers"} & set(result["heavy"]), result
