"""The pre-model screen: rules that name an emergency, and context markers that decide whether the
words they matched describe something happening now.

Every context marker governs only the words in its scope:

  before    the marker comes earlier in the same clause (within ``window_words`` words if given):
            negation ("no chest pain")
  earlier   the marker comes earlier in the same sentence: a hypothetical ("what if my kid ever
            swallows a magnet and starts choking")
  clause    the marker is in the same clause: the past ("had a stroke in 2019")
  sentence  the marker is in the same sentence: a knowledge question ("what are the signs of a
            stroke"), something habitual ("short of breath when I jog")
  message   anywhere: an exam vignette ("A 45-year-old man presents with ...")

and is overruled ("rescued") when the match's clause or sentence also has words of another kind:
something happening now ("right now", "for ten minutes", "wont stop") overrules the past, a
knowledge question or a habit; the writer speaking of themselves or their own ("I", "my") overrules
a vignette or a knowledge question.  Hedges ("not sure if", "I don't know what's happening") are
blanked out first, so their "not" and "if" govern nothing.

A clause or sentence marker may also govern the whole message when a marker of another kind is
anywhere in it (``message_wide_with``): an aftercare question ("will he recover?") governs its own
sentence, and the whole message only when the message also tells of the past or of care already
given ("had a stroke two years ago ... will it ever get better", "is in intensive care now").

A rule fires on the first match that no context suppresses; ``with`` (optional) asks for a second
finding anywhere in the message (a head injury *and* vomiting), not negated.
"""

from __future__ import annotations

import bisect
import re
from dataclasses import dataclass

from .text import Reading

SCOPES = ("before", "earlier", "clause", "sentence", "message")
MARKER_KEYS = frozenset({"scope", "patterns", "rescued_by", "window_words", "message_wide_with"})
RULE_KEYS = frozenset({"id", "category", "kind", "patterns", "with", "contexts", "contexts_except", "fire", "quiet"})
_WORD = re.compile(r"[a-z0-9]+")
_NEGATIVE_START = re.compile(r"\s*(?:not|no|isnt|hasnt|wont|cant|doesnt|dont|never)\b")
MAX_MATCHES_PER_RULE = 64     # bounds the time a pathological message ("no chest pain " * 1000) can take
_NAMED = re.compile(r"\{([a-z_]+)\}")
_IN_SENTENCE = r"(?:[^.!?;\n]|\.(?=\d))"   # any character but a sentence end ("38.5" is no end)


@dataclass(frozen=True)
class Context:
    name: str
    scope: str
    markers: re.Pattern
    rescued_by: dict[str, str]          # context name -> the scope it must be found in
    window_words: int | None = None
    message_wide_with: tuple[str, ...] = ()   # governs the whole message when one of these is anywhere in it


@dataclass(frozen=True)
class Rule:
    id: str
    category: str
    kind: str                           # emergency | crisis
    patterns: re.Pattern
    with_: re.Pattern | None
    contexts: tuple[str, ...]           # the contexts that can suppress it


@dataclass(frozen=True)
class Hit:
    rule: Rule
    matched: str
    start: int
    suppressed_by: tuple[str, ...]      # empty: it fired
    end: int                            # where the rule's own match ends
    seconds: tuple[tuple[int, int], ...] = ()   # where its second findings (a rule's ``with``) lie


def _union(patterns: list[str]) -> re.Pattern:
    return re.compile("|".join(f"(?:{p})" for p in patterns))


def _at_word_starts(patterns: list[str]) -> re.Pattern:
    """Every finding and marker starts at the start of a word: saying so once up front spares the
    regex engine trying each alternative inside every word (a fivefold speed-up)."""
    return re.compile(f"(?<![a-z0-9])(?=[a-z0-9])(?:{_union(patterns).pattern})")


class Screen:
    def __init__(self, context: dict, rules: list[dict], words: dict[str, str]):
        self.words = {name: f"(?:{alternation})" for name, alternation in words.items()}
        self.hedges = _at_word_starts(context["hedges"])
        self.contexts: dict[str, Context] = {}
        for name, spec in context["markers"].items():
            unknown = set(spec) - MARKER_KEYS
            if unknown:
                raise ValueError(f"context {name}: unknown keys {sorted(unknown)} (known: {', '.join(sorted(MARKER_KEYS))})")
            if spec["scope"] not in SCOPES:
                raise ValueError(f"context {name}: scope {spec['scope']!r} is not one of {', '.join(SCOPES)}")
            wide = spec.get("message_wide_with", [])
            if not isinstance(wide, list) or not all(isinstance(w, str) for w in wide):
                raise ValueError(f"context {name}: message_wide_with must be a list of context names, not {wide!r}")
            if wide and spec["scope"] not in ("clause", "sentence"):
                raise ValueError(f"context {name}: message_wide_with widens a clause or sentence marker, not a "
                                 f"{spec['scope']!r} one")
            self.contexts[name] = Context(name, spec["scope"], _at_word_starts(spec["patterns"]),
                                          dict(spec.get("rescued_by", {})), spec.get("window_words"), tuple(wide))
        for c in self.contexts.values():
            for other, scope in c.rescued_by.items():
                if other not in self.contexts or scope not in SCOPES:
                    raise ValueError(f"context {c.name}: rescued_by {other}/{scope} is unknown")
            unknown = set(c.message_wide_with) - set(self.contexts)
            if unknown:
                raise ValueError(f"context {c.name}: message_wide_with names unknown contexts {sorted(unknown)}")
            if c.name in c.message_wide_with:
                raise ValueError(f"context {c.name}: message_wide_with names the marker itself")
        self.suppressors = tuple(n for n, c in self.contexts.items() if c.name in context["suppress"])
        self.rules = []
        for r in rules:
            unknown = set(r) - RULE_KEYS
            if unknown:
                raise ValueError(f"rule {r.get('id')}: unknown keys {sorted(unknown)} (known: {', '.join(sorted(RULE_KEYS))})")
            if "contexts" in r and "contexts_except" in r:
                raise ValueError(f"rule {r['id']}: give contexts or contexts_except, not both")
            excepted = r.get("contexts_except", [])
            if not isinstance(excepted, list) or not all(isinstance(c, str) for c in excepted):
                raise ValueError(f"rule {r['id']}: contexts_except must be a list of context names, not {excepted!r}")
            contexts = tuple(r["contexts"]) if "contexts" in r else tuple(c for c in self.suppressors if c not in excepted)
            unknown = (set(contexts) | set(excepted)) - set(self.suppressors)
            if unknown:
                raise ValueError(f"rule {r['id']}: unknown contexts {sorted(unknown)}")
            if r["kind"] not in ("emergency", "crisis"):
                raise ValueError(f"rule {r['id']}: kind {r['kind']!r} is not emergency or crisis")
            self.rules.append(Rule(r["id"], r["category"], r["kind"], self._compile(r["patterns"]),
                                   self._compile(r["with"]) if r.get("with") else None, contexts))

    def _compile(self, patterns: list[str]) -> re.Pattern:
        def word_class(m: re.Match) -> str:
            if m.group(1) not in self.words:
                raise ValueError(f"pattern names unknown words {{{m.group(1)}}}")
            return self.words[m.group(1)]
        # ".{0,40}" never reaches across a sentence: a gap in a pattern stays inside one.
        return _at_word_starts([_NAMED.sub(word_class, p).replace(".{", _IN_SENTENCE + "{") for p in patterns])

    def literal_stems(self) -> list[str]:
        """The letter runs (5 or more) the rules are written with, sorted: words to keep as typed."""
        runs = set()
        for rule in self.rules:
            for pattern in (rule.patterns, rule.with_):
                if pattern is not None:
                    runs.update(re.findall(r"(?<![\\a-z])[a-z]{5,}", pattern.pattern))
        return sorted(runs)

    # -- context --------------------------------------------------------------------------------

    def _region(self, reading: Reading, scope: str, pos: int) -> tuple[int, int]:
        if scope == "clause" or scope == "before":
            return reading.clause(pos)
        if scope == "sentence" or scope == "earlier":
            return reading.sentence(pos)
        return 0, len(reading.text)

    def _present(self, marks: "_Marks", name: str, pos: int, scope: str | None = None) -> bool:
        ctx = self.contexts[name]
        scope = scope or ctx.scope
        start, end = self._region(marks.reading, scope, pos)
        spans = marks.spans(name)
        for m_start, m_end in spans[bisect.bisect_left(spans, (start, -1)):]:
            if m_start >= end:
                break
            if m_end > end:
                continue
            if scope not in ("before", "earlier"):
                return True
            if m_start < pos and (ctx.window_words is None or marks.words_between(m_end, pos) < ctx.window_words):
                return True
        return False

    def _governs(self, marks: "_Marks", name: str, pos: int) -> bool:
        """Whether context ``name`` governs the words at ``pos``: found in its scope, or anywhere in a
        message that also has one of its ``message_wide_with`` contexts anywhere (an aftercare question
        governs its own sentence, and the whole message when the message also tells of the past)."""
        wide = self.contexts[name].message_wide_with
        return (self._present(marks, name, pos)
                or (any(marks.spans(other) for other in wide) and self._present(marks, name, pos, "message")))

    def _suppressed(self, rule: Rule, marks: "_Marks", pos: int) -> tuple[str, ...]:
        found = []
        for name in rule.contexts:
            if self._governs(marks, name, pos) and not any(
                    self._present(marks, other, pos, scope) for other, scope in self.contexts[name].rescued_by.items()):
                found.append(name)
        return tuple(found)

    def _with(self, rule: Rule, marks: "_Marks") -> list[re.Match]:
        """Every second finding in the message, not negated (it may lie inside the first: "throat is
        closing" is both a swelling and a throat; a rule's ``with`` must not list its own weak words)."""
        return [m for m in rule.with_.finditer(marks.reading.text) if not self._present(marks, "negation", m.start())]

    # -- screening ------------------------------------------------------------------------------

    def marks(self, reading: Reading) -> "_Marks":
        """One message's context markers, found once however many rules and questions ask."""
        if reading.marks is None:
            reading.marks = _Marks(self, reading)
        return reading.marks

    def hits(self, reading: Reading, every_rule: bool = False) -> list[Hit]:
        """Every candidate match, rule by rule, with what suppressed it, up to the first that fired (then
        the last one); with ``every_rule``, on to each rule's first firing."""
        marks = self.marks(reading)
        out: list[Hit] = []
        for rule in self.rules:
            pos, tries = 0, 0
            while tries < MAX_MATCHES_PER_RULE and (m := rule.patterns.search(reading.text, pos)) is not None:
                pos, tries = m.start() + 1, tries + 1   # a suppressed match must not hide one that overlaps it
                if not m.group(0).strip():
                    continue
                suppressed = self._suppressed(rule, marks, m.start())
                if "negation" in suppressed and _NEGATIVE_START.match(m.group(0)):
                    suppressed = tuple(c for c in suppressed if c != "negation")   # "no, hes not breathing"
                matched, seconds = m.group(0).strip(), []
                if not suppressed and rule.with_ is not None:
                    seconds = self._with(rule, marks)
                    if not seconds:
                        suppressed = ("no_second_finding",)
                    else:
                        matched = f"{matched} + {seconds[0].group(0)}"
                out.append(Hit(rule, matched, m.start(), suppressed, m.end(), tuple(s.span() for s in seconds)))
                if not suppressed:
                    if not every_rule:
                        return out
                    break
        return out

    @staticmethod
    def fired(hits: list[Hit]) -> Hit | None:
        return hits[-1] if hits and not hits[-1].suppressed_by else None

    def first(self, reading: Reading) -> Hit | None:
        return self.fired(self.hits(reading))

    def every_fired(self, reading: Reading) -> list[Hit]:
        """Each rule's first firing, in the rules' order (``first`` is the first of them), found once per
        reading: an overrule asks both which categories fired and what each rule's evidence is."""
        marks = self.marks(reading)
        if marks.every_fired is None:
            marks.every_fired = [hit for hit in self.hits(reading, every_rule=True) if not hit.suppressed_by]
        return marks.every_fired


class _Marks:
    """One message's context markers, each context's found once (hedges blanked first)."""

    def __init__(self, screen: Screen, reading: Reading):
        self.screen = screen
        self.reading = reading
        self.masked = screen.hedges.sub(lambda m: " " * len(m.group(0)), reading.text)
        self._spans: dict[str, list[tuple[int, int]]] = {}
        self._word_starts: list[int] | None = None
        self.every_fired: list[Hit] | None = None      # Screen.every_fired's, once asked

    def words_between(self, start: int, end: int) -> int:
        if self._word_starts is None:
            self._word_starts = [m.start() for m in _WORD.finditer(self.masked)]
        return bisect.bisect_left(self._word_starts, end) - bisect.bisect_left(self._word_starts, start)

    def spans(self, name: str) -> list[tuple[int, int]]:
        if name not in self._spans:
            self._spans[name] = [m.span() for m in self.screen.contexts[name].markers.finditer(self.masked)]
        return self._spans[name]
