"""The edge engine against bare llama-cpp-python on one tiny GGUF, in one run.

1. Overhead: tokens/s and time-to-first-token through ``Engine`` versus bare llama-cpp-python with
   the same settings, model, prompt, greedy sampling and token count, all cold (context cleared
   before every request).  Two baselines: ``Llama.generate`` decoding each token to text (the least
   work that streams text; the target engine / bare >= 0.97 is held against this one) and
   ``Llama.create_completion(stream=True)`` (what most callers use; much slower per token).
2. Warm prefix: time-to-first-token with the fixed preamble (a few hundred tokens) restored from
   the warm-prefix state versus evaluated cold.  Target: warm <= cold / 5.

Each contender runs in its own process, interleaved over several rounds; figures are medians.
Time-to-first-token is from the call to the first generated token: for the engine, the request's
queue wait plus its internal first-token time (its first *text* can come a token later, when the
first token is only the leading space it strips); tokens/s from the first streamed text to the end.

    python benchmarks/runtime_bench.py [--workdir DIR] [--rounds N] [--runs N] [--tokens N] [--json]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from jee1.convert.pipeline import ConvertOptions, convert
from jee1.convert.quant_types import quant_type
from jee1.convert.tiny import AdapterSpec, TinySpec, build_adapter, build_checkpoint
from jee1.edge.engine import Engine
from jee1.edge.settings import Settings
from jee1.llama_backend import clear_context, load_llama

QUESTION = "Which enzyme does aspirin inhibit?"
# A realistic fixed preamble of a few hundred tokens: the device's instructions to the model.
LONG_PREAMBLE = " ".join([
    "You are SM70, the offline medical assistant of the JEE1 device, used by clinicians, students and patients.",
    "Answer the question truthfully, concisely and in plain language, as a careful physician would.",
    "State the most likely answer first, then the reasoning in two or three sentences.",
    "When the question concerns a drug, give the usual adult dose range only when you are certain of it,",
    "mention the main contraindications and interactions, and never invent a dose or a brand name.",
    "When the question describes symptoms, say which findings would need urgent assessment.",
    "When the evidence is uncertain or guidelines differ between countries, say so explicitly.",
    "Do not give a diagnosis for a real person; explain what a clinician would consider and why.",
    "Use SI units, write drug names in their international non-proprietary form,",
    "and prefer recommendations from current international guidelines over older practice.",
])


def bare_generate(llama, prompt: str, n_tokens: int):
    """The leanest streaming loop llama-cpp-python offers: generate() + one detokenize per token."""
    tokens = llama.tokenize(prompt.encode(), add_bos=True, special=False)
    for i, token in enumerate(llama.generate(tokens, temp=0.0, top_k=1, top_p=1.0, min_p=0.0, repeat_penalty=1.0)):
        yield llama.detokenize([token])
        if i + 1 == n_tokens:
            return


def timed_stream(chunks) -> tuple[float, float, int]:
    """(seconds to first text, seconds from first text to the end, chunks) of a stream started now."""
    start = time.perf_counter()
    first, count = None, 0
    for _ in chunks:
        count += 1
        if first is None:
            first = time.perf_counter()
    end = time.perf_counter()
    return first - start, end - first, count


def settings_for(model: Path, work: Path, threads: int, tokens: int, **answer) -> Settings:
    return Settings.load(overrides={
        "model": {"path": str(model), "require_protected": False}, "cache": {"dir": str(work / "cache"), "warm_prefix": answer.pop("warm", False)},
        "audit": {"path": str(work / "audit.jsonl")},
        "runtime": {"n_ctx": 1024, "threads": threads, "batch": 512, "seed": 0},
        "answer": {"max_tokens": tokens, "stop": [], "deadline_s": 600.0, **answer}})


def measure(kind: str, model: Path, work: Path, runs: int, tokens: int, threads: int) -> dict:
    """One contender in its own process: (ttft seconds, seconds after first text) per run."""
    results = []
    if kind == "bare":
        with Engine(settings_for(model, work, threads, tokens)) as engine:
            prompt = engine.layout.build(QUESTION)
        llama = load_llama(model, n_ctx=1024, n_threads=threads, n_batch=512, seed=0)
        for _ in range(runs):
            clear_context(llama)
            first, rest, _ = timed_stream(bare_generate(llama, prompt, tokens))
            results.append((first, rest))
        for _ in range(max(1, runs // 3)):
            clear_context(llama)
            first, rest, _ = timed_stream(llama.create_completion(prompt, max_tokens=tokens, temperature=0.0,
                                                                  top_k=1, stream=True, stop=[]))
            results.append((first, rest, "create_completion"))
        llama.close()
    elif kind == "engine":
        with Engine(settings_for(model, work, threads, tokens)) as engine:
            for _ in range(runs):
                with engine._lock:
                    clear_context(engine.llama)
                request = engine.submit(QUESTION)
                _, rest, _ = timed_stream(request)
                answer = request.answer
                assert answer.completion_tokens == tokens, answer
                results.append((answer.queue_s + answer.ttft_s, rest))
    else:  # warm / cold time to first token with the long preamble
        warm = kind == "warm"
        with Engine(settings_for(model, work, threads, 1, preamble=LONG_PREAMBLE, warm=warm)) as engine:
            for _ in range(runs):
                with engine._lock:
                    clear_context(engine.llama)
                    if warm:
                        engine.warm.restore()   # as after a restart: the prefix comes from the saved state
                request = engine.submit(QUESTION)
                answer = request.result()
                results.append((answer.queue_s + answer.ttft_s, 0.0))
            extra = {"prefix_tokens": len(engine.prefix_tokens), "prompt_tokens": answer.prompt_tokens,
                     "cached_tokens": answer.cached_tokens}
        return {"runs": results, **extra}
    return {"runs": results}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path)
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds, each a fresh process per contender")
    parser.add_argument("--runs", type=int, default=5, help="requests per contender per round")
    parser.add_argument("--tokens", type=int, default=256, help="tokens generated per request")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--measure", choices=["bare", "engine", "warm", "cold"], help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.measure:  # child process: one contender
        print(json.dumps(measure(args.measure, args.workdir / "tiny.Q4_K_M.gguf", args.workdir, args.runs,
                                 args.tokens, args.threads)))
        return 0

    work = Path(args.workdir or tempfile.mkdtemp(prefix="jee1-runtime-bench-"))
    try:
        work.mkdir(parents=True, exist_ok=True)
        base = build_checkpoint(work / "base", TinySpec())
        adapter = build_adapter(work / "adapter", TinySpec(), AdapterSpec())
        convert(ConvertOptions(base_dir=base, adapter_dir=adapter, output=work / "tiny.Q4_K_M.gguf",
                               quant=quant_type("Q4_K_M"), quiet=True))
        # Each contender runs in its own process: two llama.cpp contexts driven from different
        # threads of one process fight over the CPU (each has its own OpenMP team) and run ~10x slower.
        collected: dict[str, list] = {"bare": [], "engine": [], "warm": [], "cold": []}
        extra = {}
        for _ in range(args.rounds):
            for kind in collected:
                out = subprocess.run([sys.executable, __file__, "--measure", kind, "--workdir", str(work),
                                      "--runs", str(args.runs), "--tokens", str(args.tokens),
                                      "--threads", str(args.threads)], capture_output=True, text=True, check=True)
                data = json.loads(out.stdout.strip().splitlines()[-1])
                collected[kind] += data.pop("runs")
                extra[kind] = data
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)

    def rate(runs):
        return statistics.median((args.tokens - 1) / r[1] for r in runs)

    def ttft(runs):
        return statistics.median(r[0] for r in runs)

    bare = [r for r in collected["bare"] if len(r) == 2]
    completion = [r for r in collected["bare"] if len(r) == 3]
    ours = collected["engine"]
    figures = {
        "tokens_per_request": args.tokens, "requests_per_contender": len(ours), "threads": args.threads,
        "bare_tokens_per_s": round(rate(bare), 1), "engine_tokens_per_s": round(rate(ours), 1),
        "ratio_tokens_per_s": round(rate(ours) / rate(bare), 3),
        "bare_ttft_ms": round(ttft(bare) * 1e3, 3), "engine_ttft_ms": round(ttft(ours) * 1e3, 3),
        "ratio_ttft_bare_over_engine": round(ttft(bare) / ttft(ours), 3),
        "create_completion_tokens_per_s": round(rate(completion), 1),
        "create_completion_ttft_ms": round(ttft(completion) * 1e3, 3),
        "preamble_tokens": extra["warm"]["prefix_tokens"], "prompt_tokens": extra["warm"]["prompt_tokens"],
        "warm_cached_tokens": extra["warm"]["cached_tokens"], "cold_cached_tokens": extra["cold"]["cached_tokens"],
        "cold_ttft_ms": round(ttft(collected["cold"]) * 1e3, 3), "warm_ttft_ms": round(ttft(collected["warm"]) * 1e3, 3),
    }
    figures["warm_over_cold"] = round(figures["warm_ttft_ms"] / figures["cold_ttft_ms"], 3)
    ok = figures["ratio_tokens_per_s"] >= 0.97 and figures["ratio_ttft_bare_over_engine"] >= 0.97 \
        and figures["warm_over_cold"] <= 0.2
    if args.json:
        print(json.dumps(figures | {"targets_met": ok}, indent=2))
    else:
        f = figures
        print(f"tokens/s       bare generate() {f['bare_tokens_per_s']:9.1f}   engine {f['engine_tokens_per_s']:9.1f}"
              f"   engine/bare {f['ratio_tokens_per_s']:.3f}  (target >= 0.97)"
              f"   [create_completion {f['create_completion_tokens_per_s']:.1f}]")
        print(f"TTFT (cold)    bare generate() {f['bare_ttft_ms']:8.2f} ms  engine {f['engine_ttft_ms']:8.2f} ms"
              f"  bare/engine {f['ratio_ttft_bare_over_engine']:.3f}  (target >= 0.97)"
              f"   [create_completion {f['create_completion_ttft_ms']:.2f} ms]")
        print(f"warm prefix    {f['preamble_tokens']} of {f['prompt_tokens']} prompt tokens: cold {f['cold_ttft_ms']:.2f} ms,"
              f" warm {f['warm_ttft_ms']:.2f} ms, warm/cold {f['warm_over_cold']:.3f}  (target <= 0.2)")
        print("targets met" if ok else "TARGET MISSED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
