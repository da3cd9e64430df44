"""How a command hands its parsed options to the call it wraps: options named after the parameters they set are
passed on by name, so a command lists each such option once instead of spelling ``name=args.name`` for each."""

from __future__ import annotations

import argparse
from collections.abc import Iterable
from typing import Any


def option_values(args: argparse.Namespace, names: Iterable[str], *, given_only: bool = False) -> dict[str, Any]:
    """``{name: args.name}`` for each of ``names``: the keyword arguments of a call whose parameters these options
    are named after. With ``given_only`` the options left unset (None) are skipped, so the callee's defaults apply."""
    values = {name: getattr(args, name) for name in names}
    return {name: value for name, value in values.items() if value is not None} if given_only else values
