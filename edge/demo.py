"""``jee1 demo``: the whole pipeline on the tiny model, where the real 41 GB SM70 is absent.

Build the tiny checkpoint and adapter, convert them to Q4_K_M with ``jee1-convert``'s pipeline,
then answer one question through the device engine: manifest check, safety policy, the chat
template stored in the GGUF, warm prompt prefix, streaming, audit log.
The tiny model has random weights: its answer is noise; the demo proves the plumbing.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from jee1.convert.pipeline import ConvertOptions, convert
from jee1.convert.quant_types import quant_type
from jee1.convert.tiny import AdapterSpec, TinySpec, build_adapter, build_checkpoint
from .engine import Answer, Engine
from .settings import Settings

log = logging.getLogger(__name__)

QUESTION = "What is the first-line treatment for anaphylaxis?"




@dataclass
class DemoResult:
    model: Path
    manifest: Path
    answer: Answer
    status: dict
    files: dict[str, Path]       # where everything is: checkpoint, adapter, model, manifest, config, ...


def write_dev_config(workdir: Path, model: Path) -> Path:
    """``workdir/jee1.toml``: settings that keep every device command inside ``workdir``."""
    root = workdir.resolve()
    text = (
        "# Development settings written by `jee1 demo`: every device command run with\n"
        f"# `--config {workdir}/jee1.toml` reads and writes only inside {root}.\n"
        f'[model]\npath = "{model.resolve()}"\n'
        "# a development model in your own folder: not root-owned and read-only as on a device\n"
        "require_protected = false\n\n"
        '[runtime]\nn_ctx = 512\nthreads = 2\n\n'
        '[answer]\nmax_tokens = 24\n\n'
        f'[cache]\ndir = "{root / "cache"}"\n\n'
        f'[audit]\npath = "{root / "audit.jsonl"}"\n'
    )
    path = workdir / "jee1.toml"
    path.write_text(text, encoding="utf-8")
    return path


def run_demo(workdir: Path, question: str = QUESTION, max_tokens: int = 24, quiet: bool = False,
             on_text=None) -> DemoResult:
    workdir.mkdir(parents=True, exist_ok=True)
    base = build_checkpoint(workdir / "tiny-base", TinySpec())
    adapter = build_adapter(workdir / "tiny-adapter", TinySpec(), AdapterSpec())
    result = convert(ConvertOptions(base_dir=base, adapter_dir=adapter, output=workdir / "tiny-sm70.Q4_K_M.gguf",
                                    quant=quant_type("Q4_K_M"), quiet=quiet))
    config = write_dev_config(workdir, result.output)
    settings = Settings.load(config, overrides={"answer": {"max_tokens": max_tokens}})
    files = {"checkpoint": base, "adapter": adapter, "model": result.output, "manifest": result.manifest,
             "config": config, "cache": Path(settings["cache"]["dir"]), "audit_log": Path(settings["audit"]["path"])}
    with Engine(settings) as engine:
        request = engine.submit(question)
        for text in request:
            if on_text:
                on_text(text)
        return DemoResult(result.output, result.manifest, request.answer, engine.status(), files)
