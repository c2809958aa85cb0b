"""The engine on the tiny Q4_K_M model: streaming, limits, cancellation, queue, warm prefix, status."""

import gc
import json
import re
import time

import numpy as np
import pytest

from conftest import engine_settings, running_engine
from helpers import stream_and_cancel
from jee1.edge.engine import _INVISIBLE, Busy, Engine, _Stream

QUESTION = "Which enzyme does aspirin inhibit?"


def test_stream_order_equals_final_text(engine):
    request = engine.submit(QUESTION)
    chunks = []
    for text in request:
        if not chunks:
            assert request.answer is None  # text arrives before the request is finished
        chunks.append(text)
    answer = request.answer
    assert len(chunks) >= 2 and "".join(chunks) == answer.text
    assert answer.text.startswith(answer.body) and answer.text.endswith(engine.policy.disclaimer)
    assert answer.finish_reason == "truncated" and answer.truncated_by == "max_tokens"
    assert answer.completion_tokens == 64
    assert answer.cached_tokens == len(engine.prefix_tokens) < answer.prompt_tokens


@pytest.mark.parametrize("text", ["é", "💊", "naïve café ✓"])
def test_utf8_split_across_tokens_is_never_broken(text):
    stream = _Stream(stop=[])
    raw = text.encode()
    out = "".join(stream.feed(raw[i:i + 1]) for i in range(len(raw))) + stream.feed(b"", final=True)
    assert out == text and "\ufffd" not in out


def test_stop_sequence_split_across_tokens_is_held_back():
    stream = _Stream(stop=["### Instruction:"])
    pieces = [b" Adrenaline", b" first.\n\n#", b"## Instr", b"uction: more"]
    sent = "".join(stream.feed(p) for p in pieces)
    assert stream.stopped and sent + stream.feed(b"", final=True) == "Adrenaline first."


def test_deadline_truncates(engine):
    answer = engine.ask(QUESTION, max_tokens=900, deadline_s=0.02)
    assert answer.finish_reason == "truncated" and answer.truncated_by == "deadline"
    assert 0 < answer.completion_tokens < 900
    assert engine.policy.truncated_notice in answer.text


def test_cancel_mid_stream_then_answer_again(engine):
    request = engine.submit(QUESTION, max_tokens=900, deadline_s=60)
    streamed, at_cancel = stream_and_cancel(request, after_pieces=3)
    answer = request.answer
    assert answer.finish_reason == "cancelled"
    assert answer.completion_tokens - at_cancel <= 1  # takes effect within one token
    assert answer.text == answer.body == streamed     # a cancelled answer is exactly what was sent
    assert answer.completion_tokens <= request._job.generated
    again = engine.ask(QUESTION)
    assert again.finish_reason == "truncated" and again.completion_tokens == 64


def test_busy_queue_answers_immediately(engine):
    first = engine.submit(QUESTION, max_tokens=900, deadline_s=60)
    waiting, refused = [], 0
    for _ in range(6):
        started = time.monotonic()
        try:
            waiting.append(engine.submit(QUESTION, max_tokens=900, deadline_s=60))
        except Busy as e:
            assert time.monotonic() - started < 0.05 and "busy" in str(e)
            refused += 1
    assert refused >= 6 - engine._queue.maxsize - 1
    for request in [first, *waiting]:
        request.cancel()
    for request in [first, *waiting]:
        assert request.result(timeout=30).finish_reason in ("cancelled", "truncated", "complete")
    assert engine.status()["requests_refused_busy"] >= refused


def test_a_caller_that_disappears_does_not_wedge_the_engine(engine):
    request = engine.submit(QUESTION, max_tokens=900, deadline_s=60)
    job = request._job
    del request
    gc.collect()
    assert job.cancelled.is_set()
    started = time.monotonic()
    assert engine.ask(QUESTION).completion_tokens == 64
    assert time.monotonic() - started < 10


def test_red_flag_short_circuits_without_the_model(engine):
    before = engine.status()
    answer = engine.ask("my wife is gasping for air and her lips look grey")
    assert answer.finish_reason == "safety" and answer.decision["category"] == "breathing"
    assert answer.text.startswith("This sounds like it could be a medical emergency")
    assert answer.completion_tokens == 0 and answer.prompt_tokens == 0
    assert engine.status()["safety_short_circuits"] == before["safety_short_circuits"] + 1


def test_a_failing_request_leaves_the_engine_ready(engine):
    from jee1.errors import QuestionTooLong

    with pytest.raises(QuestionTooLong, match="a question may be about"):
        engine.ask("aspirin " * 600)                  # refused at once: it cannot fit the context
    failed = engine.ask("aspirin", prompt="aspirin " * 600)   # a complete prompt fails in the worker
    assert failed.finish_reason == "error" and "too long" in failed.error
    assert engine.ask(QUESTION).completion_tokens == 64
    records = [json.loads(line) for line in engine.audit.path.read_text().splitlines()]
    assert any(r["event"] == "answer" and r["request_id"] == failed.request_id and r["finish_reason"] == "error"
               and "too long" in r["error"] for r in records)


def test_empty_question_is_refused(engine):
    from jee1.errors import InputError

    with pytest.raises(InputError, match="empty"):
        engine.submit("   ")


def test_status_reports_the_model_and_counters(engine):
    engine.ask(QUESTION)
    st = engine.status()
    assert st["model"].endswith(".gguf") and len(st["sha256"]) == 64 and st["quant"] == "Q4_K_M"
    assert st["gpu_layers"] == 0 and st["total_layers"] == 3 and st["offload"] == "cpu"
    assert st["context"] == 1024 and st["memory_rss_bytes"] > 0 and st["uptime_s"] >= 0
    assert st["requests_served"] >= 1 and st["last_tokens_per_s"] > 0 and st["last_ttft_s"] > 0
    assert st["warm_prefix"] in ("evaluated", "disk")


def _last_logits(llama):
    return np.ctypeslib.as_array(llama._ctx.get_logits_ith(-1), shape=(llama.n_vocab(),)).copy()


def test_warm_prefix_gives_the_same_first_token_logits_as_cold(tmp_path, q4_merged):
    settings = engine_settings(q4_merged.output, tmp_path)
    with Engine(settings) as warm_engine:
        assert warm_engine.warm.source == "evaluated"
        llama = warm_engine.llama
        prompt = warm_engine._tokenize(warm_engine.layout.build(QUESTION), bos=True)
        n = len(warm_engine.prefix_tokens)
        assert prompt[:n] == warm_engine.prefix_tokens
        with warm_engine._lock:
            llama.reset()
            llama._ctx.kv_cache_seq_rm(-1, 0, -1)
            llama.eval(prompt)                       # cold: the whole prompt
            cold = _last_logits(llama)
            assert warm_engine.warm.restore() and llama.n_tokens == n
            llama.eval(prompt[n:])                   # warm: prefix restored, question only
            warm = _last_logits(llama)
    np.testing.assert_allclose(warm, cold, atol=1e-3)
    assert warm.argmax() == cold.argmax()
    with Engine(settings) as from_disk:               # next start: the state comes from disk
        assert from_disk.warm.source == "disk"
        with from_disk._lock:
            assert from_disk.warm.restore()
            from_disk.llama.eval(prompt[n:])
            np.testing.assert_allclose(_last_logits(from_disk.llama), cold, atol=1e-3)


def test_pre_model_short_circuit_can_be_switched_off(tmp_path, q4_merged):
    settings = engine_settings(q4_merged.output, tmp_path, safety={"pre_model": False}, answer={"max_tokens": 8})
    with Engine(settings) as eng:
        answer = eng.ask("my wife is gasping for air and her lips look grey")
        assert answer.finish_reason != "safety" and answer.completion_tokens > 0
        assert answer.decision["pre_model"] is False and eng.status()["pre_model_safety"] is False
    records = [json.loads(line) for line in (tmp_path / "audit.jsonl").read_text().splitlines()]
    assert records[0]["event"] == "engine_start" and records[0]["pre_model_safety"] is False


def test_audit_log_records_decisions_and_hashes_text(tmp_path, q4_merged):
    settings = engine_settings(q4_merged.output, tmp_path, answer={"max_tokens": 8},
                               safety={"emergency_number": "999", "crisis_line": "988"})
    with Engine(settings) as eng:
        eng.ask(QUESTION)
        crisis = eng.ask("I want to kill myself")
        emergency = eng.ask("my husband collapsed and isnt breathing")
        notice = eng.ask("mi hijo no puede respirar y tiene los labios azules")
    assert "988" in crisis.text and crisis.decision["kind"] == "crisis"
    assert "999" in emergency.text and emergency.decision["kind"] == "emergency"
    assert notice.finish_reason == "safety" and "English only" in notice.text and "999" in notice.text
    assert notice.completion_tokens == 0 and notice.decision["red_flag"] is False
    records = [json.loads(line) for line in (tmp_path / "audit.jsonl").read_text().splitlines()]
    answers = [r for r in records if r["event"] == "answer"]
    assert [r["red_flag"] for r in answers] == [False, True, True, False]
    assert answers[1]["rule"] == "crisis.suicidal_intent" and answers[1]["finish_reason"] == "safety"
    assert (answers[1]["kind"], answers[1]["category"]) == ("crisis", "self_harm")
    assert (answers[2]["kind"], answers[2]["category"]) == ("emergency", "collapse")
    assert all(r["question"].startswith("hmac-sha256:") and r["answer"].startswith("hmac-sha256:") for r in answers)
    import hashlib

    assert hashlib.sha256(b"I want to kill myself").hexdigest() not in (tmp_path / "audit.jsonl").read_text()
    key = tmp_path / "cache" / "audit.key"
    assert key.stat().st_mode & 0o777 == 0o600 and len(key.read_bytes()) == 32
    log = (tmp_path / "audit.jsonl").read_text()
    assert "aspirin" not in log and "kill myself" not in log and "isnt breathing" not in log   # the patient's words
    assert {"request_id", "ttft_s", "total_s", "prompt_tokens", "completion_tokens"} <= set(answers[0])


def test_audit_log_keeps_text_when_configured_and_rotates(tmp_path, q4_merged):
    settings = engine_settings(q4_merged.output, tmp_path, answer={"max_tokens": 4},
                               audit={"log_text": True, "max_bytes": 2000, "backups": 2})
    with Engine(settings) as eng:
        for _ in range(8):
            eng.ask(QUESTION)
    assert QUESTION in (tmp_path / "audit.jsonl").read_text()
    assert (tmp_path / "audit.jsonl.1").is_file() and not (tmp_path / "audit.jsonl.3").exists()


from hypothesis import given, settings as hsettings, strategies as st  # noqa: E402


@hsettings(max_examples=300, deadline=None)
@given(text=st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=60),
       cuts=st.lists(st.integers(min_value=0, max_value=240), max_size=12),
       stop=st.sampled_from([[], ["###"], ["\n\n", "END"]]))
def test_stream_reassembles_any_split(text, cuts, stop):
    """Whatever the token boundaries (even inside a UTF-8 sequence), what is sent is exactly the
    text without control and invisible format characters, stripped, cut before the first stop
    sequence."""
    raw = text.encode()
    bounds = sorted({c % (len(raw) + 1) for c in cuts} | {0, len(raw)})
    stream = _Stream(stop)
    sent = "".join(stream.feed(raw[a:b]) for a, b in zip(bounds, bounds[1:], strict=False))
    sent += stream.feed(b"", final=True)
    expected = text.translate(_INVISIBLE).lstrip()
    assert not set(sent) & {chr(c) for c in _INVISIBLE}
    # the earliest stop wins; a stop inside leading whitespace was stripped with it
    cut = min((expected.index(s) for s in stop if s in expected), default=len(expected))
    assert sent == expected[:cut].rstrip() and sent == stream.text


def test_control_and_invisible_characters_never_leave_the_engine():
    stream = _Stream([])
    raw = "Take\x1c aspirin\u202e daily\x00\r\n\tthen \u200brest\x85.".encode()
    sent = "".join(stream.feed(raw[i:i + 3]) for i in range(0, len(raw), 3)) + stream.feed(b"", final=True)
    assert sent == "Take aspirin daily\n\tthen rest."


def test_a_full_audit_disk_degrades_the_log_but_never_the_answers(tmp_path, small_tmpfs, q4_merged):
    """The policy: keep answering, count lost records, report the degraded state, recover by itself."""
    from conftest import fill_up

    settings = engine_settings(q4_merged.output, tmp_path, answer={"max_tokens": 4},
                               audit={"path": str(small_tmpfs / "audit.jsonl")})
    with Engine(settings) as eng:
        filler = fill_up(small_tmpfs)
        for _ in range(40):                      # the log file's last page may take a few records first
            assert eng.ask(QUESTION).completion_tokens > 0
            if eng.status()["audit_degraded"]:
                break
        status = eng.status()
        assert status["audit_degraded"] and status["audit_lost_records"] >= 1
        assert eng.ask("I want to kill myself").finish_reason == "safety"      # the screen still answers
        filler.unlink()
        eng.ask(QUESTION)
        assert not eng.status()["audit_degraded"]
        lost = eng.status()["audit_lost_records"]
    assert '"event": "engine_stop"' in (small_tmpfs / "audit.jsonl").read_text() and lost >= 2


def test_a_looping_answer_streams_then_is_replaced_as_its_own_event(tmp_path, stuck_model):
    """The looping text streams as it comes (holding it back would cost minutes at 3 tokens/s);
    the replacement then arrives as one 'replace' event, and the answer's text is the replacement alone."""
    with running_engine(tmp_path, stuck_model, answer={"max_tokens": 64}) as engine:
        request = engine.submit("What is the antidote for heparin?")
        events = list(request.events())
        answer = request.answer
        assert answer.replaced and answer.body.startswith("idid")
        assert [kind for kind, _ in events][-1] == "replace" and {kind for kind, _ in events[:-1]} == {"text"}
        assert "".join(text for _, text in events[:-1]) == answer.body
        assert events[-1][1] == answer.text and answer.text.startswith(engine.policy.could_not_answer)
        terminal = "".join(engine.submit("What is the antidote for heparin?"))   # a terminal shows both
        assert terminal == answer.body + "\n\n" + answer.text


def test_the_question_too_long_refusal_names_the_length_that_actually_fits(engine):
    """The figure in the refusal is what a question may be: the template around it counted, so a
    question of that many tokens fits and one a few tokens longer does not."""
    from jee1.errors import QuestionTooLong

    with pytest.raises(QuestionTooLong) as refused:
        engine.submit("dose " * 5000)
    allowed = int(re.search(r"a question may be about (\d+) tokens", str(refused.value)).group(1))
    lo, hi = 1, 4 * allowed                 # the most repetitions whose prompt still fits
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if len(engine._prompt_tokens("dose " * mid, None, False)) <= engine.llama.n_ctx() - 16 \
            else (lo, mid - 1)
    longest = len(engine._tokenize("dose " * lo, bos=False))
    assert abs(longest - allowed) <= 2, (longest, allowed)
