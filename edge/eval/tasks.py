"""Benchmark files as the public datasets ship them, read from disk (nothing is downloaded).

* ``medqa``: MedQA-USMLE 4-option JSONL, one object per line: ``question``, ``options``
  ({"A": ..., "D": ...}), ``answer_idx`` ("A"-"D").
* ``pubmedqa``: PubMedQA's single JSON object keyed by PMID: ``QUESTION``, ``CONTEXTS`` (list of
  abstract paragraphs), ``final_decision`` (yes / no / maybe).
* ``usmle``: the USMLE sample exam as JSONL (our layout, documented in docs/eval.md): ``question``,
  ``options`` ({"A": ..., ...}, two to nine lettered options), ``answer`` (the letter); optional
  ``id`` and ``step``.

A malformed row is reported with its line number (or PMID) and either skipped or fatal.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

from jee1.errors import InputError

log = logging.getLogger(__name__)

PUBMEDQA_LABELS = ["yes", "no", "maybe"]
LETTERS = "ABCDEFGHI"


@dataclass(frozen=True)
class Item:
    task: str
    id: str
    question: str
    labels: tuple[str, ...]          # what the model answers: letters, or yes/no/maybe
    options: tuple[str, ...]         # option texts (empty strings for pubmedqa)
    answer: str
    context: str = ""


@dataclass
class TaskFile:
    task: str
    path: Path
    items: list[Item] = field(default_factory=list)
    bad_rows: list[str] = field(default_factory=list)


class RowError(ValueError):
    pass


def _options(raw) -> tuple[tuple[str, ...], tuple[str, ...]]:
    if not isinstance(raw, dict) or not 2 <= len(raw) <= len(LETTERS):
        raise RowError("'options' must be an object of 2-9 lettered options")
    labels = tuple(sorted(raw))
    if labels != tuple(LETTERS[:len(labels)]) or not all(isinstance(v, str) and v.strip() for v in raw.values()):
        raise RowError(f"options must be lettered A.. without gaps and non-empty, got {list(raw)}")
    return labels, tuple(raw[k].strip() for k in labels)


def _text(row: dict, key: str) -> str:
    value = row.get(key)
    if not isinstance(value, str) or not value.strip():
        raise RowError(f"missing or empty {key!r}")
    return value.strip()


def _lettered(task: str, key: str, answer_key: str, row: dict, row_id: str) -> Item:
    labels, options = _options(row.get("options"))
    answer = row.get(answer_key)
    if answer not in labels:
        raise RowError(f"{answer_key!r} is {answer!r}, not one of the options {list(labels)}")
    return Item(task, str(row.get("id", row_id)), _text(row, key), labels, options, answer)


def _read_jsonl(task: str, path: Path, parse) -> TaskFile:
    out = TaskFile(task, path)
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                if not isinstance(row, dict):
                    raise RowError("not a JSON object")
                out.items.append(parse(row, f"{path.stem}:{number}"))
            except (json.JSONDecodeError, RowError) as e:
                out.bad_rows.append(f"{path}:{number}: {e}")
    return out


def _read_pubmedqa(path: Path) -> TaskFile:
    out = TaskFile("pubmedqa", path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise InputError(f"{path}: PubMedQA file is not one JSON object ({e})") from None
    if not isinstance(data, dict):
        raise InputError(f"{path}: PubMedQA file must be one JSON object keyed by PMID")
    for pmid, row in data.items():
        try:
            if not isinstance(row, dict):
                raise RowError("not a JSON object")
            contexts = row.get("CONTEXTS")
            if not isinstance(contexts, list) or not contexts or not all(isinstance(c, str) for c in contexts):
                raise RowError("'CONTEXTS' must be a non-empty list of strings")
            decision = row.get("final_decision")
            if decision not in PUBMEDQA_LABELS:
                raise RowError(f"'final_decision' is {decision!r}, not yes/no/maybe")
            out.items.append(Item("pubmedqa", str(pmid), _text(row, "QUESTION"), tuple(PUBMEDQA_LABELS),
                                  ("", "", ""), decision, "\n".join(contexts)))   # as preprocess_pubmedqa joins
        except RowError as e:
            out.bad_rows.append(f"{path}: PMID {pmid}: {e}")
    return out


READERS = {
    "medqa": lambda path: _read_jsonl("medqa", path, lambda row, rid: _lettered("medqa", "question", "answer_idx", row, rid)),
    "usmle": lambda path: _read_jsonl("usmle", path, lambda row, rid: _lettered("usmle", "question", "answer", row, rid)),
    "pubmedqa": _read_pubmedqa,
}


def read_task(task: str, path: str | Path, strict: bool) -> TaskFile:
    path = Path(path)
    if task not in READERS:
        raise InputError(f"unknown task {task!r} (choose from {', '.join(READERS)})")
    if not path.is_file():
        raise InputError(f"{path}: {task} file does not exist")
    try:
        out = READERS[task](path)
    except UnicodeDecodeError as e:
        raise InputError(f"{path}: not UTF-8 text ({e})") from None
    for problem in out.bad_rows:
        log.warning("malformed row skipped: %s", problem)
    if out.bad_rows and strict:
        raise InputError(f"{len(out.bad_rows)} malformed row(s) in {path}, first: {out.bad_rows[0]}")
    if not out.items:
        raise InputError(f"{path}: no usable {task} rows")
    return out
