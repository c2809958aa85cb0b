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
    # chat style: the template's "<s>" / "</s>" (the end of each few-shot answer) are the model's
    # BOS / EOS tokens, as the model saw them in training, not those characters as text
    special_tokens: bool = False


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
        return Prompt(render(self.chat_template, messages), continuations, special_tokens=True)


class FewshotSampler:
    """lm-evaluation-harness's default sampler: one ``random.Random(seed)`` per task, drawing k
    examples for each question in turn (so questions get different examples, and the draw for
    question i depends on the questions before it); when the examples come from the task's own
    file the question itself is drawn around (k+1 drawn, it removed, the first k kept)."""

    def __init__(self, pool: list[Item], k: int, seed: int, same_file: bool):
        if k > len(pool) - (1 if same_file else 0):
            raise InputError(f"{k}-shot needs {k} examples, the few-shot file has {len(pool)}"
                             f"{' (one of them the question itself)' if same_file else ''}")
        self.pool, self.k, self.same_file = pool, k, same_file
        self.rnd = random.Random(seed)

    def draw(self, item: Item) -> list[Item]:
        if not self.same_file:
            return self.rnd.sample(self.pool, self.k)
        return [shot for shot in self.rnd.sample(self.pool, self.k + 1) if shot != item][: self.k]
