"""`compose app`: start the Gradio app (Compose, Library and Analyze tabs) on 127.0.0.1.

The app lives one floor above this package, so the command hands over to ``python -m app`` in a child process
instead of importing it; ``add_app_options`` is the one definition of the options both entry points accept.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

from composer.model_default import default_model

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 7860


def add_app_options(parser: argparse.ArgumentParser) -> None:
    """The options of the app's entry points (`compose app` and `python -m app`)."""
    parser.add_argument("--library", type=Path, default=None, help="LoRA folder to browse and compose from")
    parser.add_argument(
        "--model",
        default=default_model(),
        help="preset name, diffusers folder or hub id (default toy-sd or $LORA_COMPOSER_MODEL)",
    )
    parser.add_argument(
        "--host", default=DEFAULT_HOST, help="address to bind (default 127.0.0.1: reachable from this machine only)"
    )
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help="port (default 7860; 0 picks a free one)")
    parser.add_argument("--out", type=Path, default=Path("out") / "app", help="where generated images are saved")
    parser.add_argument(
        "--workers", type=int, default=1, help="pipelines kept in memory; this many requests generate at once"
    )


def app_argv(args: argparse.Namespace) -> list[str]:
    """The command-line arguments that reproduce ``args`` for ``python -m app``."""
    argv = ["--model", args.model, "--host", args.host, "--port", str(args.port), "--out", str(args.out)]
    argv += ["--workers", str(args.workers)]
    if args.library is not None:
        argv += ["--library", str(args.library)]
    return argv


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `app` subcommand."""
    parser = subparsers.add_parser(
        "app",
        help="start the Gradio app",
        description="Start the LoRA Composer web app. It binds 127.0.0.1 unless --host says otherwise and serves "
        "only files inside the library and the output folder.",
    )
    add_app_options(parser)
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    """Run ``python -m app`` with the same options until it exits; returns its exit code."""
    return subprocess.call([sys.executable, "-m", "app", *app_argv(args)])
