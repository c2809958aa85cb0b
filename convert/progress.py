"""One progress bar per phase, in bytes with bytes/s (tqdm), silent with ``--quiet``."""

from __future__ import annotations

import contextlib
import sys

from tqdm import tqdm


@contextlib.contextmanager
def phase_bar(desc: str, total: int | None, quiet: bool):
    bar = tqdm(total=total, desc=f"{desc:<14}", unit="B", unit_scale=True, unit_divisor=1024,
               disable=quiet, file=sys.stderr, dynamic_ncols=True, leave=True)
    try:
        yield bar
    finally:
        bar.close()
