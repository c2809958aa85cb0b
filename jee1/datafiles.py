"""Reading the project's JSON and TOML inputs (checkpoint and adapter configs, settings, safety
rules): one clear InputError per failure, naming the file and what it is for."""

from __future__ import annotations

import json
import tomllib
from importlib import resources
from pathlib import Path
from typing import Any

from jee1.errors import InputError

# The medical text shipped with jee1: the default text of a KL comparison (jee1-convert's quality
# gate), and what the tiny model's tokenizer is trained on.
MEDICAL_TEXT = resources.files("jee1.convert") / "data" / "medical_corpus.txt"


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


def read_json(path: Path, what: str) -> dict:
    """A JSON object from ``path``, or InputError naming the file, what it is for, and what was wrong."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        raise InputError(f"{path}: missing ({what})") from None
    except OSError as e:
        raise InputError(f"{path}: cannot read ({e.strerror})") from e
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InputError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(data, dict):
        raise InputError(f"{path}: expected a JSON object ({what})")
    return data
