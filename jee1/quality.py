"""How far a quantized model's next-token distributions are from the reference's, on a text.

In the style of llama.cpp's perplexity tool with --kl-divergence: the text is cut into windows of
``n_ctx`` tokens (each starting with BOS); in every window the first half is context and each
position of the second half is scored: KL(p_ref || p_candidate), top-1 agreement, and the
negative log-likelihood of the actual next token under both models (perplexity).  Memory is one
window of logits per model, whatever the text's length.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from jee1.errors import InputError
from jee1.llama_backend import clear_context, load_llama


@dataclass
class Divergence:
    tokens_scored: int
    kl_mean: float
    kl_median: float
    kl_p99: float
    kl_max: float
    top1_agreement: float
    ppl_reference: float
    ppl_candidate: float

    def as_json(self) -> dict:
        return {k: (round(v, 6) if isinstance(v, float) else v) for k, v in asdict(self).items()}


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def _window_logits(llama, tokens: list[int]) -> np.ndarray:
    clear_context(llama)
    llama.eval(tokens)
    return _log_softmax(np.asarray(llama.scores[:len(tokens)], dtype=np.float64))


def compare(reference: str | Path, candidate: str | Path, text: str, n_ctx: int = 512, threads: int = 2,
            progress=None) -> Divergence:
    ref = load_llama(reference, n_ctx=n_ctx, n_batch=n_ctx, n_threads=threads, logits_all=True, seed=0)
    cand = load_llama(candidate, n_ctx=n_ctx, n_batch=n_ctx, n_threads=threads, logits_all=True, seed=0)
    try:
        if ref.n_vocab() != cand.n_vocab():
            raise InputError(f"{candidate}: vocabulary of {cand.n_vocab()} tokens, reference has {ref.n_vocab()}")
        tokens = ref.tokenize(text.encode("utf-8"), add_bos=False, special=False)
        span = n_ctx - 1
        if len(tokens) < span:
            raise InputError(f"the text is {len(tokens)} tokens; at least one window of {span} is needed "
                             f"(use a longer text or a smaller context)")
        kls, agree, nll_ref, nll_cand = [], 0, 0.0, 0.0
        for start in range(0, len(tokens) - span + 1, span):
            window = [ref.token_bos()] + tokens[start:start + span]
            lr, lc = _window_logits(ref, window), _window_logits(cand, window)
            first = len(window) // 2
            for j in range(first, len(window) - 1):
                p = np.exp(lr[j])
                kls.append(float(np.sum(p * (lr[j] - lc[j]))))
                agree += int(lr[j].argmax() == lc[j].argmax())
                nll_ref -= lr[j, window[j + 1]]
                nll_cand -= lc[j, window[j + 1]]
            if progress is not None:
                progress.update(1)
    finally:
        ref.close()
        cand.close()
    values = np.maximum(np.array(kls), 0.0)   # rounding can give -1e-12
    n = len(values)
    return Divergence(n, float(values.mean()), float(np.median(values)), float(np.percentile(values, 99)),
                      float(values.max()), agree / n, math.exp(nll_ref / n), math.exp(nll_cand / n))
