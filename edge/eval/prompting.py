"""Prompt layouts (``data/prompt_styles.json``) applied to benchmark items, with seeded few-shot."""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from importlib import resources

from jee1.errors import InputError
from jee1.prompts import render

from .tasks import Item

STYLES_FILE = resources.files("jee1.edge.eval") / "data" / "prompt_styles.json"


@dataclass(frozen=True)
class Prompt:
    context: str                  # everything before the answer
    continuations: tuple[str, ...]  # one per label, appended to the context when scoring


class PromptStyle:
    def __init__(self, name: str, chat_template: str | None = None, system: str | None = None):
        styles = json.loads(STYLES_FILE.read_text(encoding="utf-8"))
        if name not in styles or name.startswith("_"):
            raise InputError(f"unknown prompt style {name!r} (choose from harness, chat)")
        self.name = name
        self.layouts = styles[name]
        self.chat_template = chat_template
        self.system = system
        if name == "chat" and not chat_template:
            raise InputError("the chat prompt style needs the model's chat template")

    def _fields(self, item: Item, layout: dict) -> dict:
        options = "\n".join(layout["option_line"].format(label=label, text=text)
                            for label, text in zip(item.labels, item.options, strict=True)) if layout["option_line"] else ""
        return {"question": item.question, "options": options, "context": item.context}

    def build(self, item: Item, shots: list[Item]) -> Prompt:
        layout = self.layouts[item.task]
        continuations = tuple(layout["continuation"].format(label=label) for label in item.labels)
        if self.name == "harness":
            parts = [layout["prompt"].format(**self._fields(shot, layout)) + layout["continuation"].format(label=shot.answer)
                     for shot in shots]
            parts.append(layout["prompt"].format(**self._fields(item, layout)))
            return Prompt(layout["fewshot_separator"].join(parts), continuations)
        messages = [{"role": "system", "content": self.system}] if self.system else []
        for shot in shots:
            messages += [{"role": "user", "content": layout["user"].format(**self._fields(shot, layout))},
                         {"role": "assistant", "content": layout["continuation"].format(label=shot.answer)}]
        messages.append({"role": "user", "content": layout["user"].format(**self._fields(item, layout))})
        return Prompt(render(self.chat_template, messages), continuations)


def pick_shots(pool: list[Item], k: int, seed: int, exclude_id: str) -> list[Item]:
    """k few-shot examples, the same for every question of a run (seeded), never the question itself."""
    candidates = [item for item in pool if item.id != exclude_id]
    if k > len(candidates):
        raise InputError(f"{k}-shot needs {k} examples, the few-shot file has {len(candidates)}")
    return random.Random(seed).sample(candidates, k)
