"""`python -m app`: start the Gradio app and serve until interrupted."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from composer.cli.commands.app import add_app_options, service_options
from composer.service import ComposerError, CompositionService


def main(argv: Sequence[str] | None = None) -> int:
    """Parse the options, build the service and serve; returns the exit code (1 on a ComposerError)."""
    parser = argparse.ArgumentParser(prog="python -m app", description="The LoRA Composer web app.")
    add_app_options(parser)
    args = parser.parse_args(argv)
    from app.server import serve

    try:
        service = CompositionService(**service_options(args))
        serve(service, host=args.host, port=args.port or None)
    except ComposerError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
