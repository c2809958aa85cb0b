"""Test helpers that read inputs independently of the converter's own code paths."""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path

import numpy as np


def read_safetensors(path: Path) -> dict[str, np.ndarray]:
    """Whole-file safetensors reader (F16/F32 only), written separately from convert.safetensors_io."""
    raw = Path(path).read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    header.pop("__metadata__", None)
    dtypes = {"F16": np.float16, "F32": np.float32, "BF16": np.uint16}
    out = {}
    for name, info in header.items():
        begin, end = info["data_offsets"]
        data = np.frombuffer(raw[8 + n + begin:8 + n + end], dtype=dtypes[info["dtype"]]).reshape(info["shape"])
        out[name] = (data.astype(np.uint32) << 16).view(np.float32) if info["dtype"] == "BF16" else data
    return out


def write_bf16_safetensors(path: Path, tensors: dict[str, np.ndarray]) -> None:
    """Store float arrays as BF16 (round to nearest even), the way many Llama checkpoints ship."""
    header, blobs, offset = {}, [], 0
    for name, array in tensors.items():
        bits = np.ascontiguousarray(array, dtype=np.float32).view(np.uint32)
        blob = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype("<u2").tobytes()
        header[name] = {"dtype": "BF16", "shape": list(array.shape), "data_offsets": [offset, offset + len(blob)]}
        blobs.append(blob)
        offset += len(blob)
    head = json.dumps(header).encode()
    head += b" " * (-len(head) % 8)
    Path(path).write_bytes(struct.pack("<Q", len(head)) + head + b"".join(blobs))


def read_checkpoint(base: Path) -> tuple[dict, dict[str, np.ndarray]]:
    cfg = json.loads((base / "config.json").read_text())
    weights = {}
    for shard in sorted(base.glob("*.safetensors")):
        weights.update(read_safetensors(shard))
    return cfg, {k: v.astype(np.float64) for k, v in weights.items()}


def peft_merge(weights: dict, adapter_dir: Path) -> dict:
    """PEFT's merge, as its documentation states it: W + alpha/r * B @ A (alpha/sqrt(r) with rsLoRA)."""
    import re

    cfg = json.loads((adapter_dir / "adapter_config.json").read_text())
    tensors = read_safetensors(adapter_dir / "adapter_model.safetensors")
    merged = dict(weights)
    for key, a in tensors.items():
        m = re.fullmatch(r"base_model\.model\.(.+)\.lora_A\.weight", key)
        if not m:
            saved = re.fullmatch(r"base_model\.model\.(.+\.weight)", key)
            if saved and "lora_" not in key:
                merged[saved.group(1)] = a.astype(np.float64)
            continue
        module = m.group(1)
        b = tensors[f"base_model.model.{module}.lora_B.weight"].astype(np.float64)
        r = a.shape[0]
        alpha = cfg["lora_alpha"]
        for pattern, value in (cfg.get("alpha_pattern") or {}).items():
            if re.match(rf"(.*\.)?({pattern})$", module):
                alpha = value
                break
        scale = alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r
        merged[f"{module}.weight"] = weights[f"{module}.weight"] + scale * (b @ a.astype(np.float64))
    return merged


def as_stored(weights: dict, dtype=np.float16) -> dict:
    """Round 2-D tensors to the file's storage type, as the GGUF holds them (norms stay float32)."""
    return {k: (v.astype(dtype).astype(np.float64) if v.ndim == 2 else v.astype(np.float32).astype(np.float64))
            for k, v in weights.items()}


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def llama_logits(path, tokens) -> np.ndarray:
    """llama.cpp's logits at every position of ``tokens`` (float64, [len(tokens), vocab])."""
    from jee1.llama_backend import load_llama

    llama = load_llama(path, n_ctx=256, n_threads=2, logits_all=True, seed=0)
    try:
        llama.eval(tokens)
        return np.array(llama.scores[: len(tokens)], dtype=np.float64)
    finally:
        llama.close()


def stream_and_cancel(request, after_pieces: int) -> tuple[str, int]:
    """Read ``request``'s stream, cancel it after ``after_pieces`` pieces and read on to the end:
    (all the text streamed, tokens generated when cancel() was called)."""
    streamed, at_cancel = [], None
    for i, text in enumerate(request, start=1):
        streamed.append(text)
        if i == after_pieces:
            at_cancel = request._job.generated
            request.cancel()
    return "".join(streamed), at_cancel
