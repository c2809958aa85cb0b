"""A message as the screen reads it: lower case, accents and apostrophes gone, text-speak and
numbers-with-units spelled out, misspelt medical words corrected against a lexicon, then cut into
sentences and clauses so that a context word governs only the words near it.

The canonical text is words and punctuation separated by single spaces ("my 2 year old , hes not
breathing"); rule patterns are regular expressions over it.
"""

from __future__ import annotations

import bisect
import re
import unicodedata
from dataclasses import dataclass, field
from functools import lru_cache

from rapidfuzz.distance import OSA
from rapidfuzz.process import extractOne

_APOSTROPHES = dict.fromkeys(map(ord, "'\u2019\u2018\u02bc`\u00b4"), None)
_TOKEN = re.compile(r"[a-z]+|[0-9]+(?:[.,][0-9]+)?|[.!?;,\n]")
_LATIN = re.compile(r"[a-z]")
_OTHER_LETTER = re.compile(r"[^\W\d_a-z]")
SENTENCE_END = frozenset(".!?;\n")
PUNCTUATION = SENTENCE_END | {","}
# "now" starts a clause ("... 3 years ago now my face is drooping") unless it is part of one
_BEFORE_NOW_IN_CLAUSE = frozenset("right just is are am was were im hes shes its theyre been be".split())


def normalise(text: str) -> str:
    """Lower case, no accents, no apostrophes ("don't" -> "dont"), whitespace collapsed."""
    text = unicodedata.normalize("NFKD", text.translate(_APOSTROPHES))
    # combining marks and invisible format characters (zero-width, bidi) would split words
    text = "".join(c for c in text if not unicodedata.combining(c) and unicodedata.category(c) != "Cf")
    text = re.sub(r"([a-hj-z])\1{2,}", r"\1", text.lower())   # "sooo" -> "so", "helppp" -> "help" (not "iii")
    return re.sub(r"[ \t\r\f\v]+", " ", text).strip()


@dataclass
class Reading:
    text: str                                   # canonical text
    sentences: tuple[tuple[int, int], ...]      # character spans of `text`
    clauses: tuple[tuple[int, int], ...]
    corrections: dict[str, str] = field(default_factory=dict)   # as typed -> lexicon word
    english_share: float = 1.0                  # of the words, those known as English
    words: int = 0
    function_words: tuple[int, int] = (0, 0)    # (English, other languages') function words seen
    letters: tuple[int, int] = (0, 0)           # (Latin, other scripts') letters
    marks: object = field(default=None, compare=False, repr=False)   # the screen's markers, found once

    def span_of(self, spans, pos: int) -> tuple[int, int]:
        """The span holding ``pos`` (spans are sorted and cover the text)."""
        k = bisect.bisect_right(spans, (pos, float("inf"))) - 1
        if k >= 0 and spans[k][0] <= pos < spans[k][1]:
            return spans[k]
        return 0, len(self.text)

    def clause(self, pos: int) -> tuple[int, int]:
        return self.span_of(self.clauses, pos)

    def sentence(self, pos: int) -> tuple[int, int]:
        return self.span_of(self.sentences, pos)


class Reader:
    """Turns a message into a Reading.  ``lexicon`` holds the words rules are written with;
    ``english`` the common English words, never 'corrected' and used to tell a message mostly not in
    English; ``spelled_out`` maps text-speak and abbreviations to words; ``clause_words`` start a
    new clause ("but", "and", "now", ...)."""

    def __init__(self, lexicon: list[str], english: frozenset[str], spelled_out: dict[str, str],
                 clause_words: list[str], function_words: tuple[str, str] = ("", ""), figures: list[str] = (),
                 min_fuzzy_len: int = 4):
        self.figures = re.compile("|".join(f"(?:{f})" for f in figures)) if figures else None
        self.rule_stems: list[str] = []
        self.english_function = frozenset(function_words[0].split())
        self.foreign_function = frozenset(function_words[1].split()) - self.english_function
        self.lexicon = frozenset(lexicon)
        self.english = english
        self.spelled_out = spelled_out
        self.clause_words = frozenset(clause_words)
        self.min_fuzzy_len = min_fuzzy_len
        self._by_initial: dict[str, list[str]] = {}
        for word in sorted(self.lexicon):
            self._by_initial.setdefault(word[0], []).append(word)
        self.correct = lru_cache(maxsize=65536)(self._correct)

    def _correct(self, word: str) -> str:
        """The lexicon word a misspelling stands for ("sezure" -> "seizure"), else the word itself."""
        if (word in self.lexicon or word in self.english or len(word) < self.min_fuzzy_len
                or not word.isalpha() or self._rule_word(word)):
            return word
        allowed = 1 if len(word) <= 6 else 2 if len(word) <= 9 else 3
        best = extractOne(word, self._by_initial.get(word[0], ()), scorer=OSA.distance, score_cutoff=allowed)
        return best[0] if best else word

    def _rule_word(self, word: str) -> bool:
        """A word the rules spell out themselves ("spurting"): never 'corrected' into another word."""
        k = bisect.bisect_left(self.rule_stems, word)
        return k < len(self.rule_stems) and self.rule_stems[k] == word

    def read(self, message: str) -> Reading:
        text = normalise(message)
        if self.figures is not None:
            text = self.figures.sub(" ", text)
        latin = len(_LATIN.findall(text))
        other = len(_OTHER_LETTER.findall(text))
        tokens: list[str] = []
        corrections: dict[str, str] = {}
        known = words = english_fw = foreign_fw = 0
        for raw in _TOKEN.findall(text):
            if raw[0].isalpha():
                words += 1
                english_fw += raw in self.english_function
                foreign_fw += raw in self.foreign_function
                known += raw in self.english or raw in self.spelled_out
                if raw in self.spelled_out:
                    tokens.extend(self.spelled_out[raw].split())
                    continue
                fixed = self.correct(raw)
                if fixed != raw:
                    corrections[raw] = fixed
                    known += 1
                tokens.append(fixed)
            else:
                tokens.append(raw)
        canonical = " ".join(tokens)
        sentences, clauses = self._spans(tokens)
        share = known / words if words else 1.0
        return Reading(canonical, sentences, clauses, corrections, share, words, (english_fw, foreign_fw),
                       (latin, other))

    def _spans(self, tokens: list[str]):
        sentences, clauses = [], []
        pos = s_start = c_start = 0
        for i, tok in enumerate(tokens):
            end = pos + len(tok)
            if tok in self.clause_words and pos > c_start and not (
                    tok == "now" and i and tokens[i - 1] in _BEFORE_NOW_IN_CLAUSE):
                clauses.append((c_start, pos))
                c_start = pos
            if tok in ("right", "just") and i + 1 < len(tokens) and tokens[i + 1] == "now" and pos > c_start:
                clauses.append((c_start, pos))
                c_start = pos
            if tok in PUNCTUATION:
                clauses.append((c_start, end + 1))
                c_start = end + 1
            if tok in SENTENCE_END:
                sentences.append((s_start, end + 1))
                s_start = end + 1
            pos = end + 1
        if c_start < pos:
            clauses.append((c_start, pos))
        if s_start < pos:
            sentences.append((s_start, pos))
        return tuple(sentences), tuple(clauses)
