"""The learned model: a linear model over the words, word pairs and letter groups of a message
(as ``text.py`` reads it), trained on the labelled corpus's dev, train and spent splits by
``tools/train_safety_model.py``.  It adds a firing the rules missed (at or above ``threshold``) and
overrules a rule's firing only when it is all but sure the message is ordinary (below
``overrule_below``): rules explain themselves by name, the model by the features that weighed most.
The urgent weights already include each feature's naive-Bayes scale (NBSVM, see the training tool).

Features are hashed (CRC-32, 2**18 buckets): word unigrams and bigrams, and 3- to 5-letter groups
inside each word (so "braething" still shares most of its groups with "breathing").  Scores are
float32 dot products: deterministic on one machine.
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
class Score:
    p_urgent: float          # probability that the message is an emergency or a crisis
    p_crisis: float          # given urgent: probability that it is a crisis rather than an emergency
    canonical: str           # the read message (``LearnedScreen.strongest`` ranks its features)


class LearnedScreen:
    def __init__(self, path: Path | str):
        try:
            with np.load(path, allow_pickle=False) as data:
                self.dim = int(data["dim"])
                self.w = data["w_urgent"].astype(np.float32)
                self.b = float(data["b_urgent"])
                self.w_crisis = data["w_crisis"].astype(np.float32)
                self.b_crisis = float(data["b_crisis"])
                self.threshold = float(data["threshold"])
                self.overrule_below = float(data["overrule_below"])
                self.trained_on = tuple(str(s) for s in data["trained_on"])
        except OSError as e:
            raise InputError(f"{path}: cannot read the safety model ({e.strerror or e})") from None
        except (KeyError, ValueError, EOFError, zipfile.BadZipFile) as e:
            raise InputError(f"{path}: not a safety model ({type(e).__name__}: {e}); retrain: "
                             "python tools/train_safety_model.py") from None
        if self.w.shape != (self.dim,) or self.w_crisis.shape != (self.dim,) or self.dim & (self.dim - 1):
            raise InputError(f"{path}: weights do not match dim {self.dim}")

    def score(self, canonical: str) -> Score:
        idx, val = hashed(canonical, self.dim)
        z = float(val @ self.w[idx]) + self.b
        zc = float(val @ self.w_crisis[idx]) + self.b_crisis
        return Score(sigmoid(z), sigmoid(zc), canonical)

    def strongest(self, score: Score, towards_urgent: bool = True) -> tuple[str, ...]:
        """The (at most four) features that pushed hardest towards urgent, or towards ordinary."""
        sign = 1 if towards_urgent else -1
        contrib = {}
        for name in features(score.canonical):
            contrib.setdefault(name, sign * float(self.w[_bucket(name) & (self.dim - 1)]))
        return tuple(n for n, c in sorted(contrib.items(), key=lambda kv: -kv[1])[:4] if c > 0)


def sigmoid(z: float) -> float:
    return float(1.0 / (1.0 + np.exp(-z)))
