"""The prompt around a question: the model's chat template with the fixed preamble, split once
into the part before the question (the warm prefix) and the part after it."""

from __future__ import annotations

from dataclasses import dataclass

from jee1.errors import InputError
from jee1.prompts import render

_MARK = "\u0000JEE1-QUESTION\u0000"


@dataclass(frozen=True)
class PromptLayout:
    prefix: str   # template text up to the question: identical for every request
    suffix: str   # template text after the question

    @classmethod
    def from_template(cls, template: str, preamble: str, bos: str = "<s>", eos: str = "</s>") -> "PromptLayout":
        messages = [{"role": "system", "content": preamble}, {"role": "user", "content": _MARK}]
        text = render(template, messages, bos_token=bos, eos_token=eos)
        if text.count(_MARK) != 1:
            raise InputError("the chat template does not place the user's question exactly once")
        prefix, suffix = text.split(_MARK)
        return cls(prefix, suffix)

    def build(self, question: str) -> str:
        return self.prefix + question + self.suffix
