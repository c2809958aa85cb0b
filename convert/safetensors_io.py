"""Safetensors files, memory-mapped: read one tensor at a time without loading the file.

Format (https://github.com/huggingface/safetensors): an 8-byte little-endian header length N,
N bytes of JSON ``{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}``,
then the raw little-endian tensor bytes, offsets relative to the end of the header.
"""

from __future__ import annotations

import json
import mmap
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from jee1.errors import InputError
from jee1.llama_backend import convert_rows

# safetensors dtype name -> (numpy storage dtype, bytes per element).  BF16 is stored as
# uint16 and widened by ``to_float32``; numpy has no bfloat16.
DTYPES: dict[str, np.dtype] = {
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "BF16": np.dtype("<u2"),
}
DTYPE_NAMES = {np.dtype("<f4"): "F32", np.dtype("<f2"): "F16"}

MAX_HEADER_BYTES = 100 * 1024 * 1024


@dataclass(frozen=True)
class TensorEntry:
    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int  # absolute file offset
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


class SafetensorsFile:
    """One ``.safetensors`` file: its header parsed and validated, its data memory-mapped."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        try:
            size = self.path.stat().st_size
            with open(self.path, "rb") as f:
                raw_len = f.read(8)
                if len(raw_len) != 8:
                    raise InputError(f"{self.path}: not a safetensors file (shorter than 8 bytes)")
                (header_len,) = struct.unpack("<Q", raw_len)
                if header_len > MAX_HEADER_BYTES or 8 + header_len > size:
                    raise InputError(f"{self.path}: corrupt safetensors header length {header_len}")
                header = json.loads(f.read(header_len))
        except OSError as e:
            raise InputError(f"{self.path}: cannot read ({e.strerror})") from e
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise InputError(f"{self.path}: corrupt safetensors header ({e})") from e
        if not isinstance(header, dict):
            raise InputError(f"{self.path}: corrupt safetensors header (not a JSON object)")
        self.metadata = header.pop("__metadata__", {}) or {}
        data_start = 8 + header_len
        self.entries: dict[str, TensorEntry] = {}
        for name, info in header.items():
            self.entries[name] = self._entry(name, info, data_start, size)
        self._map: mmap.mmap | None = None

    def _entry(self, name: str, info: dict, data_start: int, size: int) -> TensorEntry:
        try:
            dtype, shape, (begin, end) = info["dtype"], tuple(info["shape"]), info["data_offsets"]
        except (KeyError, TypeError, ValueError) as e:
            raise InputError(f"{self.path}: tensor {name!r} has a malformed header entry") from e
        if dtype not in DTYPES:
            raise InputError(f"{self.path}: tensor {name!r} has unsupported dtype {dtype} "
                             f"(supported: {', '.join(DTYPES)})")
        expected = int(np.prod(shape, dtype=np.int64)) * DTYPES[dtype].itemsize
        if end - begin != expected or begin < 0 or data_start + end > size:
            raise InputError(f"{self.path}: tensor {name!r} data range [{begin}, {end}) does not fit "
                             f"shape {list(shape)} {dtype} in a file of {size} bytes (truncated shard?)")
        return TensorEntry(name, dtype, shape, data_start + begin, data_start + end)

    def raw(self, name: str) -> np.ndarray:
        """A zero-copy view of the tensor in its stored dtype (BF16 as uint16)."""
        entry = self.entries[name]
        if self._map is None:
            with open(self.path, "rb") as f:
                self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        dtype = DTYPES[entry.dtype]
        count = entry.nbytes // dtype.itemsize
        return np.frombuffer(self._map, dtype=dtype, count=count, offset=entry.begin).reshape(entry.shape)

    def rows_into(self, name: str, rows, out: np.ndarray) -> np.ndarray:
        """Widen rows of the tensor (a slice or an index array) into the float32 array ``out``."""
        data = np.ascontiguousarray(self.raw(name)[rows])
        data = data.reshape(out.shape)
        if data.dtype == np.float32:
            np.copyto(out, data)
        else:
            convert_rows(data, out, bf16=self.entries[name].dtype == "BF16")
        return out

    def to_float32(self, name: str) -> np.ndarray:
        """The whole tensor as a new float32 array (for the small LoRA factors)."""
        return self.rows_into(name, slice(None), np.empty(self.entries[name].shape, np.float32))

    def release(self, name: str) -> None:
        """Drop the tensor's pages from this process's resident set; the page cache keeps them.

        Without this, touching every tensor of a mapped 10 GB shard would grow RSS to 10 GB.
        """
        if self._map is None:
            return
        entry = self.entries[name]
        start = entry.begin - entry.begin % mmap.PAGESIZE
        if entry.end > start:
            self._map.madvise(mmap.MADV_DONTNEED, start, entry.end - start)

    def close(self) -> None:
        if self._map is not None:
            try:
                self._map.close()
            except BufferError:  # a caller still holds a view; the mapping goes with it
                pass
            self._map = None


def write_safetensors(path: str | os.PathLike, tensors: dict[str, np.ndarray],
                      metadata: dict[str, str] | None = None) -> None:
    """Write float16/float32 arrays as a safetensors file (used by the tiny-model factory)."""
    header: dict[str, dict] = {}
    offset = 0
    for name, array in tensors.items():
        dtype_name = DTYPE_NAMES[np.dtype(array.dtype).newbyteorder("<")]
        header[name] = {"dtype": dtype_name, "shape": list(array.shape),
                        "data_offsets": [offset, offset + array.nbytes]}
        offset += array.nbytes
    if metadata:
        header["__metadata__"] = metadata
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the format aligns data to 8 bytes with trailing spaces
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for array in tensors.values():
            f.write(np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<")).tobytes())
