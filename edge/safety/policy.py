"""The deterministic medical safety policy around the model.

Before: red-flag rules (``data/safety_rules.json``, versioned) short-circuit an emergency that is
happening now to a fixed message, without calling the model.  A rule fires on a clause that
matches one of its patterns, is not negated ("no chest pain"), is not about the past ("had a
heart attack in 2019"), in a question that speaks of now ("my wife is gasping") and is not a
case or fact question ("A 62-year-old woman ... which test ...").

After: every answer carries the disclaimer; a cut answer is marked; empty or looping output is
replaced by the 'could not answer' message.
"""

from __future__ import annotations

import json
import re
import unicodedata
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path

from jee1.errors import InputError

RULES_FILE = resources.files("jee1.edge") / "data" / "safety_rules.json"
_APOSTROPHES = str.maketrans({"\u2019": "'", "\u2018": "'", "\u02bc": "'", "`": "'"})
LOOP_MIN_CHARS = 40      # a repeated unit must cover at least this much of the tail
LOOP_MIN_REPEATS = 4
LOOP_MAX_UNIT = 64


@dataclass(frozen=True)
class Decision:
    red_flag: bool
    rule: str | None
    category: str | None
    matched: str | None
    message: str | None       # the fixed reply when red_flag
    rules_version: str
    pre_model: bool           # False when the short-circuit is switched off (evaluation)

    def as_json(self) -> dict:
        return asdict(self)


def normalise(text: str) -> str:
    text = unicodedata.normalize("NFKD", text.translate(_APOSTROPHES))
    text = "".join(c for c in text if not unicodedata.combining(c))
    return re.sub(r"\s+", " ", text.lower()).strip()


@dataclass(frozen=True)
class _Rule:
    id: str
    category: str
    message: str
    patterns: tuple[re.Pattern, ...]


class SafetyPolicy:
    def __init__(self, data: dict, source: str, pre_model: bool = True):
        try:
            ctx = data["context"]
            self.version = data["version"]
            self.messages = {"emergency": data["emergency_message"], "crisis": data["crisis_message"]}
            self.disclaimer = data["disclaimer"]
            self.truncated_notice = data["truncated_notice"]
            self.could_not_answer = data["could_not_answer"]
            self._now = [re.compile(p) for p in ctx["now_markers"]]
            self._case = [re.compile(p) for p in ctx["case_markers"]]
            self._past = [re.compile(p) for p in ctx["past_markers"]]
            self._negations = set(ctx["negations"])
            self._window = int(ctx["negation_window_words"])
            self._clauses = re.compile(ctx["clause_split"])
            self.rules = [_Rule(r["id"], r["category"], r["message"], tuple(re.compile(p) for p in r["patterns"]))
                          for r in data["rules"]]
        except (KeyError, TypeError, ValueError, re.error) as e:
            raise InputError(f"{source}: invalid safety rules ({e})") from None
        for rule in self.rules:
            if rule.message not in self.messages:
                raise InputError(f"{source}: rule {rule.id} names unknown message {rule.message!r}")
        self.pre_model = pre_model

    @classmethod
    def load(cls, path: str | Path | None = None, pre_model: bool = True) -> "SafetyPolicy":
        source = Path(path) if path else RULES_FILE
        try:
            data = json.loads(source.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise InputError(f"{source}: safety rules file does not exist") from None
        except json.JSONDecodeError as e:
            raise InputError(f"{source}: safety rules are not valid JSON ({e})") from None
        return cls(data, str(source), pre_model)

    # -- before the model -------------------------------------------------------------------

    def _negated(self, clause: str, start: int) -> bool:
        before = re.findall(r"[\w']+", clause[:start])[-self._window:]
        joined = " ".join(before)
        return any(w in self._negations for w in before) or any(
            " " in n and n in joined for n in self._negations)

    def check(self, question: str) -> Decision:
        text = normalise(question)
        about_now = any(p.search(text) for p in self._now)
        case_question = any(p.search(text) for p in self._case)
        if about_now and not case_question:
            for clause in self._clauses.split(text):
                if any(p.search(clause) for p in self._past):
                    continue
                for rule in self.rules:
                    for pattern in rule.patterns:
                        for m in pattern.finditer(clause):
                            if not self._negated(clause, m.start()):
                                return Decision(True, rule.id, rule.category, m.group(0),
                                                self.messages[rule.message], self.version, self.pre_model)
        return Decision(False, None, None, None, None, self.version, self.pre_model)

    def screen(self, question: str) -> Decision:
        """``check`` when the pre-model short-circuit is on; with it off, a decision that never fires."""
        if self.pre_model:
            return self.check(question)
        return Decision(False, None, None, None, None, self.version, False)

    # -- after the model --------------------------------------------------------------------

    @staticmethod
    def looping(text: str) -> bool:
        """The tail of ``text`` is one unit repeated: 'the the the the ...', 'abcabcabc...'."""
        n = len(text)
        for unit in range(1, LOOP_MAX_UNIT + 1):
            repeats = max(LOOP_MIN_REPEATS, -(-LOOP_MIN_CHARS // unit))
            span = unit * repeats
            if span > n:
                break
            tail = text[n - span:]
            if tail == tail[:unit] * repeats and tail.strip():
                return True
        return False

    def degenerate(self, text: str) -> bool:
        return not text.strip() or self.looping(text)

    def finish(self, body: str, truncated: bool) -> tuple[str, bool]:
        """(final text, replaced): disclaimer always, truncation notice when cut, replacement when degenerate."""
        replaced = self.degenerate(body)
        parts = [self.could_not_answer if replaced else body]
        if truncated and not replaced:
            parts.append(self.truncated_notice)
        parts.append(self.disclaimer)
        return "\n\n".join(parts), replaced
