"""The deterministic medical safety policy around the model.

Before: the screen (``screen.py`` over ``text.py``'s reading; rules, lexicon and context markers in
``data/safety_rules.toml``, versioned; ``model.py`` the learned model, which adds what the rules
missed and overrules a rule only when all but sure) short-circuits an emergency happening now to the
fixed emergency message, and self-harm intent to the crisis message, without calling the model.  A message
mostly not in English gets a fixed notice with the emergency number instead of a silent pass.

After: every answer carries the disclaimer; a cut answer is marked; empty or looping output is
replaced by the 'could not answer' message.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path

from jee1.datafiles import read_toml
from jee1.errors import InputError

from .model import LearnedScreen, Score
from .screen import Hit, Screen
from .text import Reader, Reading

DATA = resources.files("jee1.edge") / "data"
RULES_FILE = DATA / "safety_rules.toml"
ENGLISH_WORDS = DATA / "english_words.txt"
LEARNED_MODEL = DATA / "safety_model.npz"
LEARNED_RULE = "learned.backstop"
KINDS = ("emergency", "crisis")
LANGUAGE_RULE = "language.not_english"
MAX_SCREENED_CHARS = 16384
LOOP_MIN_CHARS = 40      # a repeated unit must cover at least this much of the tail
LOOP_MIN_REPEATS = 4
LOOP_MAX_UNIT = 64


@dataclass(frozen=True)
class Decision:
    red_flag: bool            # an emergency or crisis: the fixed message instead of the model
    rule: str | None
    category: str | None
    matched: str | None       # the words that fired it (the patient's words: not for the audit log)
    message: str | None       # the fixed reply (also for the not-English notice, which is no red flag)
    rules_version: str
    pre_model: bool           # False when the short-circuit is switched off (evaluation)
    kind: str | None = None   # emergency | crisis | None

    @property
    def short_circuit(self) -> bool:
        return self.message is not None

    def as_json(self) -> dict:
        return asdict(self)


def _bounded(question: str) -> str:
    """At most MAX_SCREENED_CHARS: the head and the tail of a longer message (no question that long
    fits the model's context; the bound keeps the screen's time under ~0.3 s whatever arrives)."""
    if len(question) <= MAX_SCREENED_CHARS:
        return question
    half = MAX_SCREENED_CHARS // 2
    return question[:half] + "\n" + question[-half:]


def _strings(table: dict, key: str) -> list[str]:
    value = table[key]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ValueError(f"{key} must be a list of names, not {value!r}")
    return value


def _english_words() -> frozenset[str]:
    lines = ENGLISH_WORDS.read_text(encoding="utf-8").splitlines()
    return frozenset(w for w in lines if w and not w.startswith("#"))


class SafetyPolicy:
    def __init__(self, data: dict, source: str, pre_model: bool = True, emergency_number: str = "112",
                 crisis_line: str = "116 123"):
        numbers = {"emergency_number": emergency_number, "crisis_line": crisis_line}
        try:
            self.version = data["version"]
            messages = data["messages"]
            self.messages = {k: messages[k].format(**numbers) for k in (*KINDS, "not_english")}
            self.disclaimer = messages["disclaimer"]
            self.truncated_notice = messages["truncated_notice"]
            self.could_not_answer = messages["could_not_answer"]
            reading = data["reading"]
            self.min_english_share = float(reading["min_english_share"])
            self.min_words_for_language = int(reading["min_words_for_language"])
            self.reader = Reader(reading["lexicon"], _english_words(), reading["spelled_out"],
                                 reading["clause_words"],
                                 (reading["english_function_words"], reading["foreign_function_words"]),
                                 reading.get("figures", []))
            self.screen_rules = Screen(data["context"], data["rule"], data.get("words", {}))
            self.reader.rule_stems = self.screen_rules.literal_stems()
            learned = data["learned"]
            if not isinstance(learned["enabled"], bool):
                raise ValueError(f"[learned] enabled must be true or false, not {learned['enabled']!r}")
            self.never_overruled = frozenset(_strings(learned, "never_overrules"))
            self.now_contexts = tuple(_strings(learned, "not_overruled_when"))
            unknown = set(self.now_contexts) - set(self.screen_rules.contexts)
            if unknown:
                raise ValueError(f"[learned] not_overruled_when names unknown contexts {sorted(unknown)}")
            unknown = self.never_overruled - {rule.category for rule in self.screen_rules.rules}
            if unknown:
                raise ValueError(f"[learned] never_overrules names categories no rule has: {sorted(unknown)}")
        except (KeyError, TypeError, ValueError, IndexError, re.error) as e:
            raise InputError(f"{source}: invalid safety rules ({type(e).__name__}: {e})") from None
        self.learned = LearnedScreen(str(LEARNED_MODEL)) if learned["enabled"] else None   # its own errors name its file
        self.rules = self.screen_rules.rules
        self.pre_model = pre_model

    @classmethod
    def load(cls, path: str | Path | None = None, pre_model: bool = True, **numbers) -> "SafetyPolicy":
        source = Path(path) if path else RULES_FILE
        return cls(read_toml(source, "safety rules"), str(source), pre_model, **numbers)

    @classmethod
    def from_settings(cls, safety: dict) -> "SafetyPolicy":
        return cls.load(safety["rules"] or None, safety["pre_model"], emergency_number=safety["emergency_number"],
                        crisis_line=safety["crisis_line"])

    # -- before the model -------------------------------------------------------------------

    def overrulable(self, hit: Hit | None, reading: Reading) -> bool:
        """Whether the learned model may overrule this firing: never in a message where a rule of the
        categories that are an emergency however they are told (something swallowed, not breathing,
        choking, self-harm) fires, wherever in the message; nor in one that says something is
        happening now; nor in one mostly not in English (the model read English only)."""
        if hit is None or hit.rule.category in self.never_overruled:
            return False
        marks = self.screen_rules.marks(reading)
        return not (any(marks.spans(name) for name in self.now_contexts) or self._not_english(reading)
                    or any(h.rule.category in self.never_overruled for h in self.screen_rules.every_fired(reading)))

    @staticmethod
    def evidence(hit: Hit, reading: Reading) -> list[str]:
        """The rule's evidence as the model reads it alone: the match's clause from its start to the end
        of the match (an unpunctuated message is one clause: "dad has crushing chest pain sweaty is that
        normal" is read as "dad has crushing chest"), and the same for each of its second findings
        ("my son is 2 months" alone reads ordinary; "his temp is 38.5" does not)."""
        spans = [(hit.start, hit.end), *hit.seconds]
        return [reading.text[reading.clause(start)[0]:end] for start, end in spans]

    def overrule_evidence(self, reading: Reading) -> list[str]:
        """The evidence the model must read as ordinary before it may overrule: that of every rule that
        fires, not only the first.  A rule that fired on the wrong words ("it shot up to 38.6": shot)
        must not, when overruled, take with it the rule that fired on the right ones."""
        return [text for hit in self.screen_rules.every_fired(reading) for text in self.evidence(hit, reading)]

    def _evidence_score(self, hit: Hit | None, reading: Reading) -> float | None:
        """The surer head's p(urgent) on the most urgent of ``overrule_evidence``'s readings (None where no
        rule fired)."""
        if hit is None or self.learned is None:
            return None
        return max(self.learned.score(text).p_urgent_highest for text in self.overrule_evidence(reading))

    def _overruled(self, hit: Hit | None, reading: Reading, score: Score | None, evidence: float | None) -> bool:
        """A rule's firing that the learned model is all but sure is an ordinary message: both its urgent
        heads, read whole, and read as the evidence of every rule that fires, each alone
        (``overrule_evidence``).  The second reading is what keeps an exam-sounding question ("which
        antihistamine is best?", p 0.001 whole) from outweighing the finding before it ("throat closing
        after peanuts", p 0.86 alone)."""
        if score is None or score.p_urgent_highest >= self.learned.overrule_below or not self.overrulable(hit, reading):
            return False
        return (evidence if evidence is not None else self._evidence_score(hit, reading)) < self.learned.overrule_below

    def _decision(self, hit: Hit | None, reading: Reading, score: Score | None, overruled: bool) -> Decision:
        if hit is not None and not overruled:
            rule = hit.rule
            return Decision(True, rule.id, rule.category, hit.matched, self.messages[rule.kind], self.version,
                            self.pre_model, rule.kind)
        if self._not_english(reading):      # the learned model read English only: its score means nothing here
            return Decision(False, LANGUAGE_RULE, "language", None, self.messages["not_english"], self.version,
                            self.pre_model)
        if score is not None and score.p_urgent >= self.learned.threshold:
            kind = "crisis" if score.p_crisis >= 0.5 else "emergency"
            return Decision(True, LEARNED_RULE, "self_harm" if kind == "crisis" else "unclassified",
                            ", ".join(f.split(":", 1)[1] for f in self.learned.strongest(score)), self.messages[kind],
                            self.version, self.pre_model, kind)
        return Decision(False, None, None, None, None, self.version, self.pre_model)

    def _not_english(self, reading: Reading) -> bool:
        english_fw, foreign_fw = reading.function_words
        latin, other = reading.letters
        return (other > latin and other >= 4                          # another script: Cyrillic, CJK, Arabic ...
                or reading.words >= self.min_words_for_language and reading.english_share < self.min_english_share
                or foreign_fw >= 2 and foreign_fw > english_fw)

    def _score(self, reading: Reading) -> Score | None:
        return None if self.learned is None else self.learned.score(reading.text)

    def check(self, question: str) -> Decision:
        reading = self.reader.read(_bounded(question))
        hit, score = self.screen_rules.first(reading), self._score(reading)
        return self._decision(hit, reading, score, self._overruled(hit, reading, score, None))

    def explain(self, question: str) -> dict:
        """Why: the reading, every candidate match and what suppressed it, the learned model's view,
        and the decision."""
        reading = self.reader.read(_bounded(question))
        hits = self.screen_rules.hits(reading)
        fired = self.screen_rules.fired(hits)
        score = self._score(reading)
        evidence = self._evidence_score(fired, reading)
        overruled = self._overruled(fired, reading, score, evidence)
        return {"canonical": reading.text, "corrections": reading.corrections,
                "english_share": round(reading.english_share, 3),
                "candidates": [{"rule": h.rule.id, "matched": h.matched,
                                "suppressed_by": list(h.suppressed_by)} for h in hits],
                "fired": [h.rule.id for h in self.screen_rules.every_fired(reading)],   # candidates stop at the first
                "learned": None if score is None else {
                    "p_urgent": round(score.p_urgent, 3), "p_urgent_heads": [round(p, 3) for p in score.p_heads],
                    "p_crisis": round(score.p_crisis, 3),
                    "p_urgent_evidence": None if evidence is None else round(evidence, 3),
                    "threshold": self.learned.threshold, "overrule_below": self.learned.overrule_below,
                    "overruled": fired.rule.id if overruled else None,
                    "top_features": list(self.learned.strongest(score, towards_urgent=not overruled))},
                "decision": self._decision(fired, reading, score, overruled).as_json()}

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
