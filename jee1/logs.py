"""Logging for both commands: one format on stderr, -q / -v levels, gguf-py's chatter kept down."""

from __future__ import annotations

import logging
import sys


def configure_logging(verbose: int, quiet: bool) -> None:
    """Both commands' -q / -v; may be called again (``jee1 eval -q`` after ``jee1``'s own options)."""
    level = logging.WARNING if quiet else (logging.DEBUG if verbose else logging.INFO)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    logging.getLogger().setLevel(level)
    # gguf-py narrates every write at INFO
    logging.getLogger("gguf").setLevel(logging.NOTSET if verbose else logging.WARNING)
