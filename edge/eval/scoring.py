"""Scoring one item: log-likelihood of each option's continuation, or a generated answer parsed
strictly.  Log-likelihood reuses the KV cache of the shared context: it is evaluated once, each
option's tokens are appended, scored and trimmed off again; consecutive items share their few-shot
prefix the same way."""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from jee1.llama_backend import context_tokens, evaluate, last_logits, rewind

from .prompting import Prompt
from .tasks import Item


@dataclass
class Scored:
    logprobs: list[float] | None      # per option, summed over its tokens (loglik mode)
    predicted: str | None             # label chosen (None: unparseable generation)
    predicted_norm: str | None        # label chosen by length-normalised log-likelihood
    generated: str | None = None      # generative mode: the model's text


def log_softmax(logits: np.ndarray) -> np.ndarray:
    z = logits.astype(np.float64) - logits.max()
    return z - np.log(np.exp(z).sum())


class LoglikScorer:
    """llama.cpp context held by the caller (the engine's, under its lock)."""

    def __init__(self, llama, reuse_cache: bool = True):
        self.llama = llama
        self.reuse = reuse_cache
        self.n_vocab = llama.n_vocab()

    def _tokens(self, text: str, bos: bool, special: bool = False) -> list[int]:
        # a template that writes its own "<s>" gets no second BOS
        bos = bos and not (special and text.startswith("<s>"))
        return self.llama.tokenize(text.encode("utf-8"), add_bos=bos, special=special)

    def _last_logits(self) -> np.ndarray:
        return last_logits(self.llama).copy()

    def _evaluate_context(self, tokens: list[int]) -> np.ndarray:
        """Bring the context to exactly ``tokens`` (reusing the longest cached prefix) and return the
        logits after its last token."""
        llama = self.llama
        keep = 0
        if self.reuse:
            cached = context_tokens(llama)
            while keep < min(len(cached), len(tokens) - 1) and cached[keep] == tokens[keep]:
                keep += 1
        rewind(llama, keep)
        evaluate(llama, tokens[keep:])
        return self._last_logits()

    def continuation_tokens(self, context: list[int], text: str, continuation: str, special: bool = False) -> list[int]:
        """Tokens of ``continuation`` as they appear after the context (tokenised together, as the
        harness does, so a leading space is merged the way the model saw it in training)."""
        whole = self._tokens(text + continuation, bos=True, special=special)
        if whole[:len(context)] == context and len(whole) > len(context):
            return whole[len(context):]
        return self._tokens(continuation, bos=False)

    def score(self, prompt: Prompt, item: Item) -> Scored:
        context = self._tokens(prompt.context, bos=True, special=prompt.special_tokens)
        context_logits = self._evaluate_context(context)
        sums = []
        for continuation in prompt.continuations:
            tokens = self.continuation_tokens(context, prompt.context, continuation, prompt.special_tokens)
            if not self.reuse:
                rewind(self.llama, 0)
                context_logits = self._evaluate_context(context)
            total = float(log_softmax(context_logits)[tokens[0]])
            rewind(self.llama, len(context))
            for previous, token in zip(tokens, tokens[1:]):
                evaluate(self.llama, [previous])
                total += float(log_softmax(self._last_logits())[token])
            rewind(self.llama, len(context))   # trim this option off again
            sums.append(total)
        # acc_norm as the harness computes it: divided by the length in characters of the choice
        # itself ("A", "maybe"), without the leading space of the continuation
        lengths = [len(label) for label in item.labels]
        best = int(np.argmax(sums))
        best_norm = int(np.argmax(np.array(sums) / np.maximum(lengths, 1)))
        return Scored(sums, item.labels[best], item.labels[best_norm])


_LETTER = re.compile(r"^\W*(?:the (?:correct )?answer is\W*)?\(?([A-I])\)?(?:[\s.):,]|$)", re.IGNORECASE)
_DECISION = re.compile(r"^\W*(yes|no|maybe)\b", re.IGNORECASE)


def parse_answer(text: str, item: Item) -> str | None:
    """Strict: the answer must open the reply ('C', 'C.', '(C) ...', 'The answer is C', 'yes, ...')."""
    first = text.strip().splitlines()[0] if text.strip() else ""
    if item.task == "pubmedqa":
        m = _DECISION.match(first)
        return m.group(1).lower() if m else None
    m = _LETTER.match(first)
    label = m.group(1).upper() if m else None
    return label if label in item.labels else None
