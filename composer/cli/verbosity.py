"""Diagnostics for the command line: ``-v``/``-q`` set how much the packages' loggers report on stderr.

Every module that reports something has its own ``logging.getLogger(__name__)`` logger, so the five packages form five
logger hierarchies (``fusion``, ``weights_index``, ``retrieval``, ``composer``, ``app``). A library user configures them
as any other ``logging`` loggers; the ``compose`` command configures them here. Imports nothing heavy.
"""

from __future__ import annotations

import logging
import sys
import warnings

PACKAGES = ("fusion", "weights_index", "retrieval", "composer", "app")
"""The top-level loggers the command line configures."""

LEVELS = (logging.ERROR, logging.WARNING, logging.INFO, logging.DEBUG)
"""Levels by verbosity: ``-q`` errors only, default warnings, ``-v`` progress notes, ``-vv`` debug details."""

DEFAULT_VERBOSITY = 1

HANDLER_NAME = "compose-cli"


class CurrentStderrHandler(logging.StreamHandler):
    """A stream handler that writes to whatever ``sys.stderr`` is when a record comes (not the one it was made with),
    so a redirected or replaced stderr still gets the records."""

    @property  # type: ignore[override]
    def stream(self) -> object:
        """The current ``sys.stderr``."""
        return sys.stderr

    @stream.setter
    def stream(self, value: object) -> None:
        """Ignored: the stream is always the current stderr."""


def level_for(verbose: int, quiet: int) -> int:
    """The logging level of ``verbose`` ``-v`` flags and ``quiet`` ``-q`` flags given together."""
    index = min(max(DEFAULT_VERBOSITY + verbose - quiet, 0), len(LEVELS) - 1)
    return LEVELS[index]


def configure_logging(verbose: int = 0, quiet: int = 0) -> int:
    """Send the packages' log records at the chosen level to stderr, one line each (``-q`` also silences
    ``warnings``); returns the level.

    Called once per ``compose`` run; calling it again replaces the handler it installed rather than adding one.
    """
    level = level_for(verbose, quiet)
    handler = CurrentStderrHandler()
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    handler.set_name(HANDLER_NAME)
    for name in PACKAGES:
        logger = logging.getLogger(name)
        for old in [h for h in logger.handlers if h.get_name() == HANDLER_NAME]:
            logger.removeHandler(old)
        logger.addHandler(handler)
        logger.setLevel(level)
    if level > logging.WARNING:
        warnings.simplefilter("ignore")  # -q: no warnings either, from these packages or the ones below them
    return level
