"""``jee1 demo``: the whole pipeline on the tiny model, where the real 41 GB SM70 is absent.

Build the tiny checkpoint and adapter, convert them to Q4_K_M with ``jee1-convert``'s pipeline,
load the result with llama.cpp and answer one question through the stored chat template.
The tiny model has random weights: its answer is noise; the demo proves the plumbing.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from jee1.convert.pipeline import ConvertOptions, convert
from jee1.convert.quant_types import quant_type
from jee1.convert.tiny import AdapterSpec, TinySpec, build_adapter, build_checkpoint
from jee1.llama_backend import load_llama
from jee1.prompts import render

log = logging.getLogger(__name__)

QUESTION = "What is the first-line treatment for anaphylaxis?"


@dataclass
class DemoResult:
    model: Path
    manifest: Path
    prompt: str
    answer: str
    tokens: int


def run_demo(workdir: Path, question: str = QUESTION, max_tokens: int = 24, quiet: bool = False) -> DemoResult:
    workdir.mkdir(parents=True, exist_ok=True)
    base = build_checkpoint(workdir / "tiny-base", TinySpec())
    adapter = build_adapter(workdir / "tiny-adapter", TinySpec(), AdapterSpec())
    result = convert(ConvertOptions(base_dir=base, adapter_dir=adapter, output=workdir / "tiny-sm70.Q4_K_M.gguf",
                                    quant=quant_type("Q4_K_M"), quiet=quiet))
    llama = load_llama(result.output, n_ctx=512, n_threads=2, seed=0)
    try:
        template = llama.metadata["tokenizer.chat_template"]
        prompt = render(template, [{"role": "user", "content": question}])
        out = llama.create_completion(prompt, max_tokens=max_tokens, temperature=0.0, stop=["###"])
    finally:
        llama.close()
    return DemoResult(result.output, result.manifest, prompt, out["choices"][0]["text"],
                      out["usage"]["completion_tokens"])
