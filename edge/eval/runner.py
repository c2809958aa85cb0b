"""Run benchmark items through the engine, one record per question, resumable."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from jee1.errors import InputError
from jee1.manifest import sha256_file

from .prompting import FewshotSampler, PromptStyle
from .scoring import LoglikScorer, parse_answer
from .stats import wilson_interval
from .tasks import TaskFile, read_task

log = logging.getLogger(__name__)

MODES = ("loglik", "generate")
GENERATE_TOKENS = 16


@dataclass
class EvalConfig:
    tasks: list[tuple[str, Path]]
    out_dir: Path
    mode: str = "loglik"
    style: str = "harness"
    fewshot: dict[str, Path] = field(default_factory=dict)
    k: int = 0
    seed: int = 1234
    strict: bool = False
    limit: int | None = None
    quiet: bool = False


def read_records(path: Path, run_key: str | None = None) -> dict[tuple[str, str], dict]:
    """The records of ``path``; with ``run_key``, only those that run wrote (a foreign line is ignored)."""
    done = {}
    if path.is_file():
        with open(path, encoding="utf-8") as f:
            for line in f:
                try:
                    record = json.loads(line)
                    if run_key is None or record["run"] == run_key:
                        done[(record["task"], record["id"])] = record
                except (json.JSONDecodeError, KeyError, TypeError):
                    continue  # a line cut by an interruption: that question is simply run again
    return done


def run_key(engine, config: EvalConfig, style: PromptStyle) -> dict:
    """Everything a record's answer depends on.  Records are reused only under the same key."""
    return {
        "model_sha256": engine.model_sha256 or engine._model_identity(),
        "tasks": {task: sha256_file(path) for task, path in config.tasks},
        "fewshot": {task: sha256_file(path) for task, path in sorted(config.fewshot.items())} if config.k else {},
        "mode": config.mode, "style": config.style, "k": config.k, "seed": config.seed,
        "template_sha256": hashlib.sha256(json.dumps([style.name, style.chat_template, style.system]).encode()).hexdigest(),
        "pre_model_safety": engine.policy.pre_model,
    }


def records_path(out_dir: Path, engine, key: dict) -> Path:
    """``<model file stem>.<run key>.records.jsonl``: one file per model and run."""
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
    return out_dir / f"{engine.model_path.name.removesuffix('.gguf')}.{digest}.records.jsonl"


def _drop_partial_line(path: Path) -> None:
    """An interrupted run can leave half a record at the end; cut it so appended records stay whole."""
    if not path.is_file():
        return
    with open(path, "rb+") as f:
        data = f.read()
        if data and not data.endswith(b"\n"):
            f.truncate(data.rfind(b"\n") + 1)


def evaluate(engine, config: EvalConfig, label: str) -> dict:
    """Score every item of every task with ``engine``; records go to ``out_dir/<label>.records.jsonl``."""
    if config.mode not in MODES:
        raise InputError(f"unknown scoring mode {config.mode!r} (choose from {', '.join(MODES)})")
    config.out_dir.mkdir(parents=True, exist_ok=True)
    style = PromptStyle(config.style, engine.metadata.get("tokenizer.chat_template") or None,
                        engine.settings["answer"]["preamble"] if config.style == "chat" else None)
    key = run_key(engine, config, style)
    path_ = records_path(config.out_dir, engine, key)
    key_digest = path_.name.split(".")[-3]
    _drop_partial_line(path_)
    done = read_records(path_, key_digest)
    results = {"model": label, "file": engine.model_path.name, "sha256": engine.model_sha256, "quant": engine.quant,
               "mode": config.mode, "style": config.style, "k_shot": config.k, "seed": config.seed,
               "pre_model_safety": engine.policy.pre_model, "run_key": key_digest, "run": key,
               "records": path_.name, "tasks": {}}
    with open(path_, "a", encoding="utf-8") as records:
        for task, path in config.tasks:
            taskfile = read_task(task, path, config.strict)
            pool = read_task(task, config.fewshot[task], config.strict).items if config.k else []
            results["tasks"][task] = _run_task(engine, config, style, taskfile, pool, done, records, key_digest)
    return results


def _run_task(engine, config: EvalConfig, style: PromptStyle, taskfile: TaskFile, pool, done, records,
              key_digest: str) -> dict:
    items = taskfile.items[:config.limit] if config.limit else taskfile.items
    example_prompt, started, fresh = None, time.monotonic(), 0
    same_file = config.k and Path(config.fewshot[taskfile.task]).resolve() == Path(taskfile.path).resolve()
    sampler = FewshotSampler(pool, config.k, config.seed, bool(same_file)) if config.k else None
    scorer = LoglikScorer(engine.llama) if config.mode == "loglik" else None
    with tqdm(total=len(items), desc=taskfile.task, unit="q", disable=config.quiet, dynamic_ncols=True) as bar:
        for item in items:
            shots = sampler.draw(item) if sampler else []    # drawn for every question, done or not
            prompt = style.build(item, shots)
            example_prompt = example_prompt or prompt.context
            key = (item.task, item.id)
            if key not in done:
                done[key] = {"run": key_digest} | _score(engine, scorer, prompt, item, config)
                records.write(json.dumps(done[key], ensure_ascii=False) + "\n")
                records.flush()
                os.fsync(records.fileno())
                fresh += 1
            bar.update(1)
    rows = [done[(item.task, item.id)] for item in items]
    n = len(rows)
    correct = sum(r["correct"] for r in rows)
    summary = {"file": str(taskfile.path), "n": n, "correct": correct, "acc": correct / n,
               "chance": sum(1 / len(item.labels) for item in items) / n,
               "acc_ci95": wilson_interval(correct, n), "malformed_rows": taskfile.bad_rows,
               "questions_per_s": fresh / max(time.monotonic() - started, 1e-9) if fresh else None,
               "prompt_example": example_prompt}
    if config.mode == "loglik":
        correct_norm = sum(r["correct_norm"] for r in rows)
        summary |= {"correct_norm": correct_norm, "acc_norm": correct_norm / n,
                    "acc_norm_ci95": wilson_interval(correct_norm, n)}
    else:
        summary["unparseable"] = sum(r["predicted"] is None for r in rows)
    return summary


def _score(engine, scorer, prompt, item, config) -> dict:
    record = {"task": item.task, "id": item.id, "answer": item.answer}
    if scorer is not None:
        with engine._lock:
            scored = scorer.score(prompt, item)
        return record | {"predicted": scored.predicted, "predicted_norm": scored.predicted_norm,
                         "logprobs": dict(zip(item.labels, scored.logprobs, strict=True)),
                         "correct": scored.predicted == item.answer, "correct_norm": scored.predicted_norm == item.answer}
    answer = engine.submit(item.question, max_tokens=GENERATE_TOKENS, stop=["\n\n"], prompt=prompt.context,
                           prompt_special_tokens=prompt.special_tokens).result()
    predicted = parse_answer(answer.body, item) if answer.finish_reason != "safety" else None
    return record | {"predicted": predicted, "generated": answer.body, "finish_reason": answer.finish_reason,
                     "correct": predicted == item.answer}
