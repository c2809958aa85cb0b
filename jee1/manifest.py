"""The manifest written next to every model: hashes, sizes, provenance, tool versions.

``<model>.gguf.manifest.json``; the runtime refuses a model whose size or sha256 differ.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import BinaryIO

MANIFEST_FORMAT = "jee1-manifest/1"
HASH_CHUNK = 8 * 1024 * 1024


def manifest_path(model: str | Path) -> Path:
    model = Path(model)
    return model.with_name(model.name + ".manifest.json")


def sha256_file(path: str | Path | BinaryIO, progress=None) -> str:
    """sha256 of a file (a path, or an open binary file read from its start), in 8 MiB chunks;
    ``progress.update(n)`` per chunk when given."""
    digest = hashlib.sha256()
    with contextlib.nullcontext(path) if hasattr(path, "read") else open(path, "rb") as f:
        f.seek(0)
        while chunk := f.read(HASH_CHUNK):
            digest.update(chunk)
            if progress is not None:
                progress.update(len(chunk))
    return digest.hexdigest()


def file_record(path: str | Path, root: str | Path | None = None, progress=None) -> dict:
    path = Path(path)
    return {
        "path": str(path.relative_to(root)) if root else path.name,
        "size": path.stat().st_size,
        "sha256": sha256_file(path, progress),
    }


def create_file_atomic(path: str | Path, data: bytes, mode: int = 0o600) -> None:
    """Create ``path`` holding ``data``, whole or not at all: a temporary file in the same directory,
    fsync, then a hard link into place.  FileExistsError when ``path`` exists, never overwriting it."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.link(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)


def replace_file_atomic(path: str | Path, data: bytes, mode: int = 0o644) -> None:
    """Write ``data`` to a temporary file in the same directory, fsync, then rename over ``path``:
    readers see the old file or the new one, never half of one."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json_atomic(path: str | Path, data: dict, mode: int = 0o644) -> None:
    """``replace_file_atomic`` for JSON (mode 0644 by default: a manifest is for everyone to read)."""
    replace_file_atomic(path, (json.dumps(data, indent=2, sort_keys=False) + "\n").encode("utf-8"), mode)
