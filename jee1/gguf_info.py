"""Read a GGUF's metadata and tensor-type summary (``jee1 inspect``, conversion checks, manifests)."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import gguf
from gguf import GGUFValueType

from jee1.errors import InputError

# Arrays longer than this are summarised (the vocabulary has tens of thousands of entries).
MAX_ARRAY_SHOWN = 8


@dataclass
class TensorInfo:
    name: str
    shape: tuple[int, ...]     # numpy order (rows, cols)
    type: str
    n_elements: int
    n_bytes: int


@dataclass
class GgufSummary:
    path: Path
    metadata: dict
    tensors: list[TensorInfo] = field(default_factory=list)

    @property
    def parameter_count(self) -> int:
        return sum(t.n_elements for t in self.tensors)

    def type_counts(self) -> dict[str, dict[str, int]]:
        counts, sizes = Counter(), Counter()
        for t in self.tensors:
            counts[t.type] += 1
            sizes[t.type] += t.n_bytes
        return {k: {"tensors": counts[k], "bytes": sizes[k]} for k in sorted(counts)}

    def tensor_types(self) -> dict[str, str]:
        return {t.name: t.type for t in self.tensors}

    def as_json(self) -> dict:
        return {
            "file": str(self.path),
            "size": self.path.stat().st_size,
            "metadata": self.metadata,
            "tensor_count": len(self.tensors),
            "parameter_count": self.parameter_count,
            "tensor_types": self.type_counts(),
        }


def _value(field_: gguf.ReaderField, full_arrays: bool):
    types = field_.types
    if not types:
        return None
    if types[0] == GGUFValueType.ARRAY:
        n = len(field_.data)
        if not full_arrays and n > MAX_ARRAY_SHOWN:
            return {"array_of": types[-1].name.lower(), "length": n}
        return [_scalar(field_, idx, types[-1]) for idx in field_.data]
    return _scalar(field_, field_.data[0], types[0])


def _scalar(field_: gguf.ReaderField, idx: int, vtype: GGUFValueType):
    part = field_.parts[idx]
    if vtype == GGUFValueType.STRING:
        return bytes(part).decode("utf-8", errors="replace")
    value = part.tolist()[0] if len(part) == 1 else part.tolist()
    return bool(value) if vtype == GGUFValueType.BOOL else value


def read_gguf(path: str | Path, full_arrays: bool = False) -> GgufSummary:
    path = Path(path)
    try:
        reader = gguf.GGUFReader(path)
    except FileNotFoundError:
        raise InputError(f"{path}: no such file") from None
    except (ValueError, OSError) as e:
        raise InputError(f"{path}: not a readable GGUF file ({e})") from None
    metadata = {name: _value(f, full_arrays) for name, f in reader.fields.items()
                if not name.startswith("GGUF.")}
    tensors = [TensorInfo(t.name, tuple(int(d) for d in reversed(t.shape.tolist())),
                          t.tensor_type.name, int(t.n_elements), int(t.n_bytes))
               for t in reader.tensors]
    return GgufSummary(path, metadata, tensors)
