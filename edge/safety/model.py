"""The learned model over the words, word pairs and letter groups of a message (as ``text.py``
reads it), trained on the labelled corpus's dev, train and spent splits by
``tools/train_safety_model.py``.  It adds a firing the rules missed (at or above ``threshold``) and
overrules a rule's firing only when it is all but sure the message is ordinary (below
``overrule_below``): rules explain themselves by name, the model by the features that weighed most.

Urgent (emergency or crisis against ordinary) is read by two heads, ``UrgentHeads``: a linear one
and one with a hidden layer (``UrgentNet``), each over the features scaled by their naive-Bayes
log-count ratio (NBSVM, see the training tool; the scale is folded into the weights).  The hidden
layer ranks unseen authors' emergencies better (cross-validation) but is far surer of itself: alone,
a curious or joking tail ("does this run in families?", "lmao what a day") took real emergencies to
p 0.001 (a review of 3.7.0's first model, docs/safety.md).  So what fires is the two heads' mean, and
an overrule needs both all but sure.  Crisis against emergency (given urgent) is one linear head.

Features are hashed (CRC-32, ``dim`` buckets): word unigrams and bigrams, and 3- to 5-letter groups
inside each word (so "braething" still shares most of its groups with "breathing").  Scores are
float32 sums and products: deterministic on one machine.
"""

from __future__ import annotations

import re
import zipfile
import zlib
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

from jee1.errors import InputError

_WORDS = re.compile(r"[a-z0-9]{1,40}")     # a longer run is read in 40-letter pieces: bounds the cache
CHAR_GRAMS = (3, 4, 5)


def features(canonical: str) -> list[str]:
    words = _WORDS.findall(canonical)
    out = [f"b:{a}_{b}" for a, b in zip(words, words[1:], strict=False)]
    for w in words:
        out += _word_features(w)
    return out


# The caches are sized for a device's working vocabulary, not for what an attacker can type: a word's
# features are ~100 strings, its buckets ~100 ints.
@lru_cache(maxsize=2048)
def _word_features(word: str) -> tuple[str, ...]:
    padded = f"<{word}>"
    return (f"w:{word}", *(f"c:{padded[i:i + n]}" for n in CHAR_GRAMS for i in range(len(padded) - n + 1)))


@lru_cache(maxsize=65536)
def _bucket(name: str) -> int:
    return zlib.crc32(name.encode())


@lru_cache(maxsize=8192)
def _word_buckets(word: str) -> tuple[int, ...]:
    return tuple(_bucket(name) for name in _word_features(word))


def hashed(canonical: str, dim: int) -> tuple[np.ndarray, np.ndarray]:
    """(bucket indices, value each) of a message's ``features``: each distinct bucket once, sorted,
    L2-normalised.  A word's buckets are cached whole: most of a message's features are letter groups."""
    mask = dim - 1
    words = _WORDS.findall(canonical)
    ids = {_bucket(f"b:{a}_{b}") & mask for a, b in zip(words, words[1:], strict=False)}
    for w in words:
        ids.update(b & mask for b in _word_buckets(w))
    idx = np.array(sorted(ids), dtype=np.int64)
    return idx, np.full(len(idx), 1.0 / np.sqrt(max(len(idx), 1)), dtype=np.float32)


@dataclass(frozen=True)
class UrgentNet:
    """p(urgent) = sigmoid(relu(x @ embed + hidden_bias) @ out + bias), x the hashed features."""
    embed: np.ndarray         # (dim, hidden), float16 as stored: only a message's rows are widened
    hidden_bias: np.ndarray   # (hidden,)
    out: np.ndarray           # (hidden,)
    bias: float

    def hidden(self, idx: np.ndarray, val: np.ndarray) -> np.ndarray:
        return np.maximum(val @ self.embed[idx].astype(np.float32) + self.hidden_bias, 0)

    def logit(self, idx: np.ndarray, val: np.ndarray) -> float:
        return float(self.hidden(idx, val) @ self.out) + self.bias

    def bucket_weights(self, idx: np.ndarray, val: np.ndarray) -> dict[int, float]:
        """Each bucket's share of this message's logit: with the hidden units this message switches on
        held fixed the net is linear, so the shares (plus the biases) add up to the logit exactly."""
        on = self.hidden(idx, val) > 0
        shares = self.embed[idx].astype(np.float32) @ (self.out * on)
        return dict(zip(idx.tolist(), (val * shares).tolist(), strict=True))


@dataclass(frozen=True)
class UrgentHeads:
    """The linear head (weights ``w``, bias ``b``) and the hidden-layer head, read together."""
    w: np.ndarray
    b: float
    net: UrgentNet

    def probabilities(self, idx: np.ndarray, val: np.ndarray) -> tuple[float, float]:
        return sigmoid(float(val @ self.w[idx]) + self.b), sigmoid(self.net.logit(idx, val))

    def bucket_weights(self, idx: np.ndarray, val: np.ndarray) -> dict[int, float]:
        """Each bucket's share of the two heads' logits added together (``UrgentNet.bucket_weights``):
        what ``strongest`` ranks.  The decision is on the mean of the two probabilities, so a saturated
        head's shares can outweigh what actually moved the mean; the ranking names what pushed, not how
        much the push counted."""
        shares = self.net.bucket_weights(idx, val)
        for bucket, linear in zip(idx.tolist(), (val * self.w[idx]).tolist(), strict=True):
            shares[bucket] += linear
        return shares


@dataclass(frozen=True)
class Score:
    p_heads: tuple[float, float]    # p(urgent) by the (linear, hidden-layer) head
    p_crisis: float                 # given urgent: probability that it is a crisis rather than an emergency
    canonical: str                  # the read message (``LearnedScreen.strongest`` ranks its features)

    @property
    def p_urgent(self) -> float:
        """The heads' mean: the model fires on this."""
        return sum(self.p_heads) / 2

    @property
    def p_urgent_highest(self) -> float:
        """The surer of urgent: an overrule needs this below its level."""
        return max(self.p_heads)


class LearnedScreen:
    def __init__(self, path: Path | str):
        try:
            with np.load(path, allow_pickle=False) as data:
                self.dim = int(data["dim"])
                net = UrgentNet(data["urgent_embed"].astype(np.float16), data["urgent_hidden_bias"].astype(np.float32),
                                data["urgent_out"].astype(np.float32), float(data["urgent_bias"]))
                self.urgent = UrgentHeads(data["w_urgent"].astype(np.float32), float(data["b_urgent"]), net)
                self.w_crisis = data["w_crisis"].astype(np.float32)
                self.b_crisis = float(data["b_crisis"])
                self.threshold = float(data["threshold"])
                self.overrule_below = float(data["overrule_below"])
                self.trained_on = tuple(str(s) for s in data["trained_on"])
        except OSError as e:
            raise InputError(f"{path}: cannot read the safety model ({e.strerror or e})") from None
        except (KeyError, ValueError, TypeError, EOFError, zipfile.BadZipFile) as e:
            raise InputError(f"{path}: not a safety model ({type(e).__name__}: {e}); retrain: "
                             "python tools/train_safety_model.py") from None
        net, hidden = self.urgent.net, self.urgent.net.out.shape
        if (len(hidden) != 1 or not hidden[0] or net.embed.shape != (self.dim, *hidden)
                or net.hidden_bias.shape != hidden or self.dim & (self.dim - 1)
                or self.urgent.w.shape != (self.dim,) or self.w_crisis.shape != (self.dim,)):
            raise InputError(f"{path}: weights do not match dim {self.dim}")

    def score(self, canonical: str) -> Score:
        idx, val = hashed(canonical, self.dim)
        zc = float(val @ self.w_crisis[idx]) + self.b_crisis
        return Score(self.urgent.probabilities(idx, val), sigmoid(zc), canonical)

    def strongest(self, score: Score, towards_urgent: bool = True) -> tuple[str, ...]:
        """The (at most four) features that pushed hardest towards urgent, or towards ordinary."""
        sign = 1 if towards_urgent else -1
        shares = self.urgent.bucket_weights(*hashed(score.canonical, self.dim))
        contrib = {}
        for name in features(score.canonical):
            contrib.setdefault(name, sign * shares[_bucket(name) & (self.dim - 1)])
        return tuple(n for n, c in sorted(contrib.items(), key=lambda kv: -kv[1])[:4] if c > 0)


def sigmoid(z: float) -> float:
    return float(1.0 / (1.0 + np.exp(-z)))
