"""Stream base + adapter into a GGUF, one tensor (and within it one block of rows) at a time.

Per tensor: read a block of rows from the memory-mapped shard (in llama.cpp's rotary row order
for Q/K), widen to float32, add scale * B[rows] @ A, check for NaN/Inf, cast into the output
array, write it, and drop the shard's pages.  Peak memory is one output tensor plus one block,
whatever the model size.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np
from gguf import GGMLQuantizationType as GGML

from jee1 import __version__
from jee1.errors import InputError

from .adapter import Adapter
from .checkpoint import ROPE_SCALING_TYPES, Checkpoint
from .tensor_map import TensorSpec, rotary_row_order, tensor_specs
from .vocab import Vocab

log = logging.getLogger(__name__)

BLOCK_BYTES = 32 * 1024 * 1024  # float32 bytes of rows merged at once
# numpy storage for each type our writer emits (BF16 as its 16-bit pattern)
STORAGE = {GGML.F32: np.dtype(np.float32), GGML.F16: np.dtype(np.float16), GGML.BF16: np.dtype(np.uint16)}


@dataclass(frozen=True)
class Provenance:
    model_name: str
    base_name: str
    adapter_name: str | None
    template_name: str
    template: str


def _to_bf16(block: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bit patterns, round to nearest even (inputs are finite)."""
    bits = block.view(np.uint32)
    return ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)


def _finite(stored: np.ndarray, gtype: GGML) -> bool:
    if gtype == GGML.BF16:
        return not np.any((stored & 0x7F80) == 0x7F80)
    return bool(np.isfinite(stored).all())


class TensorSource:
    """Where one output tensor's data comes from: a base shard or a modules_to_save copy, plus LoRA."""

    def __init__(self, spec: TensorSpec, checkpoint: Checkpoint, adapter: Adapter | None):
        self.spec = spec
        saved_key = adapter.saved.get(spec.hf_name) if adapter else None
        if saved_key:
            self.file, self.key = adapter.weights, saved_key
        else:
            self.file, self.key = checkpoint.tensors[spec.hf_name][0], spec.hf_name
        self.factors = adapter.factors(spec.hf_name) if adapter else None
        self.nbytes = self.file.entries[self.key].nbytes

    def produce(self, gtype: GGML) -> np.ndarray:
        spec = self.spec
        rows = spec.shape[0]
        cols = spec.shape[1] if len(spec.shape) > 1 else 1
        order = rotary_row_order(rows, spec.rotary_heads) if spec.rotary_heads else None
        out = np.empty(spec.shape, STORAGE[gtype])
        step = max(1, BLOCK_BYTES // (4 * cols))
        for start in range(0, rows, step):
            stop = min(rows, start + step)
            index = order[start:stop] if order is not None else slice(start, stop)
            block = self.file.to_float32(self.key, index)
            if self.factors is not None:
                scaled_b, a = self.factors
                block += scaled_b[index] @ a
            if not np.isfinite(block).all():
                where = "after merging the adapter" if self.factors is not None else "in the input"
                raise InputError(f"tensor {spec.hf_name!r}: NaN or Inf {where} (file {self.file.path})")
            with np.errstate(over="ignore"):  # overflow is detected just below, with a clear message
                out[start:stop] = _to_bf16(block) if gtype == GGML.BF16 else block
            if not _finite(out[start:stop], gtype):
                raise InputError(f"tensor {spec.hf_name!r}: values exceed the {gtype.name} range "
                                 f"(max |w| = {np.abs(block).max():.4g})")
        self.file.release(self.key)
        return out


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
    writer.add_string("general.jee1.converter", f"jee1-convert {__version__}")
    writer.add_string("general.jee1.base", provenance.base_name)
    writer.add_string("general.jee1.adapter", provenance.adapter_name or "")
    writer.add_string("general.jee1.template", provenance.template_name)

    writer.add_context_length(c.max_position_embeddings)
    writer.add_embedding_length(c.hidden_size)
    writer.add_block_count(c.num_hidden_layers)
    writer.add_feed_forward_length(c.intermediate_size)
    writer.add_head_count(c.num_attention_heads)
    writer.add_head_count_kv(c.num_key_value_heads)
    writer.add_rope_dimension_count(c.head_dim)
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


def planned_bytes(checkpoint: Checkpoint, written: GGML) -> int:
    """Bytes of tensor data the writer will produce (for the disk-space check)."""
    total = 0
    for spec in tensor_specs(checkpoint.config):
        gtype = GGML.F32 if spec.is_norm else written
        total += int(np.prod(spec.shape)) * STORAGE[gtype].itemsize
    return total


def write_gguf(path: Path, checkpoint: Checkpoint, adapter: Adapter | None, vocab: Vocab,
               provenance: Provenance, written: GGML, file_type: gguf.LlamaFileType, progress) -> None:
    """Write the merged model to ``path`` (the caller owns atomicity and cleanup)."""
    specs = tensor_specs(checkpoint.config)
    writer = gguf.GGUFWriter(path, arch="llama")
    _add_metadata(writer, checkpoint, vocab, provenance, file_type)
    types = {}
    for spec in specs:
        gtype = GGML.F32 if spec.is_norm else written
        types[spec.gguf_name] = gtype
        storage = STORAGE[gtype]
        writer.add_tensor_info(spec.gguf_name, spec.shape, storage, int(np.prod(spec.shape)) * storage.itemsize,
                               raw_dtype=gtype)
    try:
        writer.write_header_to_file(path)
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for spec in specs:
            source = TensorSource(spec, checkpoint, adapter)
            writer.write_tensor_data(source.produce(types[spec.gguf_name]))
            progress.update(source.nbytes)
            log.debug("wrote %s %s as %s", spec.gguf_name, list(spec.shape), types[spec.gguf_name].name)
    finally:
        writer.close()
