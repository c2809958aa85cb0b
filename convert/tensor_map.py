"""Hugging Face Llama tensor names -> GGUF (llama.cpp ``llama`` architecture) names, as tables.

The same table answers which tensors a checkpoint must have, their expected shapes, which
ones llama.cpp wants row-permuted for its rotary layout, and which stay in F32.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

# hf name -> (gguf name, shape as a function of the config)
GLOBAL_TENSORS = {
    "model.embed_tokens.weight": ("token_embd.weight", lambda c: (c.vocab_size, c.hidden_size)),
    "model.norm.weight": ("output_norm.weight", lambda c: (c.hidden_size,)),
    "lm_head.weight": ("output.weight", lambda c: (c.vocab_size, c.hidden_size)),
}

# per block: hf suffix after "model.layers.{i}." -> (gguf suffix after "blk.{i}.", shape)
BLOCK_TENSORS = {
    "input_layernorm.weight": ("attn_norm.weight", lambda c: (c.hidden_size,)),
    "self_attn.q_proj.weight": ("attn_q.weight", lambda c: (c.num_attention_heads * c.head_dim, c.hidden_size)),
    "self_attn.k_proj.weight": ("attn_k.weight", lambda c: (c.num_key_value_heads * c.head_dim, c.hidden_size)),
    "self_attn.v_proj.weight": ("attn_v.weight", lambda c: (c.num_key_value_heads * c.head_dim, c.hidden_size)),
    "self_attn.o_proj.weight": ("attn_output.weight", lambda c: (c.hidden_size, c.num_attention_heads * c.head_dim)),
    "post_attention_layernorm.weight": ("ffn_norm.weight", lambda c: (c.hidden_size,)),
    "mlp.gate_proj.weight": ("ffn_gate.weight", lambda c: (c.intermediate_size, c.hidden_size)),
    "mlp.up_proj.weight": ("ffn_up.weight", lambda c: (c.intermediate_size, c.hidden_size)),
    "mlp.down_proj.weight": ("ffn_down.weight", lambda c: (c.hidden_size, c.intermediate_size)),
}

DECODER_LINEAR = [suffix for suffix in BLOCK_TENSORS if suffix.endswith("_proj.weight")]

# HF stores Q and K with the rotary halves split ("rotate_half"); llama.cpp's rope pairs
# adjacent elements, so rows are interleaved per head (convert_hf_to_gguf.py's permute).
ROTARY_HEADS = {
    "self_attn.q_proj.weight": lambda c: c.num_attention_heads,
    "self_attn.k_proj.weight": lambda c: c.num_key_value_heads,
}

# Tensors some checkpoints carry that llama.cpp recomputes.
IGNORED = re.compile(r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq")

_BLOCK = re.compile(r"model\.layers\.(\d+)\.(.+)")


@dataclass(frozen=True)
class TensorSpec:
    hf_name: str
    gguf_name: str
    shape: tuple[int, ...]
    rotary_heads: int | None  # permute rows for llama.cpp's rope with this many heads

    @property
    def is_norm(self) -> bool:
        return len(self.shape) == 1

    @property
    def is_decoder_linear(self) -> bool:
        """q, k, v, o, gate, up, down of a layer: what QLoRA stores in 4 bits."""
        m = _BLOCK.fullmatch(self.hf_name)
        return m is not None and m.group(2) in DECODER_LINEAR


def tensor_specs(config) -> list[TensorSpec]:
    """Every tensor the GGUF gets, in file order, with expected shapes."""
    specs = [_spec("model.embed_tokens.weight", config)]
    for i in range(config.num_hidden_layers):
        specs += [_spec(f"model.layers.{i}.{suffix}", config) for suffix in BLOCK_TENSORS]
    specs.append(_spec("model.norm.weight", config))
    if not config.tie_word_embeddings:
        specs.append(_spec("lm_head.weight", config))
    return specs


def _spec(hf_name: str, config) -> TensorSpec:
    m = _BLOCK.fullmatch(hf_name)
    if m:
        gguf_suffix, shape = BLOCK_TENSORS[m.group(2)]
        heads = ROTARY_HEADS.get(m.group(2))
        return TensorSpec(hf_name, f"blk.{m.group(1)}.{gguf_suffix}", shape(config),
                          heads(config) if heads else None)
    gguf_name, shape = GLOBAL_TENSORS[hf_name]
    return TensorSpec(hf_name, gguf_name, shape(config), None)


def rotary_row_order(n_rows: int, n_heads: int) -> np.ndarray:
    """Source row for each output row of llama.cpp's Q/K permutation.

    Equivalent to ``w.reshape(n_heads, 2, n_rows // n_heads // 2, -1).swapaxes(1, 2).reshape(w.shape)``
    applied to the row indices, so a tensor can be permuted one block of rows at a time.
    """
    rows = np.arange(n_rows)
    return rows.reshape(n_heads, 2, n_rows // n_heads // 2).swapaxes(1, 2).reshape(n_rows)


def module_name(hf_weight_name: str) -> str:
    """``model.layers.0.self_attn.q_proj.weight`` -> ``model.layers.0.self_attn.q_proj``."""
    return hf_weight_name.removesuffix(".weight")


def layer_index(name: str) -> int | None:
    m = _BLOCK.match(name)
    return int(m.group(1)) if m else None
