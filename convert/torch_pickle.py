"""A PyTorch ``torch.save`` state dict (``adapter_model.bin``), read without torch and without
running the pickle.

The file is a zip: ``<name>/data.pkl`` (the pickled dict) and one uncompressed record
``<name>/data/<key>`` per storage.  The pickle is read by an unpickler that knows only the few
globals a saved state dict uses, each mapped to our own harmless stand-in; any other global (a
command, an import, anything) stops the read with an error naming it, before anything runs.
Tensors become offsets into the zip's records, memory-mapped like safetensors, so a large adapter
is never read whole (llama.cpp's former ``convert.py`` read them the same way).
"""

from __future__ import annotations

import pickle
import struct
import zipfile
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from jee1.errors import InputError

from .safetensors_io import DTYPES, SafetensorsFile, TensorEntry

# torch storage class -> safetensors dtype name
STORAGE_DTYPES = {"HalfStorage": "F16", "FloatStorage": "F32", "BFloat16Storage": "BF16"}
_LOCAL_HEADER = struct.Struct("<4s22xHH")   # signature ... file name length, extra field length


@dataclass(frozen=True)
class _Storage:
    key: str
    dtype: str
    numel: int


@dataclass(frozen=True)
class _Tensor:
    storage: _Storage
    offset: int
    shape: tuple[int, ...]
    stride: tuple[int, ...]


class _StorageType:
    def __init__(self, name: str):
        self.dtype = STORAGE_DTYPES.get(name)
        self.name = name


def _rebuild_tensor(storage, storage_offset, size, stride, *_ignored):
    return _Tensor(storage, int(storage_offset), tuple(size), tuple(stride))


def _rebuild_parameter(data, *_ignored):
    return data


_ALLOWED = {
    ("collections", "OrderedDict"): OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    **{("torch", name): _StorageType(name) for name in
       ("HalfStorage", "FloatStorage", "BFloat16Storage", "DoubleStorage", "LongStorage", "IntStorage",
        "ShortStorage", "CharStorage", "ByteStorage", "BoolStorage")},
}


class _StateDictUnpickler(pickle.Unpickler):
    def __init__(self, file, path: Path):
        super().__init__(file)
        self.path = path

    def find_class(self, module: str, name: str):
        try:
            return _ALLOWED[(module, name)]
        except KeyError:
            raise InputError(f"{self.path}: the pickle asks for {module}.{name}, which a saved state dict "
                             "never needs; refused before anything ran (re-save the adapter as safetensors)") from None

    def persistent_load(self, pid):
        try:
            kind, storage_type, key, _location, numel = pid
        except (TypeError, ValueError):
            raise InputError(f"{self.path}: unknown persistent id in the pickle") from None
        if kind != "storage" or not isinstance(storage_type, _StorageType):
            raise InputError(f"{self.path}: unknown persistent id {kind!r} in the pickle")
        if storage_type.dtype is None:
            raise InputError(f"{self.path}: tensor storage of type {storage_type.name} is not supported "
                             f"(supported: {', '.join(STORAGE_DTYPES)})")
        return _Storage(str(key), storage_type.dtype, int(numel))


class TorchZipFile(SafetensorsFile):
    """``adapter_model.bin`` with the same interface as a safetensors file (entries, raw, ...)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.metadata: dict = {}
        self._map = None
        try:
            with open(self.path, "rb") as raw, zipfile.ZipFile(raw) as archive:
                self.entries = self._read(raw, archive)
        except OSError as e:
            raise InputError(f"{self.path}: cannot read ({e.strerror or e})") from e
        except zipfile.BadZipFile:
            raise InputError(f"{self.path}: not a PyTorch zip file (torch.save before 1.6 and other "
                             "pickles are not read)") from None

    def _read(self, raw, archive: zipfile.ZipFile) -> dict[str, TensorEntry]:
        pickles = [n for n in archive.namelist() if n.endswith("/data.pkl") and n.count("/") == 1]
        if len(pickles) != 1:
            raise InputError(f"{self.path}: no single <name>/data.pkl in the zip")
        prefix = pickles[0].removesuffix("data.pkl")
        byteorder = prefix + "byteorder"
        if byteorder in archive.namelist() and archive.read(byteorder).strip() != b"little":
            raise InputError(f"{self.path}: big-endian tensors are not supported")
        with archive.open(pickles[0]) as f:
            try:
                state = _StateDictUnpickler(f, self.path).load()
            except InputError:
                raise
            except Exception as e:   # a malformed pickle: any error it raises is bad input
                raise InputError(f"{self.path}: unreadable pickle ({type(e).__name__}: {e})") from None
        if not isinstance(state, dict) or not all(isinstance(v, _Tensor) for v in state.values()):
            raise InputError(f"{self.path}: the pickle is not a state dict of tensors")
        entries = {}
        for name, tensor in state.items():
            entries[str(name)] = self._entry(str(name), tensor, raw, archive, prefix)
        return entries

    def _entry(self, name: str, t: _Tensor, raw, archive: zipfile.ZipFile, prefix: str) -> TensorEntry:
        itemsize = DTYPES[t.storage.dtype].itemsize
        contiguous = tuple(int(np.prod(t.shape[i + 1:], dtype=np.int64)) for i in range(len(t.shape)))
        if any(n > 1 and s != c for n, s, c in zip(t.shape, t.stride, contiguous)):
            raise InputError(f"{self.path}: tensor {name!r} is stored as a strided view; re-save it contiguous")
        try:
            info = archive.getinfo(f"{prefix}data/{t.storage.key}")
        except KeyError:
            raise InputError(f"{self.path}: tensor {name!r} points to a storage record that is missing") from None
        if info.compress_type != zipfile.ZIP_STORED:
            raise InputError(f"{self.path}: storage record {info.filename} is compressed; torch.save never does that")
        raw.seek(info.header_offset)
        signature, name_len, extra_len = _LOCAL_HEADER.unpack(raw.read(_LOCAL_HEADER.size))
        if signature != b"PK\x03\x04":
            raise InputError(f"{self.path}: corrupt zip record {info.filename}")
        data_start = info.header_offset + _LOCAL_HEADER.size + name_len + extra_len
        count = int(np.prod(t.shape, dtype=np.int64))
        begin = data_start + t.offset * itemsize
        end = begin + count * itemsize
        if t.offset < 0 or t.offset + count > t.storage.numel or (t.offset + count) * itemsize > info.file_size:
            raise InputError(f"{self.path}: tensor {name!r} does not fit its storage record (truncated file?)")
        return TensorEntry(name, t.storage.dtype, t.shape, begin, end)
