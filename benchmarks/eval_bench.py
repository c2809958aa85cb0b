"""jee1 eval's log-likelihood scoring speed on the tiny model: questions/s with the shared-prompt
KV cache (the context evaluated once per question and reused across its options and across the
few-shot prefix of consecutive questions) against re-evaluating the context for every option.
Both in this process, same engine, same questions, interleaved; medians.

    python benchmarks/eval_bench.py [--questions N] [--shots K] [--rounds R] [--json]
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

from jee1.convert.pipeline import ConvertOptions, convert
from jee1.convert.quant_types import quant_type
from jee1.convert.tiny import AdapterSpec, TinySpec, build_adapter, build_checkpoint
from jee1.edge.engine import Engine
from jee1.edge.eval.prompting import FewshotSampler, PromptStyle
from jee1.edge.eval.scoring import LoglikScorer
from jee1.edge.eval.tasks import Item
from jee1.edge.settings import Settings
from jee1.llama_backend import rewind

WORDS = ("aspirin heparin insulin metformin sepsis asthma stroke anaemia warfarin lithium gout "
         "pneumonia troponin ferritin thyroid dialysis").split()


def synthetic_items(n: int, seed: int) -> list[Item]:
    rng = random.Random(seed)
    items = []
    for i in range(n):
        q = f"A patient with {rng.choice(WORDS)} and {rng.choice(WORDS)} needs which treatment?"
        options = tuple(" ".join(rng.sample(WORDS, 3)) for _ in range(4))
        items.append(Item("medqa", f"q{i}", q, tuple("ABCD"), options, rng.choice("ABCD")))
    return items


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--questions", type=int, default=40)
    parser.add_argument("--shots", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="jee1-eval-bench-") as tmp:
        work = Path(tmp)
        model = convert(ConvertOptions(base_dir=build_checkpoint(work / "base", TinySpec()),
                                       adapter_dir=build_adapter(work / "ad", TinySpec(), AdapterSpec()),
                                       output=work / "tiny.Q4_K_M.gguf", quant=quant_type("Q4_K_M"), quiet=True)).output
        settings = Settings.load(overrides={"model": {"path": str(model), "require_protected": False}, "cache": {"dir": str(work / "c")},
                                            "audit": {"path": str(work / "a.jsonl")},
                                            "runtime": {"n_ctx": 2048, "threads": 2}, "safety": {"pre_model": False}})
        items = synthetic_items(args.questions, 1)
        pool = synthetic_items(20, 2)
        style = PromptStyle("harness")
        # one draw for every question: the shared few-shot prefix is what the KV-cache reuse is measured on
        shots = FewshotSampler(pool, args.shots, 1234, same_file=False).draw(items[0])
        prompts = [(style.build(item, shots), item) for item in items]
        rates = {True: [], False: []}
        with Engine(settings) as engine, engine._lock:
            for _ in range(args.rounds):
                for reuse in (True, False):
                    scorer = LoglikScorer(engine.llama, reuse_cache=reuse)
                    rewind(engine.llama, 0)
                    start = time.perf_counter()
                    for prompt, item in prompts:
                        scorer.score(prompt, item)
                    rates[reuse].append(len(prompts) / (time.perf_counter() - start))
            context_tokens = len(engine.llama.tokenize(prompts[0][0].context.encode(), add_bos=True))
    cached, fresh = statistics.median(rates[True]), statistics.median(rates[False])
    figures = {"questions": args.questions, "k_shot": args.shots, "context_tokens": context_tokens,
               "questions_per_s_shared_cache": round(cached, 2), "questions_per_s_no_cache": round(fresh, 2),
               "speedup": round(cached / fresh, 2)}
    if args.json:
        print(json.dumps(figures, indent=2))
    else:
        print(f"{args.shots}-shot MedQA-style prompts of ~{context_tokens} tokens, 4 options, {args.questions} questions")
        print(f"log-likelihood scoring  shared-prompt cache {cached:8.2f} q/s   no cache {fresh:8.2f} q/s   "
              f"speed-up {cached / fresh:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
