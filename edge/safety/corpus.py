"""Labelled messages (tests/data/safety/*.jsonl) and the screen's figures on them: recall on
emergencies and crises, false triggers on ordinary messages, each with a 95% Wilson interval, per
category, the misses by name, and the time per message."""

from __future__ import annotations

import json
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

from jee1.errors import InputError

from ..eval.stats import wilson_interval
from .policy import KINDS, SafetyPolicy

LABELS = (*KINDS, "ordinary")


@dataclass(frozen=True)
class Example:
    text: str
    label: str              # emergency | crisis | ordinary
    category: str
    register: str


def load_corpus(path: str | Path) -> list[Example]:
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as e:
        raise InputError(f"{path}: cannot read the corpus ({e.strerror})") from None
    out = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            example = Example(row["text"], row["label"], row["category"], row.get("register", ""))
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise InputError(f"{path}:{n}: not a corpus line ({e})") from None
        if example.label not in LABELS:
            raise InputError(f"{path}:{n}: label {example.label!r} is not one of {', '.join(LABELS)}")
        out.append(example)
    return out


def split_roles(folder: str | Path) -> dict[str, list[str]]:
    """A corpus folder's ``splits.json``: which splits are dev, train, spent or held out, and the
    cross-validation folds (tests/data/safety/README.md)."""
    path = Path(folder) / "splits.json"
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise InputError(f"{path}: cannot read the split roles ({e.strerror})") from None
    except json.JSONDecodeError as e:
        raise InputError(f"{path}: not JSON ({e})") from None


def seen_splits(roles: dict[str, list[str]]) -> list[str]:
    """The splits one may read and train on: dev, train and spent, never a held-out one."""
    return roles["dev"] + roles["train"] + roles["spent"]


@dataclass
class Figures:
    emergencies: int = 0
    caught: int = 0
    ordinary: int = 0
    false_triggers: int = 0
    misses: list[Example] = field(default_factory=list)
    wrong_kind: list[tuple[Example, str]] = field(default_factory=list)
    triggered: list[tuple[Example, str]] = field(default_factory=list)
    by_category: dict[str, list[int]] = field(default_factory=dict)   # [emergencies, caught, ordinary, false]
    seconds: list[float] = field(default_factory=list)

    @property
    def recall(self) -> float:
        return self.caught / self.emergencies if self.emergencies else 1.0

    @property
    def false_trigger_rate(self) -> float:
        return self.false_triggers / self.ordinary if self.ordinary else 0.0

    def as_json(self) -> dict:
        ms = sorted(s * 1000 for s in self.seconds)
        return {
            "emergencies": self.emergencies, "caught": self.caught, "recall": self.recall,
            "recall_ci95": wilson_interval(self.caught, self.emergencies),
            "ordinary": self.ordinary, "false_triggers": self.false_triggers,
            "false_trigger_rate": self.false_trigger_rate,
            "false_trigger_ci95": wilson_interval(self.false_triggers, self.ordinary),
            "wrong_kind": [{"text": e.text, "label": e.label, "got": got} for e, got in self.wrong_kind],
            "misses": [{"text": e.text, "category": e.category} for e in self.misses],
            "false_trigger_lines": [{"text": e.text, "category": e.category, "rule": rule} for e, rule in self.triggered],
            "by_category": {c: dict(zip(("emergencies", "caught", "ordinary", "false_triggers"), v))
                            for c, v in sorted(self.by_category.items())},
            "median_ms": statistics.median(ms) if ms else None,
            "p99_ms": ms[min(len(ms) - 1, int(0.99 * len(ms)))] if ms else None,
        }


def measure(policy: SafetyPolicy, examples: list[Example]) -> Figures:
    fig = Figures()
    for ex in examples:
        t0 = time.perf_counter()
        d = policy.check(ex.text)
        fig.seconds.append(time.perf_counter() - t0)
        cat = fig.by_category.setdefault(ex.category, [0, 0, 0, 0])
        if ex.label in KINDS:
            fig.emergencies += 1
            cat[0] += 1
            if d.red_flag:
                fig.caught += 1
                cat[1] += 1
                if d.kind != ex.label:
                    fig.wrong_kind.append((ex, d.kind))
            else:
                fig.misses.append(ex)
        else:
            fig.ordinary += 1
            cat[2] += 1
            if d.short_circuit:
                fig.false_triggers += 1
                cat[3] += 1
                fig.triggered.append((ex, d.rule))
    return fig
