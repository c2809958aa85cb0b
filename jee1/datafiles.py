"""Reading the project's TOML data files (settings, safety rules) with one clear error per failure."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

from jee1.errors import InputError


def read_toml(path: Path | Any, what: str) -> dict:
    """``path`` parsed, or InputError naming the file, what it is for, and what was wrong."""
    try:
        with path.open("rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise InputError(f"{path}: {what} file does not exist") from None
    except OSError as e:
        raise InputError(f"{path}: cannot read the {what} ({e.strerror})") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise InputError(f"{path}: not valid TOML ({e})") from None
