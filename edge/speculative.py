"""Speculative decoding: cheap guesses of the next tokens, verified by the target in one batch.

llama-cpp-python's ``generate`` does the verification when the target is built with a
``draft_model``: after each target step it asks the draft for up to k tokens, evaluates them with
the target's own next token in one batch, samples the target's greedy choice at every position and
keeps the drafted tokens only while they equal it; the target's KV cache is cut back to the first
disagreement.  Every token the caller sees is the target's own greedy choice, so the answer is the
one plain greedy decoding gives (up to the rounding of batched against one-at-a-time logits).

Two drafts:

* ``ModelDraft``: a smaller model with the same vocabulary (for SM70, Llama-2-7B converted by
  jee1-convert) decodes greedily on its own context, which it keeps in step with the target's by
  trimming its KV cache back to the longest common prefix before each proposal;
* ``PromptLookupDraft``: no model; the continuation of the latest earlier occurrence of the last
  few tokens in the prompt and answer so far (answers that repeat their question).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
from llama_cpp.llama_speculative import LlamaDraftModel, LlamaPromptLookupDecoding

from jee1.errors import InputError
from jee1.llama_backend import context_tokens, evaluate, last_logits, rewind

log = logging.getLogger(__name__)

PROMPT_LOOKUP_NGRAM = 3      # longest n-gram matched (tries n, n-1, ..., 1)


@dataclass
class DraftStats:
    """Counted when the target's next step shows what it kept: the proposals of a request's last
    step (cut short by its end, a stop or a limit) are never counted."""
    steps: int = 0           # target steps that verified a draft
    proposed: int = 0        # drafted tokens the target verified
    accepted: int = 0        # of those, equal to the target's own choice

    def copy(self) -> "DraftStats":
        return DraftStats(self.steps, self.proposed, self.accepted)

    def minus(self, before: "DraftStats") -> "DraftStats":
        return DraftStats(self.steps - before.steps, self.proposed - before.proposed, self.accepted - before.accepted)


class _Draft(LlamaDraftModel):
    """Proposal bookkeeping shared by the drafts: how many of the last proposals the target kept."""

    def __init__(self, max_tokens: int):
        if max_tokens < 1:
            raise InputError(f"runtime.draft_tokens {max_tokens} must be at least 1")
        self.max_tokens = max_tokens
        self.stats = DraftStats()
        self._last: tuple[np.ndarray, np.ndarray] | None = None   # (context, proposals) of the last call

    def __call__(self, input_ids: np.ndarray, /, **_kwargs) -> np.ndarray:
        self._score(input_ids)
        proposals = np.asarray(self.propose(input_ids), dtype=np.intc)[: self.max_tokens]
        self._last = (input_ids.copy(), proposals)
        self.stats.steps += 1
        return proposals

    def _score(self, input_ids: np.ndarray) -> None:
        """The target continued the last context with the kept proposals and then its own token."""
        if self._last is None:
            return
        context, proposals = self._last
        n = len(context)
        if len(input_ids) <= n or not np.array_equal(input_ids[:n], context):
            return   # a new request: the last proposals were never verified
        kept = input_ids[n:-1]
        if len(kept) > len(proposals):
            return   # not the continuation of our proposals
        self.stats.proposed += len(proposals)
        self.stats.accepted += len(kept)

    def propose(self, input_ids: np.ndarray) -> np.ndarray:
        raise NotImplementedError


class ModelDraft(_Draft):
    """Greedy proposals from a draft model (a llama_cpp.Llama with the target's vocabulary)."""

    def __init__(self, llama, max_tokens: int, target_vocab: int):
        super().__init__(max_tokens)
        self.llama = llama
        self.target_vocab = target_vocab   # ids the draft's table adds after the target's are never proposed

    def propose(self, input_ids: np.ndarray) -> np.ndarray:
        have = context_tokens(self.llama)
        n = min(len(have), len(input_ids))
        same = np.flatnonzero(have[:n] != input_ids[:n])
        common = int(same[0]) if same.size else n
        common = min(common, len(input_ids) - 1)        # the last token is evaluated again for its logits
        rewind(self.llama, common)
        evaluate(self.llama, input_ids[common:].tolist())
        room = self.llama.n_ctx() - len(input_ids)
        proposals: list[int] = []
        for i in range(min(self.max_tokens, room)):
            token = int(np.argmax(last_logits(self.llama)[: self.target_vocab]))
            proposals.append(token)
            if i + 1 < self.max_tokens:
                evaluate(self.llama, [token])
        return np.array(proposals, dtype=np.intc)


class PromptLookupDraft(_Draft):
    """Proposals copied from the prompt and answer so far (llama-cpp-python's n-gram lookup)."""

    def propose(self, input_ids: np.ndarray) -> np.ndarray:
        return LlamaPromptLookupDecoding.find_candidate_pred_tokens(
            input_ids=input_ids, max_ngram_size=PROMPT_LOOKUP_NGRAM, num_pred_tokens=self.max_tokens)


def check_same_vocabulary(target_tokens: list[str], draft_tokens: list[str], draft_name: str) -> None:
    """The draft must read and write the target's token ids: the same table, or the same table with
    tokens added after it (a [PAD] at 32000, as some Llama fine-tunes have)."""
    if len(draft_tokens) < len(target_tokens):
        raise InputError(f"{draft_name}: its vocabulary has {len(draft_tokens)} tokens, the target's "
                         f"{len(target_tokens)}; a draft must share the target's vocabulary")
    for i, (a, b) in enumerate(zip(target_tokens, draft_tokens)):
        if a != b:
            raise InputError(f"{draft_name}: token {i} is {b!r} in the draft and {a!r} in the target; "
                             "a draft must share the target's vocabulary")
    if len(draft_tokens) > len(target_tokens):
        log.info("%s: %d tokens after the target's vocabulary are never proposed", draft_name,
                 len(draft_tokens) - len(target_tokens))
