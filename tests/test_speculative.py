"""Speculative decoding gives the target's own greedy answers, with every draft kind and limit."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import engine_settings, run_convert
from helpers import stream_and_cancel
from jee1.convert.tiny import TinySpec, build_checkpoint, train_tokenizer
from jee1.edge.engine import Engine
from jee1.errors import InputError
from jee1.llama_backend import last_logits

TOPICS = ["asthma", "type 2 diabetes", "community-acquired pneumonia", "atrial fibrillation", "migraine",
          "hypothyroidism", "iron-deficiency anaemia", "gout", "heart failure", "peptic ulcer disease"]
ASKS = ["What is the first-line treatment for {}?", "How is {} diagnosed?", "What are the complications of {}?",
        "Which drugs should be avoided in {}?", "Explain the pathophysiology of {} to a medical student."]
PROMPTS = [ask.format(topic) for topic in TOPICS for ask in ASKS]          # 50 prompts
MAX_TOKENS = 24


@pytest.fixture(scope="module")
def other_model(tmp_path_factory, tiny_tokenizer):
    """Another random model on the same vocabulary: a draft that often disagrees."""
    base = build_checkpoint(tmp_path_factory.mktemp("other"), TinySpec(seed=5), tokenizer=tiny_tokenizer)
    return run_convert(base, base / "other.F16.gguf", "F16").output


@pytest.fixture(scope="module")
def padded_model(tmp_path_factory, tiny_tokenizer):
    """The target's vocabulary plus [PAD512] after it (as some Llama fine-tunes have)."""
    base = build_checkpoint(tmp_path_factory.mktemp("padded"), TinySpec(seed=6, vocab_size=513),
                            tokenizer=tiny_tokenizer)
    return run_convert(base, base / "padded.F16.gguf", "F16").output


def answers(settings, prompts=PROMPTS, **limits):
    with Engine(settings) as engine:
        result = [engine.ask(p, max_tokens=MAX_TOKENS, **limits) for p in prompts]
        return result, engine.status()


@pytest.fixture(scope="module")
def plain(tmp_path_factory, f16_merged):
    work = tmp_path_factory.mktemp("plain")
    return answers(engine_settings(f16_merged.output, work, safety={"pre_model": False}))[0]


def drafted(tmp_path, target, draft, **runtime):
    rt = {"draft": "prompt-lookup"} if draft == "prompt-lookup" else {"draft": "model", "draft_model": str(draft)}
    return engine_settings(target, tmp_path, runtime=rt | runtime, safety={"pre_model": False})


@pytest.mark.parametrize("draft_kind", ["itself", "another random model", "prompt-lookup"])
def test_fifty_prompts_answer_exactly_as_plain_greedy(tmp_path, f16_merged, other_model, plain, draft_kind):
    draft = {"itself": f16_merged.output, "another random model": other_model,
             "prompt-lookup": "prompt-lookup"}[draft_kind]
    got, status = answers(drafted(tmp_path, f16_merged.output, draft))
    assert len(got) == len(PROMPTS) == 50
    differ = [(p, a.body, b.body) for p, a, b in zip(PROMPTS, plain, got) if a.body != b.body]
    assert differ == []            # no near-tie flipped here; a flip would have to be explained by its logit gap
    assert [a.completion_tokens for a in plain] == [b.completion_tokens for b in got]
    rate, per_step = status["draft_acceptance_rate"], status["tokens_per_target_step"]
    print(f"{draft_kind}: acceptance {rate}, tokens per target step {per_step:.2f}")
    if draft_kind == "itself":
        assert rate == 1.0 and per_step > 3.0        # k = 4: up to 5 tokens a step
    elif draft_kind == "another random model":
        assert rate is not None and rate < 0.5 and sum(b.draft_proposed for b in got) > 0
    else:
        assert sum(b.target_steps for b in got) <= sum(b.completion_tokens for b in got)


# A near-tie: the target's top two logits closer than this (the tiny model's logits spread about 4)
# may come out in either order between a batch of k+1 tokens and one token at a time.
NEAR_TIE = 0.05


def greedy_tokens(llama, prompt: list[int], n: int) -> list[int]:
    from jee1.llama_backend import rewind

    llama.reset()
    rewind(llama, 0)
    out = []
    for token in llama.generate(prompt, temp=0.0, top_k=1, top_p=1.0, min_p=0.0, repeat_penalty=1.0):
        out.append(token)
        if len(out) == n:
            break
    return out


def one_at_a_time(llama, prompt: list[int], n: int) -> tuple[list[int], list[float]]:
    """Plain greedy decoding one token per step, with the gap between the top two logits at each."""
    from jee1.llama_backend import evaluate, rewind

    llama.reset()
    rewind(llama, 0)
    evaluate(llama, prompt)
    tokens, gaps = [], []
    for _ in range(n):
        logits = last_logits(llama)
        first, second = np.sort(logits)[-2:][::-1]
        tokens.append(int(logits.argmax()))
        gaps.append(float(first - second))
        evaluate(llama, [tokens[-1]])
    return tokens, gaps


@pytest.mark.parametrize("draft_kind", ["itself", "another random model", "prompt-lookup"])
def test_token_sequences_equal_plain_greedy_or_differ_only_at_near_ties(f16_merged, other_model, draft_kind):
    """The token-level check: every divergence from one-at-a-time greedy decoding is reported with
    the logit gap where it happens, and only a near-tie may diverge."""
    from jee1.edge.speculative import ModelDraft, PromptLookupDraft
    from jee1.llama_backend import load_llama

    plain = load_llama(f16_merged.output, n_ctx=512, n_threads=2, seed=0)
    draft_llama = None
    if draft_kind == "prompt-lookup":
        draft = PromptLookupDraft(4)
    else:
        draft_llama = load_llama(f16_merged.output if draft_kind == "itself" else other_model, n_ctx=512,
                                 n_threads=2, seed=0)
        draft = ModelDraft(draft_llama, 4, plain.n_vocab())
    spec = load_llama(f16_merged.output, n_ctx=512, n_threads=2, seed=0, draft_model=draft)
    try:
        divergences = []
        for prompt_text in PROMPTS:
            prompt = plain.tokenize(prompt_text.encode(), add_bos=True)
            want, gaps = one_at_a_time(plain, prompt, MAX_TOKENS)
            got = greedy_tokens(spec, prompt, MAX_TOKENS)
            at = next((i for i, (a, b) in enumerate(zip(want, got)) if a != b), None)
            if at is not None:
                divergences.append((prompt_text, at, gaps[at]))
        print(f"{draft_kind}: {len(divergences)} of {len(PROMPTS)} prompts diverge; gaps there: "
              f"{[round(g, 4) for _, _, g in divergences]}; acceptance {draft.stats.accepted}/{draft.stats.proposed}")
        assert all(gap < NEAR_TIE for _, _, gap in divergences), divergences
    finally:
        for llama in (spec, plain, draft_llama):
            if llama is not None:
                llama.close()


def test_stop_sequences_max_tokens_and_deadline_as_plain(tmp_path, f16_merged, plain):
    prompts = PROMPTS[:6]
    stops = [a.body.split()[2] for a in plain[:6] if len(a.body.split()) > 3]
    settings = drafted(tmp_path / "d", f16_merged.output, f16_merged.output)
    base = engine_settings(f16_merged.output, tmp_path / "p", safety={"pre_model": False})
    for stop in stops[:3]:
        want, _ = answers(base, prompts, stop=[stop])
        got, _ = answers(settings, prompts, stop=[stop])
        assert [a.body for a in got] == [a.body for a in want]
        assert any(stop not in a.body and a.finish_reason == "complete" for a in got)
    with Engine(settings) as engine:
        short = engine.ask(PROMPTS[0], max_tokens=3)
        assert short.completion_tokens == 3 and short.truncated_by == "max_tokens"
        late = engine.ask(PROMPTS[1], max_tokens=400, deadline_s=0.001)
        assert late.finish_reason == "truncated" and late.truncated_by == "deadline"


def test_cancel_mid_draft_stops_within_one_step_and_sends_nothing_after(tmp_path, f16_merged):
    with Engine(drafted(tmp_path, f16_merged.output, f16_merged.output, draft_tokens=8)) as engine:
        request = engine.submit(PROMPTS[0], max_tokens=400, deadline_s=60)
        streamed, at_cancel = stream_and_cancel(request, after_pieces=2)
        answer = request.answer
        assert answer.finish_reason == "cancelled"
        assert answer.completion_tokens - at_cancel <= 1
        assert answer.text == streamed             # the answer is what was sent: nothing dropped, nothing more
        assert engine.ask(PROMPTS[1], max_tokens=MAX_TOKENS).finish_reason in ("complete", "truncated")


def test_draft_keeps_its_own_warm_prefix(tmp_path, f16_merged, other_model, plain):
    settings = drafted(tmp_path, f16_merged.output, other_model)
    with Engine(settings) as engine:
        assert engine.draft_warm.source == "evaluated"
        first = engine.ask(PROMPTS[0], max_tokens=MAX_TOKENS)
        assert first.cached_tokens == len(engine.prefix_tokens) > 0
    with Engine(settings) as engine:                     # the next start reads both from disk
        assert engine.warm.source == "disk" and engine.draft_warm.source == "disk"
        again = engine.ask(PROMPTS[0], max_tokens=MAX_TOKENS)
    assert first.body == again.body == plain[0].body


def test_safety_screen_answers_before_any_draft(tmp_path, f16_merged):
    settings = engine_settings(f16_merged.output, tmp_path,
                               runtime={"draft": "model", "draft_model": str(f16_merged.output)})
    with Engine(settings) as engine:
        answer = engine.ask("my husband collapsed and is not breathing")
        assert answer.finish_reason == "safety" and answer.draft_proposed == 0
        assert engine.draft.stats.steps == 0


def test_a_draft_with_another_vocabulary_is_refused(tmp_path, f16_merged):
    (tmp_path / "tok").mkdir()
    tokenizer = train_tokenizer(tmp_path / "tok", 400)
    base = build_checkpoint(tmp_path / "base", TinySpec(vocab_size=400), tokenizer=tokenizer)
    foreign = run_convert(base, tmp_path / "foreign.F16.gguf", "F16").output
    with pytest.raises(InputError, match="foreign.F16.gguf: .*share the target's vocabulary"):
        Engine(drafted(tmp_path / "w", f16_merged.output, foreign))


def test_extra_tokens_after_the_vocabulary_are_accepted_and_never_proposed(tmp_path, f16_merged, padded_model,
                                                                          plain, monkeypatch):
    import jee1.edge.speculative as speculative

    def pad_wins(llama):     # the draft's own logits, with its extra token made the largest
        logits = last_logits(llama)
        logits[512] = logits.max() + 100.0
        return logits

    monkeypatch.setattr(speculative, "last_logits", pad_wins)
    with Engine(drafted(tmp_path, f16_merged.output, padded_model)) as engine:
        assert engine.draft_llama.n_vocab() == 513 and engine.llama.n_vocab() == 512
        prompt = np.array(engine._tokenize(engine.layout.build(PROMPTS[0]), bos=True), dtype=np.intc)
        with engine._lock:
            proposals = engine.draft(prompt)
        assert len(proposals) == 4 and 512 not in proposals.tolist()
        assert engine.ask(PROMPTS[0], max_tokens=MAX_TOKENS).body == plain[0].body


def test_draft_settings_are_checked():
    from jee1.edge.settings import Settings

    with pytest.raises(InputError, match="runtime.draft 'medusa' is not one of off, model, prompt-lookup"):
        Settings.load(overrides={"runtime": {"draft": "medusa"}})
    with pytest.raises(InputError, match="needs runtime.draft_model"):
        Settings.load(overrides={"runtime": {"draft": "model"}})
    with pytest.raises(InputError, match="runtime.draft_tokens must be at least 1"):
        Settings.load(overrides={"runtime": {"draft_tokens": 0}})


def test_a_draft_without_its_manifest_is_refused_and_audited(tmp_path, f16_merged):
    import shutil

    from jee1.edge.model_check import ModelRejected

    unverified = tmp_path / "draft.gguf"
    shutil.copy(f16_merged.output, unverified)          # no draft.gguf.manifest.json beside it
    settings = drafted(tmp_path / "w", f16_merged.output, unverified)
    with pytest.raises(ModelRejected, match="draft.gguf"):
        Engine(settings)
    audit = (tmp_path / "w" / "audit.jsonl").read_text()
    assert '"model_refused"' in audit and '"role": "draft"' in audit
