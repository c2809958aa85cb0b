"""Stream base + adapter into a GGUF, one tensor (and within it one block of rows) at a time.

Per tensor: read a block of rows from the memory-mapped shard (in llama.cpp's rotary row order
for Q/K), widen to float32, add scale * B[rows] @ A, check for NaN/Inf, cast into the output
array, write it, and drop the shard's pages.  Peak memory is a few output tensors (two workers,
a small buffer pool) plus one block per worker, whatever the model size.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np
from gguf import GGMLQuantizationType as GGML
from threadpoolctl import threadpool_limits

from jee1 import __version__
from jee1.errors import InputError
from jee1.llama_backend import convert_rows

from .adapter import Adapter
from .bnb4 import QloraBase, TensorRoundTrip
from .checkpoint import ROPE_SCALING_TYPES, Checkpoint
from .tensor_map import TensorSpec, rotary_row_order, tensor_specs
from .vocab import Vocab

log = logging.getLogger(__name__)

BLOCK_BYTES = 4 * 1024 * 1024  # float32 bytes of rows merged at once (stays in L2/L3 through the steps)
# numpy storage for each type our writer emits (BF16 as its 16-bit pattern)
STORAGE = {GGML.F32: np.dtype(np.float32), GGML.F16: np.dtype(np.float16), GGML.BF16: np.dtype(np.uint16)}


@dataclass(frozen=True)
class Provenance:
    model_name: str
    base_name: str
    adapter_name: str | None
    template_name: str
    template: str
    qlora_base: QloraBase | None = None   # the merge went into this 4-bit round trip of the base


F16_OVERFLOW = 65520.0  # float32 values at or beyond +-65520 round to infinity in float16


class BufferPool:
    """Output arrays reused across tensors of the same size: fresh multi-MB allocations cost a page
    fault and a kernel zeroing per 4 KiB page, a third of the merge's time.  Holds at most
    ``keep`` free buffers per size, so memory stays bounded by the model's few distinct shapes.
    """

    def __init__(self, keep: int):
        self.keep = keep
        self._free: dict[tuple[int, np.dtype], list[np.ndarray]] = {}
        self._lock = threading.Lock()

    def take(self, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
        size = int(np.prod(shape))
        with self._lock:
            free = self._free.get((size, dtype))
            flat = free.pop() if free else None
        return (flat if flat is not None else np.empty(size, dtype)).reshape(shape)

    def give(self, array: np.ndarray) -> None:
        with self._lock:
            free = self._free.setdefault((array.size, array.dtype), [])
            if len(free) < self.keep:
                free.append(array.reshape(-1))


_thread_scratch = threading.local()


def _scratch() -> tuple[np.ndarray, np.ndarray]:
    """This thread's two float32 block buffers, allocated once: fresh ones would cost a page
    fault and a kernel zeroing per 4 KiB page on every tensor (measured: 2.5x slower B @ A)."""
    if not hasattr(_thread_scratch, "buffers"):
        _thread_scratch.buffers = (np.empty(BLOCK_BYTES // 4, np.float32), np.empty(BLOCK_BYTES // 4, np.float32))
    return _thread_scratch.buffers


def _view(flat: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    return flat[:int(np.prod(shape))].reshape(shape)


class TensorSource:
    """Where one output tensor's data comes from: a base shard or a modules_to_save copy, then
    (``--qlora-base``) the 4-bit round trip QLoRA trained against, then LoRA."""

    def __init__(self, spec: TensorSpec, checkpoint: Checkpoint, adapter: Adapter | None,
                 qlora_base: QloraBase | None = None):
        self.spec = spec
        saved_key = adapter.saved.get(spec.hf_name) if adapter else None
        if saved_key:
            self.file, self.key = adapter.weights, saved_key
        else:
            self.file, self.key = checkpoint.tensors[spec.hf_name][0], spec.hf_name
        self.factors = adapter.factors(spec.hf_name) if adapter else None
        self.nbytes = self.file.entries[self.key].nbytes
        # QLoRA quantized every decoder linear layer, targeted or not; a modules_to_save copy was
        # trained in full precision and replaces the quantized layer whole.
        quantized = qlora_base is not None and spec.is_decoder_linear and not saved_key
        self.round_trip = TensorRoundTrip(qlora_base, spec.shape) if quantized else None

    def produce(self, gtype: GGML, buffers: "BufferPool") -> np.ndarray:
        spec = self.spec
        rows = spec.shape[0]
        cols = spec.shape[1] if len(spec.shape) > 1 else 1
        order = rotary_row_order(rows, spec.rotary_heads) if spec.rotary_heads else None
        step = max(1, min(rows, BLOCK_BYTES // (4 * cols)))
        block_buf, delta_buf = _scratch()
        if self.round_trip is not None:
            self._observe_blocks(block_buf)
        out = buffers.take(spec.shape, STORAGE[gtype])
        for start in range(0, rows, step):
            stop = min(rows, start + step)
            index = order[start:stop] if order is not None else slice(start, stop)
            shape = (stop - start,) + spec.shape[1:]
            block = self.file.rows_into(self.key, index, _view(block_buf, shape))
            if self.round_trip is not None:
                rows_read = order[start:stop] if order is not None else np.arange(start, stop)
                self.round_trip.apply(block, rows_read)
            if self.factors is not None:
                scaled_b, a = self.factors
                block += np.matmul(scaled_b[index], a, out=_view(delta_buf, shape))
            self._check(block, gtype)
            if gtype == GGML.F32:
                np.copyto(out[start:stop], block)
            else:
                convert_rows(block, out[start:stop], bf16=gtype == GGML.BF16)
        self.file.release(self.key)
        return out

    def _observe_blocks(self, buf: np.ndarray) -> None:
        """The round trip's first pass: every block's absmax, rows in file order."""
        trip, (rows, cols) = self.round_trip, self.spec.shape
        step = min(rows, trip.chunk_rows(BLOCK_BYTES // (4 * cols)))
        for start in range(0, rows, step):
            stop = min(rows, start + step)
            chunk = self.file.rows_into(self.key, slice(start, stop), _view(buf, (stop - start, cols)))
            low, high = trip.observe(chunk)
            if not (np.isfinite(low) and np.isfinite(high)):
                raise InputError(f"tensor {self.spec.hf_name!r}: NaN or Inf in the input, or beyond the "
                                 f"range of --qlora-dtype {trip.base.dtype} (file {self.file.path})")
        trip.finish()

    def _check(self, block: np.ndarray, gtype: GGML) -> None:
        low, high = block.min(), block.max()  # both propagate NaN; two fast reductions, no temporaries
        if not (np.isfinite(low) and np.isfinite(high)):
            where = ("after merging the adapter" if self.factors is not None else "in the input")
            raise InputError(f"tensor {self.spec.hf_name!r}: NaN or Inf {where} (file {self.file.path})")
        if gtype == GGML.F16 and max(-low, high) >= F16_OVERFLOW:
            raise InputError(f"tensor {self.spec.hf_name!r}: values exceed the F16 range "
                             f"(max |w| = {max(-low, high):.4g}); convert to BF16 instead")


def _add_metadata(writer: gguf.GGUFWriter, checkpoint: Checkpoint, vocab: Vocab,
                  provenance: Provenance, file_type: gguf.LlamaFileType) -> None:
    c = checkpoint.config
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(provenance.model_name)
    writer.add_basename(provenance.model_name)
    if provenance.adapter_name:
        writer.add_finetune(provenance.adapter_name)
    writer.add_base_model_count(1)
    writer.add_base_model_name(0, provenance.base_name)
    # our own keys live under "jee1.", outside the reserved "general." namespace (files written
    # before used "general.jee1.*"; they still load and inspect)
    writer.add_string("jee1.converter", f"jee1-convert {__version__}")
    writer.add_string("jee1.base", provenance.base_name)
    writer.add_string("jee1.adapter", provenance.adapter_name or "")
    writer.add_string("jee1.template", provenance.template_name)
    qb = provenance.qlora_base
    writer.add_string("jee1.qlora_base", qb.quant_type if qb else "none")
    if qb:
        writer.add_string("jee1.qlora_dtype", qb.dtype)
        writer.add_uint32("jee1.qlora_blocksize", qb.blocksize)
        writer.add_bool("jee1.qlora_double_quant", qb.double_quant)

    writer.add_context_length(c.max_position_embeddings)
    writer.add_embedding_length(c.hidden_size)
    writer.add_block_count(c.num_hidden_layers)
    writer.add_feed_forward_length(c.intermediate_size)
    writer.add_head_count(c.num_attention_heads)
    writer.add_head_count_kv(c.num_key_value_heads)
    writer.add_rope_dimension_count(c.head_dim)
    writer.add_key_length(c.head_dim)          # as llama.cpp's own converter writes them
    writer.add_value_length(c.head_dim)
    writer.add_rope_freq_base(c.rope_theta)
    writer.add_layer_norm_rms_eps(c.rms_norm_eps)
    writer.add_vocab_size(c.vocab_size)
    if c.rope_scaling:
        kind = c.rope_scaling.get("rope_type", c.rope_scaling.get("type"))
        writer.add_rope_scaling_type(gguf.RopeScalingType(ROPE_SCALING_TYPES[kind]))
        writer.add_rope_scaling_factor(float(c.rope_scaling["factor"]))
        if "original_max_position_embeddings" in c.rope_scaling:
            writer.add_rope_scaling_orig_ctx_len(int(c.rope_scaling["original_max_position_embeddings"]))
    writer.add_file_type(file_type)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)

    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(vocab.tokens)
    writer.add_token_scores(vocab.scores)
    writer.add_token_types(vocab.types)
    writer.add_bos_token_id(vocab.bos_id)
    writer.add_eos_token_id(vocab.eos_id)
    writer.add_unk_token_id(vocab.unk_id)
    if vocab.pad_id is not None:
        writer.add_pad_token_id(vocab.pad_id)
    writer.add_add_bos_token(vocab.add_bos)
    writer.add_add_eos_token(vocab.add_eos)
    writer.add_add_space_prefix(vocab.add_space_prefix)
    writer.add_chat_template(provenance.template)


def tensor_plan(checkpoint: Checkpoint, written: GGML) -> list[tuple[TensorSpec, GGML, int]]:
    """(spec, stored type, bytes) of every tensor the writer produces: norms F32, the rest ``written``."""
    plan = []
    for spec in tensor_specs(checkpoint.config):
        gtype = GGML.F32 if spec.is_norm else written
        plan.append((spec, gtype, int(np.prod(spec.shape)) * STORAGE[gtype].itemsize))
    return plan


def write_gguf(path: Path, checkpoint: Checkpoint, adapter: Adapter | None, vocab: Vocab,
               provenance: Provenance, written: GGML, file_type: gguf.LlamaFileType, progress,
               workers: int = 2, qlora_base: QloraBase | None = None) -> None:
    """Write the merged model to ``path`` (the caller owns atomicity and cleanup)."""
    plan = tensor_plan(checkpoint, written)
    writer = gguf.GGUFWriter(path, arch="llama")
    _add_metadata(writer, checkpoint, vocab, provenance, file_type)
    for spec, gtype, nbytes in plan:
        writer.add_tensor_info(spec.gguf_name, spec.shape, STORAGE[gtype], nbytes, raw_dtype=gtype)
    try:
        writer.write_header_to_file(path)
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        # Tensors are produced by `workers` threads (numpy, BLAS and ggml's converters release the
        # GIL) and written strictly in order; at most `workers` finished tensors wait in memory.
        buffers = BufferPool(keep=workers + 1)
        # One BLAS thread per worker: OpenBLAS's own threads busy-wait between the many small
        # B @ A products and starve the workers (measured: twice the CPU for the same merge).
        with threadpool_limits(limits=1, user_api="blas"), \
                ThreadPoolExecutor(max_workers=workers, thread_name_prefix="merge") as pool:
            pending: deque = deque()
            try:
                for spec, gtype, _ in plan:
                    source = TensorSource(spec, checkpoint, adapter, qlora_base)
                    pending.append((source, pool.submit(source.produce, gtype, buffers)))
                    if len(pending) >= workers:
                        _write_next(writer, pending, progress, buffers)
                while pending:
                    _write_next(writer, pending, progress, buffers)
            finally:
                for _, future in pending:
                    future.cancel()
    finally:
        writer.close()


def _write_next(writer: gguf.GGUFWriter, pending: deque, progress, buffers: BufferPool) -> None:
    source, future = pending.popleft()
    data = future.result()
    writer.write_tensor_data(data)
    buffers.give(data)
    progress.update(source.nbytes)
    log.debug("wrote %s %s", source.spec.gguf_name, list(source.spec.shape))
