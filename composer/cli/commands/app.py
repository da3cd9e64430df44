"""`compose app`: start the Gradio app (Compose, Library and Analyze tabs) on 127.0.0.1.

The app lives one floor above this package, so the command hands over to ``python -m app`` in a child process
instead of importing it; ``add_app_options`` is the one definition of the options both entry points accept, and
``service_options`` what they ask of the app's service.
The child runs in its own session: SIGTERM, SIGINT and SIGHUP sent to `compose app` are forwarded to it once, and
`compose app` exits with the child's status (128 + signal number when a signal ended it). On Linux the child also
gets SIGTERM if `compose app` itself dies without forwarding (``PR_SET_PDEATHSIG``).
"""

from __future__ import annotations

import argparse
import ctypes
import signal
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from types import FrameType
from typing import Any

from composer.cli import arg_types
from composer.cli.commands._model_options import add_model_options, model_argv
from composer.cli.option_values import option_values

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 7860
FORWARDED_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
_PR_SET_PDEATHSIG = 1


def add_app_options(parser: argparse.ArgumentParser) -> None:
    """The options of the app's entry points (`compose app` and `python -m app`)."""
    parser.add_argument("--library", type=Path, default=None, help="LoRA folder to browse and compose from")
    add_model_options(parser)
    parser.add_argument(
        "--models",
        type=Path,
        default=None,
        metavar="DIR",
        help="folder of checkpoint files the app's model picker offers (A1111's models/Stable-diffusion, ComfyUI's "
        "models/checkpoints, or either's parent)",
    )
    parser.add_argument(
        "--host", default=DEFAULT_HOST, help="address to bind (default 127.0.0.1: reachable from this machine only)"
    )
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help="port (default 7860; 0 picks a free one)")
    parser.add_argument(
        "--out", type=arg_types.output_dir, default=Path("out") / "app", help="where generated images are saved"
    )
    parser.add_argument(
        "--workers",
        type=arg_types.positive_int,
        default=1,
        help="pipelines kept in memory; this many requests generate at once",
    )


def app_argv(args: argparse.Namespace) -> list[str]:
    """The command-line arguments that reproduce ``args`` for ``python -m app``."""
    argv = [*model_argv(args), "--host", args.host, "--port", str(args.port), "--out", str(args.out)]
    argv += ["--workers", str(args.workers)]
    if args.library is not None:
        argv += ["--library", str(args.library)]
    if args.models is not None:
        argv += ["--models", str(args.models)]
    return argv


def service_options(args: argparse.Namespace) -> dict[str, Any]:
    """The :class:`composer.service.CompositionService` keyword arguments that the app options in ``args`` set
    (``--models`` is its ``models_dir``)."""
    named = ("model", "library", "out", "workers", "vae", "text_encoders")
    return {**option_values(args, named), "models_dir": args.models}


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
    return run_child([sys.executable, "-m", "app", *app_argv(args)])


def _die_with_parent() -> None:
    """In the child before exec: ask Linux for SIGTERM when the parent dies (a no-op elsewhere)."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)


def run_child(command: Sequence[str]) -> int:
    """Run ``command`` in its own session, forwarding :data:`FORWARDED_SIGNALS` to it, until it exits; returns
    its exit code (128 + N when signal N ended it, as a shell reports it).

    The handlers are installed before the child starts: a signal that arrives meanwhile is delivered once it runs,
    and the child starts with these signals at their defaults even where they were ignored here (a background job).
    """
    child: subprocess.Popen[bytes] | None = None
    pending: list[int] = []

    def forward(signum: int, _frame: FrameType | None) -> None:
        if child is None:
            pending.append(signum)
        elif child.poll() is None:
            child.send_signal(signum)

    previous = {sig: signal.signal(sig, forward) for sig in FORWARDED_SIGNALS}
    try:
        child = subprocess.Popen(list(command), start_new_session=True, preexec_fn=_die_with_parent)
        for signum in pending:
            child.send_signal(signum)
        code = child.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 128 - code if code < 0 else code
