"""Llama-2 in numpy, one page, read top to bottom: the reference our GGUFs are checked against.

Works on Hugging Face tensor names and layout (Q/K rows in HF's rotate-half order), so it is
independent of the converter's renaming and rotary permutation.  float64 throughout.
"""

import numpy as np


def rms_norm(x, weight, eps):
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * weight


def rope(x, positions, theta):
    """Rotary embedding, HF convention: rotate the first half of each head against the second."""
    half = x.shape[-1] // 2
    inv_freq = theta ** (-np.arange(0, half) * 2.0 / x.shape[-1])
    angles = positions[:, None] * inv_freq[None, :]                # (T, half)
    cos, sin = np.cos(angles)[:, None, :], np.sin(angles)[:, None, :]
    x1, x2 = x[..., :half], x[..., half:]
    return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


def silu(x):
    return x / (1.0 + np.exp(-x))


def forward(w, cfg, tokens):
    """Logits (T, vocab) for a token sequence; ``w`` maps HF names to arrays, ``cfg`` is config.json."""
    n_head, n_kv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    head_dim = cfg["hidden_size"] // n_head
    eps, theta = cfg["rms_norm_eps"], cfg["rope_theta"]
    T = len(tokens)
    scaling = cfg.get("rope_scaling") or {}
    positions = np.arange(T, dtype=np.float64) / scaling.get("factor", 1.0)   # linear RoPE scaling
    causal = np.triu(np.full((T, T), -np.inf), k=1)

    x = w["model.embed_tokens.weight"][tokens]
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        # attention with grouped-query heads: each K/V head serves n_head // n_kv query heads
        h = rms_norm(x, w[p + "input_layernorm.weight"], eps)
        q = (h @ w[p + "self_attn.q_proj.weight"].T).reshape(T, n_head, head_dim)
        k = (h @ w[p + "self_attn.k_proj.weight"].T).reshape(T, n_kv, head_dim)
        v = (h @ w[p + "self_attn.v_proj.weight"].T).reshape(T, n_kv, head_dim)
        q, k = rope(q, positions, theta), rope(k, positions, theta)
        k, v = np.repeat(k, n_head // n_kv, axis=1), np.repeat(v, n_head // n_kv, axis=1)
        scores = np.einsum("thd,shd->hts", q, k) / np.sqrt(head_dim) + causal
        scores = np.exp(scores - scores.max(axis=-1, keepdims=True))
        attn = scores / scores.sum(axis=-1, keepdims=True)
        out = np.einsum("hts,shd->thd", attn, v).reshape(T, n_head * head_dim)
        x = x + out @ w[p + "self_attn.o_proj.weight"].T
        # SwiGLU feed-forward
        h = rms_norm(x, w[p + "post_attention_layernorm.weight"], eps)
        gate, up = h @ w[p + "mlp.gate_proj.weight"].T, h @ w[p + "mlp.up_proj.weight"].T
        x = x + (silu(gate) * up) @ w[p + "mlp.down_proj.weight"].T
    x = rms_norm(x, w["model.norm.weight"], eps)
    return x @ w.get("lm_head.weight", w["model.embed_tokens.weight"]).T   # tied embeddings reuse the input table
