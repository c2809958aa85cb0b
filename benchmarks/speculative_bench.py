"""Speculative decoding in the engine: measured speed-up against the one its speed model predicts.

One run, one target, the same prompts and token budget for every mode:

* plain greedy decoding (the baseline);
* drafts that agree with the target more or less: the target itself (alpha = 1, costs as much as
  the target), the target's own Q8_0 and Q4_K_M quantizations (cheap, agree often), a small
  random model on the same vocabulary (cheap, agrees almost never), and prompt lookup (free).

For each: tokens/s, the acceptance rate (drafted tokens the target kept, as llama.cpp reports it)
and the per-token alpha it implies, tokens per target
step, the draft's cost per token relative to the target's (c, timed on its own), and the
speed-up the standard model predicts next to the one measured:

    E[tokens per step] = (1 - alpha^(k+1)) / (1 - alpha)            (i.i.d. acceptance)
    cost per step      = k * c + b(k+1)                              (in target-token times)
    predicted speed-up = E / (k * c + b)

where b(k+1) is the measured time of one target batch of k+1 tokens over one single-token step
(1 on a purely bandwidth-bound device; more on a CPU, where a batch costs compute).

The models are synthetic Llama-2 checkpoints (random weights): their next-token distributions are
flatter than a trained model's, so the acceptance rates here say nothing about real ones.  The
target's output layer is scaled up (``output_gain``) so its argmax is stable enough for its own
quantizations to agree with it often: the point is a range of alpha and c on which to check the
model, not a claim about SM70 (docs/performance.md projects the device from published rates).

    python benchmarks/speculative_bench.py [--workdir DIR] [--tokens N] [--prompts N] [-k K] [--json]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

from jee1.convert.pipeline import ConvertOptions, convert
from jee1.convert.quant_types import quant_type
from jee1.convert.tiny import TinySpec, build_checkpoint, train_tokenizer
from jee1.edge.engine import Engine
from jee1.edge.settings import Settings
from jee1.llama_backend import evaluate, last_logits, load_llama, rewind

QUESTIONS = ["What is the first-line treatment for community-acquired pneumonia in adults?",
             "How does metformin lower blood glucose?", "Which findings suggest a subarachnoid haemorrhage?",
             "What are the contraindications to thrombolysis in ischaemic stroke?",
             "Explain the mechanism of action of ACE inhibitors.", "How is iron-deficiency anaemia investigated?",
             "What causes a prolonged QT interval?", "When is a chest drain indicated in pneumothorax?"]


def expected_tokens(alpha: float, k: int) -> float:
    """Tokens per target step when each drafted token is kept with probability alpha, independently."""
    return k + 1.0 if alpha >= 1 else (1 - alpha ** (k + 1)) / (1 - alpha)


def token_alpha(rate: float, k: int) -> float:
    """The per-token alpha whose expected kept share of k drafted tokens is ``rate`` (what engines,
    llama.cpp's included, report as the acceptance rate: accepted / drafted)."""
    lo, hi = 0.0, 1.0
    for _ in range(60):
        mid = (lo + hi) / 2
        if (expected_tokens(mid, k) - 1) / k < rate:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


def predicted_speedup(alpha: float, c: float, b: float, k: int) -> float:
    return expected_tokens(alpha, k) / (k * c + b)


def per_token_seconds(path: Path, threads: int, tokens: int = 48) -> float:
    """One model's time per single-token decode step (greedy, from a short prompt)."""
    llama = load_llama(path, n_ctx=512, n_threads=threads, seed=0)
    try:
        evaluate(llama, [1, 5, 9, 13])
        start = time.perf_counter()
        for _ in range(tokens):
            evaluate(llama, [int(last_logits(llama).argmax())])
        return (time.perf_counter() - start) / tokens
    finally:
        llama.close()


def batch_ratio(path: Path, threads: int, k: int, repeats: int = 24) -> float:
    """b(k+1): one target step verifying k drafted tokens over one single-token step."""
    llama = load_llama(path, n_ctx=512, n_threads=threads, seed=0, logits_all=True)
    try:
        evaluate(llama, list(range(1, 65)))
        timings = {}
        for n in (1, k + 1):
            start = time.perf_counter()
            for _ in range(repeats):
                rewind(llama, 64)
                evaluate(llama, list(range(100, 100 + n)))
            timings[n] = (time.perf_counter() - start) / repeats
        return timings[k + 1] / timings[1]
    finally:
        llama.close()


def run_engine(target: Path, work: Path, threads: int, tokens: int, prompts: list[str], runtime: dict) -> dict:
    settings = Settings.load(overrides={
        "model": {"path": str(target), "require_protected": False}, "cache": {"dir": str(work / "cache")},
        "audit": {"path": str(work / "audit.jsonl")}, "safety": {"pre_model": False},
        "runtime": {"threads": threads, "n_ctx": 1024, **runtime}})
    with Engine(settings) as engine:
        engine.ask(prompts[0], max_tokens=4)                       # warm up (page cache, first decode)
        generated, seconds, bodies = 0, 0.0, []
        for prompt in prompts:
            answer = engine.ask(prompt, max_tokens=tokens, deadline_s=600)
            generated += answer.completion_tokens - 1
            seconds += answer.total_s - answer.ttft_s
            bodies.append(answer.body)
        status = engine.status()
    return {"tokens_per_s": generated / seconds, "alpha": status["draft_acceptance_rate"],
            "tokens_per_target_step": status["tokens_per_target_step"], "bodies": bodies}


def build(work: Path, threads: int) -> dict[str, Path]:
    tokenizer = work / "tokenizer.model"
    if not tokenizer.exists():
        tokenizer = train_tokenizer(work, 512)
    target_spec = TinySpec(hidden_size=1024, intermediate_size=2816, num_hidden_layers=24, num_attention_heads=16,
                           num_key_value_heads=4, vocab_size=512, max_position_embeddings=1024, shards=4,
                           output_gain=24.0)
    draft_spec = TinySpec(hidden_size=256, intermediate_size=768, num_hidden_layers=4, vocab_size=512,
                          max_position_embeddings=1024, seed=7)
    target_base, small_base = work / "target", work / "small"
    if not (work / "small-random-F16.gguf").exists():
        build_checkpoint(target_base, target_spec, tokenizer=tokenizer)
        build_checkpoint(small_base, draft_spec, tokenizer=tokenizer)
    files = {}
    for name, base, quant in (("target F16", target_base, "F16"), ("target Q8_0", target_base, "Q8_0"),
                              ("target Q4_K_M", target_base, "Q4_K_M"), ("small random F16", small_base, "F16")):
        out = work / (name.replace(" ", "-") + ".gguf")
        if not out.exists():      # a --workdir kept from an earlier run is reused
            convert(ConvertOptions(base_dir=base, output=out, quant=quant_type(quant), threads=threads, quiet=True))
        files[name] = out
    return files


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, help="scratch directory (default: a temporary one, removed)")
    parser.add_argument("--tokens", type=int, default=64, help="tokens generated per prompt")
    parser.add_argument("--prompts", type=int, default=6)
    parser.add_argument("-k", "--draft-tokens", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="jee1-spec-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    k, prompts = args.draft_tokens, QUESTIONS[: args.prompts]
    try:
        print(f"building the synthetic target (24 layers, hidden 1024) and drafts in {work} ...", file=sys.stderr)
        files = build(work, args.threads)
        target = files["target F16"]
        t_target = per_token_seconds(target, args.threads)
        b = batch_ratio(target, args.threads, k)
        plain = run_engine(target, work / "plain", args.threads, args.tokens, prompts, {})
        rows = []
        modes = [("target itself", {"draft": "model", "draft_model": str(target)}, target),
                 ("target Q8_0", {"draft": "model", "draft_model": str(files["target Q8_0"])}, files["target Q8_0"]),
                 ("target Q4_K_M", {"draft": "model", "draft_model": str(files["target Q4_K_M"])},
                  files["target Q4_K_M"]),
                 ("small random model", {"draft": "model", "draft_model": str(files["small random F16"])},
                  files["small random F16"]),
                 ("prompt lookup", {"draft": "prompt-lookup"}, None)]
        for name, runtime, draft_file in modes:
            c = per_token_seconds(draft_file, args.threads) / t_target if draft_file else 0.0
            got = run_engine(target, work / name.replace(" ", "-"), args.threads, args.tokens, prompts,
                             runtime | {"draft_tokens": k})
            rate = got["alpha"] or 0.0
            alpha = token_alpha(rate, k)
            rows.append({"draft": name, "acceptance_rate": round(rate, 3), "alpha": round(alpha, 3), "c": round(c, 3),
                         "tokens_per_target_step": round(got["tokens_per_target_step"], 2),
                         "expected_tokens_per_step": round(expected_tokens(alpha, k), 2),
                         "tokens_per_s": round(got["tokens_per_s"], 2),
                         "measured_speedup": round(got["tokens_per_s"] / plain["tokens_per_s"], 3),
                         "predicted_speedup": round(predicted_speedup(alpha, c, b, k), 3),
                         # the cost model alone, with the tokens per step as measured instead of E(alpha)
                         "cost_model_speedup": round(got["tokens_per_target_step"] / (k * c + b), 3),
                         "answers_as_plain": sum(a == b for a, b in zip(got["bodies"], plain["bodies"]))})
        figures = {"target": "synthetic Llama-2, 24 layers, hidden 1024, ~300M parameters, F16",
                   "k": k, "prompts": len(prompts), "tokens_per_prompt": args.tokens, "threads": args.threads,
                   "target_ms_per_token": round(1000 * t_target, 2), "b_batch_ratio": round(b, 3),
                   "plain_tokens_per_s": round(plain["tokens_per_s"], 2), "modes": rows}
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    if args.json:
        print(json.dumps(figures, indent=2))
    else:
        print(f"target: {figures['target']}; {figures['target_ms_per_token']} ms/token alone; "
              f"b({k + 1}) = {figures['b_batch_ratio']} (one {k + 1}-token batch / one token)")
        print(f"plain greedy: {figures['plain_tokens_per_s']} tokens/s  (baseline, same run)")
        print(f"{'draft':<20} {'rate':>6} {'alpha':>6} {'c':>6} {'tok/step':>8} {'E(a)':>5} {'tok/s':>7} "
              f"{'measured':>9} {'predicted':>9} {'cost-only':>9}  answers as plain")
        for r in rows:
            print(f"{r['draft']:<20} {r['acceptance_rate']:>6.3f} {r['alpha']:>6.3f} {r['c']:>6.3f} "
                  f"{r['tokens_per_target_step']:>8.2f} {r['expected_tokens_per_step']:>5.2f} "
                  f"{r['tokens_per_s']:>7.2f} {r['measured_speedup']:>8.3f}x {r['predicted_speedup']:>8.3f}x "
                  f"{r['cost_model_speedup']:>8.3f}x  "
                  f"{r['answers_as_plain']}/{len(prompts)}")
        print("An answer that differs from plain decoding differs at a near-tie of the target's top two logits, "
              "where a batch of k+1 tokens rounds differently from one token (tests/test_speculative.py).")
    return 0


if __name__ == "__main__":
    sys.exit(main())
