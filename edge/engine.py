"""The engine: one model, many callers, one request at a time.

    engine = Engine(settings)
    request = engine.submit("What is the antidote for heparin?")   # Busy if the queue is full
    for text in request:          # streamed as the model produces it
        print(text, end="")
    answer = request.answer       # final text with disclaimer, finish reason, timings

A request is answered by a single worker thread: safety screen -> prompt -> warm prefix ->
generation with limits (max tokens, stop sequences, deadline, cancellation checked every token)
-> post-policy -> audit record.  A handle that is dropped cancels its request.
"""

from __future__ import annotations

import codecs
import logging
import os
import queue
import threading
import time
import uuid
import weakref
from dataclasses import asdict, dataclass, field
from pathlib import Path

from jee1.errors import Busy, InputError, Jee1Error, QuestionTooLong  # noqa: F401  (Busy: the engine's face)
from jee1.gguf_info import read_gguf
from jee1.llama_backend import TokenPieces, load_llama, supports_gpu_offload
from jee1.procstat import status_bytes
from jee1.prompts import load_template

from .audit import AuditLog, text_digest
from .gpu_plan import ModelShape, Plan, accelerator_free_bytes, is_unified_memory_board, plan_pair
from .model_check import ModelRejected, VersionLedger, check_model
from .prompt import PromptLayout
from .prompt_cache import WarmPrefix, cache_key
from .safety import Decision, SafetyPolicy
from .settings import KV_TYPES, Settings
from .speculative import ModelDraft, PromptLookupDraft, check_same_vocabulary

log = logging.getLogger(__name__)

LOOP_CHECK_EVERY = 16   # tokens between repetition-loop checks (the check scans the tail)
MIN_ANSWER_TOKENS = 16  # context a question must leave for the answer, or it is refused at once
# Streamed text is handed to the caller at most this often: a fast model would otherwise wake the
# caller's thread on every token, and on a small CPU that wake-up competes with llama.cpp's own
# threads (measured on the tiny model: -25% tokens/s).  A token after a quiet gap, like the first,
# is handed over at once, so time to first text is unchanged and a 3 tokens/s 70B streams per token.
STREAM_FLUSH_S = 0.02
_gpu_notice = threading.Event()


@dataclass
class Answer:
    request_id: str
    text: str                    # what the user sees: answer (or fixed message) + notices + disclaimer
    body: str                    # the model's own words ("" when it was not called)
    finish_reason: str           # complete | truncated | cancelled | safety | error
    truncated_by: str | None = None   # max_tokens | deadline
    replaced: bool = False       # degenerate output replaced by the 'could not answer' message
    decision: dict = field(default_factory=dict)
    prompt_tokens: int = 0
    cached_tokens: int = 0       # prompt tokens served by the warm prefix
    completion_tokens: int = 0
    queue_s: float = 0.0
    ttft_s: float | None = None
    total_s: float = 0.0
    error: str | None = None
    target_steps: int = 0        # target decode calls that produced the answer (fewer than tokens when drafting)
    draft_proposed: int = 0      # drafted tokens the target verified
    draft_accepted: int = 0      # of those, kept (equal to the target's own choice)

    @property
    def tokens_per_s(self) -> float | None:
        if self.ttft_s is None or self.completion_tokens < 2:
            return None
        return (self.completion_tokens - 1) / max(self.total_s - self.ttft_s, 1e-9)

    def as_json(self) -> dict:
        return asdict(self) | {"tokens_per_s": self.tokens_per_s}


class _Job:
    def __init__(self, question: str, max_tokens: int, deadline_s: float, stop: list[str], tokens: list[int]):
        self.id = uuid.uuid4().hex[:12]
        self.question = question
        self.tokens = tokens      # the whole prompt, tokenized once when the request was submitted
        self.max_tokens = max_tokens
        self.deadline_s = deadline_s
        self.stop = stop
        self.cancelled = threading.Event()
        self.generated = 0        # tokens generated so far (read by tests of cancellation latency)
        self.events: queue.SimpleQueue = queue.SimpleQueue()
        self.submitted = time.monotonic()


class Request:
    """Caller's handle: iterate for the streamed text; ``answer`` once it is done; ``cancel()``."""

    def __init__(self, job: _Job):
        self._job = job
        self.id = job.id
        self.answer: Answer | None = None
        weakref.finalize(self, job.cancelled.set)  # a caller that disappears cancels its request

    def cancel(self) -> None:
        self._job.cancelled.set()

    def __iter__(self):
        """The answer's text as it streams.  A replacement (``events``) follows what was already
        shown after a blank line: a terminal cannot take text back."""
        for kind, text in self.events():
            yield text if kind == "text" else "\n\n" + text

    def events(self):
        """(kind, text) as the answer streams: ``text`` continues the answer; ``replace`` is the
        replacement for everything streamed before it (looping or empty output), sent once, last."""
        while self.answer is None:
            kind, value = self._job.events.get()
            if kind == "done":
                self.answer = value
            else:
                yield kind, value

    def result(self, timeout: float | None = None) -> Answer:
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.answer is None:
            remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
            kind, value = self._job.events.get(timeout=remaining)
            if kind == "done":
                self.answer = value
        return self.answer


# Never sent to the UI: C0/C1 controls other than tab and newline, and the bidirectional and
# zero-width format characters that can hide or reorder text on a screen.
_INVISIBLE = dict.fromkeys([*range(0x00, 0x09), *range(0x0B, 0x20), *range(0x7F, 0xA0),
                            0x200B, 0x200C, 0x200D, 0x200E, 0x200F, *range(0x202A, 0x202F),
                            *range(0x2066, 0x206A), 0xFEFF])


class _Stream:
    """Token bytes -> text: UTF-8 decoded across token boundaries, stop sequences held back,
    leading and trailing whitespace never sent.  What was sent always equals ``text`` at the end."""

    def __init__(self, stop: list[str]):
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._stop = [s for s in stop if s]
        self._hold = max((len(s) for s in self._stop), default=1) - 1
        self.text = ""        # everything decoded so far, without leading space or a stop sequence
        self._sent = 0
        self.stopped = False

    def feed(self, piece: bytes, final: bool = False) -> str:
        new = self._decoder.decode(piece, final=final).translate(_INVISIBLE)
        if not self.text:
            new = new.lstrip()
        self.text += new
        if self._stop:
            for s in self._stop:
                at = self.text.find(s, max(0, self._sent - len(s)))
                if at >= 0:
                    self.text = self.text[:at]
                    self.stopped = final = True
        if final:
            self.text = self.text.rstrip()
            ready = len(self.text)
        elif not new.strip():
            ready = self._sent  # whitespace may end the answer: hold it until more text follows
        else:
            trailing_space = len(new) - len(new.rstrip())
            held_for_stop = self._hold  # the end of the text may be the start of a stop sequence
            ready = max(self._sent, len(self.text) - max(trailing_space, held_for_stop))
        out = self.text[self._sent:ready]
        self._sent = ready
        return out


class Engine:
    def __init__(self, settings: Settings, model_path: str | Path | None = None, progress=None):
        self.settings = settings
        self.started = time.monotonic()
        s_model, s_cache = settings["model"], settings["cache"]
        self.model_path = Path(model_path or s_model["path"])
        cache_dir = Path(s_cache["dir"]) if s_cache["dir"] else None
        s_audit = settings["audit"]
        self.audit = AuditLog(s_audit["path"], s_audit["max_bytes"], s_audit["backups"], s_audit["log_text"],
                              key_dir=cache_dir)
        self._ledger = VersionLedger(cache_dir)
        self._versions: dict[str, tuple[Path, int, dict | None, str | None]] = {}   # role -> accepted on start
        if s_model["verify"]:
            checked = None
            try:
                checked = check_model(self.model_path, [Path(k) for k in s_model["trusted_keys"]], cache_dir,
                                      progress, s_model["require_protected"])
                if not s_model["require_protected"]:
                    log.warning("%s: model.require_protected is off: a write into the file after the check "
                                "would reach the loaded weights (development only)", self.model_path)
                self._check_version("model", self.model_path, checked)
            except (ModelRejected, InputError) as e:   # its own audit event, not only a message on stderr
                if checked is not None:
                    checked.close()
                self.audit.record("model_refused", model=self.model_path.name, reason=str(e))
                self.audit.close()
                raise
            self.model_sha256, self.verified = checked.sha256, "verified" + (f", signed by {checked.signed_by}"
                                                                             if checked.signed_by else "")
        else:
            log.warning("%s: manifest verification skipped on request", self.model_path)
            self.model_sha256, self.verified, checked = None, "not verified", None
        # Load the very file that was hashed: a rename over the model's name after the check changes
        # nothing.  (A write into that same file while it is memory-mapped would; docs/architecture.md.)
        self._load_path = (checked.load_path if checked is not None else None) or str(self.model_path)
        self.llama = self.draft_llama = None
        self.draft = self.draft_warm = None
        draft_checked = None
        try:
            summary = read_gguf(self._load_path, full_arrays=settings["runtime"]["draft"] == "model")
            self.metadata = summary.metadata
            self.quant = _quant_name(summary)
            draft_checked, draft_summary = self._open_draft(settings, cache_dir, progress, summary)
            self.plan, self.draft_plan = self._plan_gpu(summary, draft_summary)
            self._start(settings, summary, cache_dir, draft_checked, draft_summary)
        except BaseException:
            for llama in (self.llama, self.draft_llama):
                if llama is not None:
                    llama.close()
            self.audit.close()
            raise
        finally:
            for check in (checked, draft_checked):
                if check is not None:
                    check.close()      # llama.cpp holds its own mapping of the file now

    def _open_draft(self, settings: Settings, cache_dir: Path | None, progress, summary):
        """The draft model's file, checked like the main model's, and its vocabulary against the target's."""
        rt, s_model = settings["runtime"], settings["model"]
        if rt["draft"] != "model":
            return None, None
        path = Path(rt["draft_model"])
        checked = None
        if s_model["verify"]:
            try:
                checked = check_model(path, [Path(k) for k in s_model["trusted_keys"]], cache_dir, progress,
                                      s_model["require_protected"])
                self._check_version("draft", path, checked)
            except (ModelRejected, InputError) as e:
                if checked is not None:
                    checked.close()
                self.audit.record("model_refused", model=path.name, role="draft", reason=str(e))
                raise
        self._draft_load_path = (checked.load_path if checked is not None else None) or str(path)
        self.draft_sha256 = checked.sha256 if checked is not None else None
        try:
            draft_summary = read_gguf(self._draft_load_path, full_arrays=True)
            target_tokens = summary.metadata["tokenizer.ggml.tokens"]
            check_same_vocabulary(target_tokens, draft_summary.metadata.get("tokenizer.ggml.tokens", []), path.name)
        except BaseException:
            if checked is not None:
                checked.close()
            raise
        self.draft_path, self._target_vocab = path, len(target_tokens)
        return checked, draft_summary

    def _check_version(self, role: str, path: Path, checked) -> None:
        version, older = self._ledger.check(role, path, checked.manifest, self.settings["model"]["allow_downgrade"])
        self._versions[role] = (path, version, older, checked.sha256)

    def _record_versions(self) -> None:
        """Once the engine started: each role's version becomes the newest this device accepted."""
        for role, (path, version, older, sha256) in self._versions.items():
            if older is not None:
                self.audit.record("model_downgrade", role=role, model=path.name, version=version,
                                  replaced_version=older["version"], replaced_model=older["name"])
                log.warning("%s: deliberate downgrade of the %s from version %d to %d (model.allow_downgrade)",
                            path.name, role, older["version"], version)
            self._ledger.accept(role, path, version, sha256)

    def _load(self, path, settings: Settings, gpu_layers: int, **extra):
        s_rt = settings["runtime"]
        return load_llama(
            path, n_ctx=s_rt["n_ctx"], n_threads=s_rt["threads"] or os.cpu_count(),
            n_batch=s_rt["batch"], n_gpu_layers=gpu_layers, type_k=KV_TYPES[s_rt["kv_type"]],
            type_v=KV_TYPES[s_rt["kv_type"]], flash_attn=s_rt["flash_attn"], use_mmap=s_rt["mmap"],
            use_mlock=s_rt["mlock"], seed=s_rt["seed"], **extra)

    def _start(self, settings: Settings, summary, cache_dir: Path | None, draft_checked, draft_summary) -> None:
        s_rt, s_ans, s_cache, s_audit = (settings[k] for k in ("runtime", "answer", "cache", "audit"))
        if s_rt["draft"] == "model":
            self.draft_llama = self._load(self._draft_load_path, settings, self.draft_plan.gpu_layers)
            self.draft = ModelDraft(self.draft_llama, s_rt["draft_tokens"], self._target_vocab)
        elif s_rt["draft"] == "prompt-lookup":
            self.draft = PromptLookupDraft(s_rt["draft_tokens"])
        self.llama = self._load(self._load_path, settings, self.plan.gpu_layers, draft_model=self.draft)
        self._piece = TokenPieces(self.llama)
        template = self.metadata.get("tokenizer.chat_template") or load_template(s_ans["default_template"])[1]
        self.layout = PromptLayout.from_template(template, s_ans["preamble"])
        self.policy = SafetyPolicy.from_settings(settings["safety"])
        prefix_tokens = self._tokenize(self.layout.prefix, bos=True)
        if len(prefix_tokens) >= s_rt["n_ctx"] - 16:
            raise InputError(f"the fixed prompt (template + preamble) is {len(prefix_tokens)} tokens; "
                             f"runtime.n_ctx {s_rt['n_ctx']} leaves no room for a question")
        self.warm: WarmPrefix | None = None
        if s_cache["warm_prefix"]:
            key = cache_key(self._model_identity(), prefix_tokens, s_rt["n_ctx"], s_rt["kv_type"])
            self.warm = WarmPrefix(self.llama, prefix_tokens, key, cache_dir)
            self.warm.prepare()
            if self.draft_llama is not None:   # the draft keeps its own warm prefix
                key = cache_key(self.draft_sha256 or f"draft-{self._model_identity()}", prefix_tokens,
                                s_rt["n_ctx"], s_rt["kv_type"])
                self.draft_warm = WarmPrefix(self.draft_llama, prefix_tokens, key, cache_dir)
                self.draft_warm.prepare()
        self.prefix_tokens = prefix_tokens
        self._queue: queue.Queue[_Job | None] = queue.Queue(maxsize=s_ans["queue_size"])
        self._lock = threading.Lock()   # the llama context: the worker, or a maintenance call
        self._stats_lock = threading.Lock()
        self._stats = {"served": 0, "refused_busy": 0, "safety": 0, "cancelled": 0, "errors": 0,
                       "last_tokens_per_s": None, "tokens_per_s": [], "last_ttft_s": None, "ttft_s": [],
                       "tokens": 0, "target_steps": 0, "draft_proposed": 0, "draft_accepted": 0}
        self._closed = False
        self._worker = threading.Thread(target=self._run, name="jee1-engine", daemon=True)
        self._worker.start()
        self.audit.record("engine_start", model=self.model_path.name, sha256=self.model_sha256, quant=self.quant,
                          verified=self.verified, gpu_layers=self.plan.gpu_layers, offload=self.plan.kind,
                          safety_rules=self.policy.version, pre_model_safety=self.policy.pre_model,
                          warm_prefix=self.warm.source if self.warm else "off", draft=s_rt["draft"],
                          draft_model=self.draft_path.name if self.draft_llama else None,
                          draft_gpu_layers=self.draft_plan.gpu_layers if self.draft_llama else None)
        self._record_versions()
        log.info("engine ready: %s (%s), %s, GPU layers %d/%d (%s), warm prefix %s (%d tokens)",
                 self.model_path.name, self.quant, self.verified, self.plan.gpu_layers, self.plan.total_layers,
                 self.plan.reason, self.warm.source if self.warm else "off", len(prefix_tokens))

    # -- setup --------------------------------------------------------------------------------

    def _plan_gpu(self, summary, draft_summary) -> tuple[Plan, Plan | None]:
        """Target first; the draft (and its KV cache) in what the target leaves."""
        rt = self.settings["runtime"]
        shape = ModelShape.from_gguf(summary)
        draft_shape = ModelShape.from_gguf(draft_summary) if draft_summary is not None else None
        cpu = lambda s, why: Plan(0, s.n_layer + 1, 0, 0, why) if s is not None else None  # noqa: E731
        if not supports_gpu_offload():
            if not _gpu_notice.is_set():
                log.warning("llama.cpp was built without GPU support: running on the CPU")
                _gpu_notice.set()
            why = "llama.cpp built without GPU support"
            return cpu(shape, why), cpu(draft_shape, why)
        if rt["gpu_layers"] != "auto":
            n = int(rt["gpu_layers"])
            return (Plan(min(n, shape.n_layer + 1), shape.n_layer + 1, 0, 0, "set explicitly"),
                    cpu(draft_shape, "gpu_layers set explicitly: the draft runs on the CPU"))
        free, source = accelerator_free_bytes()
        reserve = rt["gpu_reserve_mb"] * 2**20 if is_unified_memory_board() else 0
        plan, draft_plan = plan_pair(shape, draft_shape, rt["n_ctx"], rt["kv_type"], free, reserve,
                                     rt["compute_margin_mb"] * 2**20)
        for role, p in (("model", plan), ("draft", draft_plan)):
            if p is not None:
                log.info("GPU offload plan for the %s (%s): %s; %d/%d layers, needs %.2f GiB of %.2f GiB budget",
                         role, source, p.reason, p.gpu_layers, p.total_layers, p.needed_bytes / 2**30,
                         p.budget_bytes / 2**30)
        return plan, draft_plan

    def _model_identity(self) -> str:
        """What the warm-prefix state is keyed on: the verified hash, else the file's place, size and age."""
        if self.model_sha256:
            return self.model_sha256
        st = self.model_path.stat()
        return text_digest(f"{self.model_path.resolve()}:{st.st_size}:{st.st_mtime_ns}").removeprefix("sha256:")

    def _tokenize(self, text: str, bos: bool, special: bool = False) -> list[int]:
        return self.llama.tokenize(text.encode("utf-8"), add_bos=bos, special=special)

    # -- requests -----------------------------------------------------------------------------

    def submit(self, question: str, max_tokens: int | None = None, deadline_s: float | None = None,
               stop: list[str] | None = None, prompt: str | None = None, prompt_special_tokens: bool = False) -> Request:
        """Queue a question.  ``prompt`` replaces the chat-template prompt with a complete one (jee1 eval's
        harness layout); the safety screen still sees ``question``."""
        if self._closed:
            raise Jee1Error("the engine is shut down")
        if not isinstance(question, str) or not question.strip():
            raise InputError("the question is empty")
        tokens = self._prompt_tokens(question, prompt, prompt_special_tokens)
        if prompt is None:
            self._check_fits(len(tokens))
        ans = self.settings["answer"]
        job = _Job(question, max_tokens or ans["max_tokens"], deadline_s or ans["deadline_s"],
                   ans["stop"] if stop is None else stop, tokens)
        try:
            self._queue.put_nowait(job)
        except queue.Full:
            with self._stats_lock:
                self._stats["refused_busy"] += 1
            self.audit.record("busy", request_id=job.id, question=self.audit.text(question))
            raise Busy(f"busy: {self._queue.maxsize} requests are already waiting") from None
        return Request(job)

    def _prompt_tokens(self, question: str, prompt: str | None, special: bool) -> list[int]:
        """The chat-template prompt around ``question``, or a complete ``prompt`` (whose "<s>"/"</s>" are
        the BOS/EOS tokens when ``special``), as tokens."""
        text = prompt if prompt is not None else self.layout.build(question)
        special = prompt is not None and special
        return self._tokenize(text, bos=not (special and text.startswith("<s>")), special=special)

    def _check_fits(self, n: int) -> None:
        """Refuse at once a question that cannot fit the context with the fixed prompt (a caller gets
        QuestionTooLong, the UI link its own error code), rather than failing it in the worker."""
        n_ctx = self.llama.n_ctx()
        if n > n_ctx - MIN_ANSWER_TOKENS:
            room = n_ctx - MIN_ANSWER_TOKENS - len(self._prompt_tokens("", None, False))   # the template around it
            raise QuestionTooLong(f"the question is too long: with the fixed prompt it is {n} tokens, the context "
                                  f"holds {n_ctx} and keeps {MIN_ANSWER_TOKENS} for the answer; a question may be "
                                  f"about {max(room, 0)} tokens (roughly {max(room, 0) * 4} characters of English)")

    def ask(self, question: str, **limits) -> Answer:
        return self.submit(question, **limits).result()

    def _run(self) -> None:
        while True:
            job = self._queue.get()
            if job is None:
                return
            try:
                with self._lock:
                    answer = self._answer(job)
            except Exception as e:  # a bad request must never take the engine down
                log.exception("request %s failed", job.id)
                answer = Answer(job.id, str(e), "", "error", error=f"{type(e).__name__}: {e}")
                with self._stats_lock:
                    self._stats["errors"] += 1
                try:
                    self.audit.record("answer", request_id=job.id, finish_reason="error", error=answer.error,
                                      question=self.audit.text(job.question))
                except Exception:
                    log.exception("audit record of failed request %s lost", job.id)
            job.events.put(("done", answer))   # the caller always gets its answer, an error included

    def _answer(self, job: _Job) -> Answer:
        started = time.monotonic()
        queue_s = started - job.submitted
        decision = self.policy.screen(job.question)
        if job.cancelled.is_set():  # cancelled (or its caller gone) while it waited in the queue
            answer = Answer(job.id, "", "", "cancelled", decision=decision.as_json(), queue_s=queue_s)
        elif decision.short_circuit:
            job.events.put(("text", decision.message))
            answer = Answer(job.id, decision.message, "", "safety", decision=decision.as_json(), queue_s=queue_s,
                            total_s=time.monotonic() - started)
        else:
            answer = self._generate(job, decision, started)
            answer.queue_s = queue_s
        self._account(job, answer, decision)
        return answer

    def _generate(self, job: _Job, decision: Decision, started: float) -> Answer:
        prompt = job.tokens
        budget = self.llama.n_ctx() - len(prompt)
        if budget < 1:
            raise InputError(f"the question is too long: {len(prompt)} prompt tokens, context is {self.llama.n_ctx()}")
        cached = len(self.prefix_tokens) if (self.warm and prompt[:len(self.prefix_tokens)] == self.prefix_tokens
                                             and self.warm.ensure()) else 0
        if cached and self.draft_warm is not None:
            self.draft_warm.ensure()
        drafted_before = self.draft.stats.copy() if self.draft is not None else None
        stream = _Stream(job.stop)
        deadline = started + job.deadline_s
        eos = self.llama.token_eos()
        limit = min(job.max_tokens, budget)
        reason, truncated_by, ttft, count = "complete", None, None, 0
        pending, last_flush = "", 0.0
        sent_chars, sent_tokens = 0, 0      # what the caller has been handed (a cancel keeps just that)
        for token in self.llama.generate(prompt, temp=0.0, top_k=1, top_p=1.0, min_p=0.0, repeat_penalty=1.0):
            now = time.monotonic()
            if ttft is None:
                ttft = now - started
            if token == eos:
                break
            count += 1
            job.generated = count
            pending += stream.feed(self._piece(token))
            if pending and now - last_flush >= STREAM_FLUSH_S:
                job.events.put(("text", pending))
                sent_chars, sent_tokens = sent_chars + len(pending), count
                pending, last_flush = "", now
            if stream.stopped:
                break
            if job.cancelled.is_set():
                reason = "cancelled"
                break
            if count >= limit:
                reason, truncated_by = "truncated", "max_tokens"
                break
            if now >= deadline:
                reason, truncated_by = "truncated", "deadline"
                break
            if count % LOOP_CHECK_EVERY == 0 and self.policy.looping(stream.text):
                break  # replaced by the post-policy below
        pending += stream.feed(b"", final=True)
        if pending and reason != "cancelled":
            job.events.put(("text", pending))
        body = stream.text
        if reason == "cancelled":
            # the answer is what was sent: text generated after the last hand-over is dropped, and
            # the token count is that of the text sent (DONE's count on the UI link)
            body, count = body[:sent_chars], sent_tokens
            text, replaced = body, False
        else:
            text, replaced = self.policy.finish(body, truncated=reason == "truncated")
            # the rest of the final text, or the replacement for all of it
            job.events.put(("replace", text) if replaced else ("text", text[len(body):]))
        answer = Answer(job.id, text, body, reason, truncated_by, replaced, decision.as_json(), len(prompt), cached,
                        count, ttft_s=ttft, total_s=time.monotonic() - started, target_steps=max(count, 1))
        if drafted_before is not None:
            drafted = self.draft.stats.minus(drafted_before)
            answer.target_steps = drafted.steps + 1     # the prompt's step, then one per verified draft
            answer.draft_proposed, answer.draft_accepted = drafted.proposed, drafted.accepted
        return answer

    def _account(self, job: _Job, answer: Answer, decision: Decision) -> None:
        with self._stats_lock:
            self._count(answer)
        self.audit.record(
            "answer", request_id=job.id, finish_reason=answer.finish_reason, truncated_by=answer.truncated_by,
            replaced=answer.replaced, red_flag=decision.red_flag, rule=decision.rule, category=decision.category,
            kind=decision.kind,
            rules_version=decision.rules_version, pre_model_safety=decision.pre_model,
            question=self.audit.text(job.question), answer=self.audit.text(answer.text),
            prompt_tokens=answer.prompt_tokens, cached_tokens=answer.cached_tokens,
            completion_tokens=answer.completion_tokens, queue_s=round(answer.queue_s, 4),
            ttft_s=None if answer.ttft_s is None else round(answer.ttft_s, 4), total_s=round(answer.total_s, 4))

    def _count(self, answer: Answer) -> None:
        st = self._stats
        st["served"] += 1
        st["safety"] += answer.finish_reason == "safety"
        st["cancelled"] += answer.finish_reason == "cancelled"
        if answer.ttft_s is not None:
            st["last_ttft_s"] = answer.ttft_s
            st["ttft_s"] = (st["ttft_s"] + [answer.ttft_s])[-100:]
        st["tokens"] += answer.completion_tokens
        st["target_steps"] += answer.target_steps if answer.completion_tokens else 0
        st["draft_proposed"] += answer.draft_proposed
        st["draft_accepted"] += answer.draft_accepted
        if answer.tokens_per_s is not None:
            st["last_tokens_per_s"] = answer.tokens_per_s
            st["tokens_per_s"] = (st["tokens_per_s"] + [answer.tokens_per_s])[-100:]

    # -- maintenance and status ------------------------------------------------------------------

    def rebuild_cache(self) -> None:
        if self.warm:
            with self._lock:
                self.warm.rebuild()

    def status(self) -> dict:
        with self._stats_lock:
            st = {k: (list(v) if isinstance(v, list) else v) for k, v in self._stats.items()}
        rss = status_bytes("VmRSS")
        mean = lambda xs: sum(xs) / len(xs) if xs else None  # noqa: E731
        return {
            "model": self.model_path.name, "sha256": self.model_sha256, "verified": self.verified,
            "quant": self.quant, "gpu_layers": self.plan.gpu_layers, "total_layers": self.plan.total_layers,
            "offload": self.plan.kind, "context": self.llama.n_ctx(), "memory_rss_bytes": rss,
            "uptime_s": round(time.monotonic() - self.started, 1),
            "requests_served": st["served"], "requests_refused_busy": st["refused_busy"],
            "safety_short_circuits": st["safety"], "cancelled": st["cancelled"], "errors": st["errors"],
            "queue_waiting": self._queue.qsize(), "queue_size": self._queue.maxsize,
            "last_tokens_per_s": st["last_tokens_per_s"], "avg_tokens_per_s": mean(st["tokens_per_s"]),
            "last_ttft_s": st["last_ttft_s"], "avg_ttft_s": mean(st["ttft_s"]),
            "warm_prefix": self.warm.source if self.warm else "off", "prefix_tokens": len(self.prefix_tokens),
            "safety_rules": self.policy.version, "pre_model_safety": self.policy.pre_model,
            "audit_degraded": self.audit.degraded, "audit_lost_records": self.audit.lost,
            "draft": self.settings["runtime"]["draft"],
            "draft_model": self.draft_path.name if self.draft_llama else None,
            "draft_gpu_layers": self.draft_plan.gpu_layers if self.draft_llama else None,
            "draft_acceptance_rate": (st["draft_accepted"] / st["draft_proposed"]) if st["draft_proposed"] else None,
            "tokens_per_target_step": (st["tokens"] / st["target_steps"]) if st["target_steps"] else None,
        }

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        while True:  # cancel everything still waiting, then stop the worker
            try:
                job = self._queue.get_nowait()
            except queue.Empty:
                break
            if job is not None:
                job.cancelled.set()
                job.events.put(("done", Answer(job.id, "", "", "cancelled")))
        self._queue.put(None)
        self._worker.join()
        self.audit.record("engine_stop", served=self._stats["served"])
        self.audit.close()
        self.llama.close()
        if self.draft_llama is not None:
            self.draft_llama.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _quant_name(summary) -> str:
    from gguf import LlamaFileType

    file_type = summary.metadata.get("general.file_type")
    try:
        return LlamaFileType(file_type).name.removeprefix("MOSTLY_").removeprefix("ALL_")
    except ValueError:
        return f"file_type {file_type}"
