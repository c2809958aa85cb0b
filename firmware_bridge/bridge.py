"""The bridge: UI connections (serial line, Unix socket) <-> the engine, per docs/protocol.md.

A ``Session`` serves one connection: it decodes frames, reassembles questions, submits them to the
engine, and streams each answer as CHUNK frames within the UI's window, keeping the answer for
RESEND until the UI's final ACK.  Several requests may be in flight; a bad frame only ever costs
that frame.  ``BridgeService`` keeps a serial port open across unplug/replug (with backoff) and
accepts Unix-socket clients, without ever restarting the engine.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field

from jee1.errors import Busy, InputError, Jee1Error, QuestionTooLong

from .codec import Decoder, Frame, FrameError, crc32, fragments, pack, unpack
from .protocol import (ANSWER_BUFFER_BYTES, DEFAULT_WINDOW, HEARTBEAT_S, MAX_IN_FLIGHT, MAX_PAYLOAD,
                       MAX_QUESTION_BYTES, MIN_PAYLOAD, MIN_VERSION, MIN_WINDOW, PROTOCOL_VERSION, DoneFlags, DoneReason,
                       ErrorCode, Flags, MsgType)
from .transports import SerialTransport, TransportClosed, UnixListener

log = logging.getLogger(__name__)
MAX_PARTIAL_QUESTIONS = MAX_IN_FLIGHT     # unfinished fragmented questions kept per connection
PARTIAL_QUESTION_S = 30.0                 # an unfinished question older than this is dropped

FINISH_REASONS = {"complete": DoneReason.COMPLETE, "truncated": DoneReason.TRUNCATED,
                  "cancelled": DoneReason.CANCELLED, "safety": DoneReason.SAFETY, "error": DoneReason.ERROR}


def done_flags(answer) -> DoneFlags:
    """DONE flags: the UI shows the crisis screen or the English-only notice from these, not from the text."""
    flags = DoneFlags.REPLACED if answer.replaced else DoneFlags(0)
    if answer.finish_reason == "safety":
        if answer.decision.get("kind") == "crisis":
            flags |= DoneFlags.CRISIS
        elif not answer.decision.get("red_flag"):
            flags |= DoneFlags.NOT_ENGLISH
    return flags


DELIVERED_REMEMBERED = 64   # request ids whose repeated final ACK (and RESEND of DONE) is still recognised
ABANDONED_REMEMBERED = 64   # request ids whose dropped question's late fragments are refused


@dataclass
class Outgoing:
    request_id: int
    request: object = None            # the engine's Request
    data: bytearray = field(default_factory=bytearray)
    sent: int = 0
    acked: int = 0
    done: dict | None = None          # DONE fields once the engine finished
    done_sent: bool = False
    finished_at: float = 0.0
    restart_at: int | None = None     # offset where a replacement starts (CHUNK flag RESTART)
    forgotten: bool = False           # dropped by a new HELLO or a closed link: nothing more is sent


class Session:
    def __init__(self, transport, engine, name: str | None = None, service=None):
        self.transport = transport
        self.service = service          # the BridgeService, for service-wide figures in STATUS
        self.engine = engine
        self.name = name or transport.name
        self.decoder = Decoder()
        self.lock = threading.RLock()
        self.seq = 0
        self.ready = False
        self.max_payload = MAX_PAYLOAD
        self.window = DEFAULT_WINDOW
        self.answers: OrderedDict[int, Outgoing] = OrderedDict()
        self.dropped: set[int] = set()
        self.delivered: OrderedDict[int, int] = OrderedDict()   # recent fully acknowledged answers: total bytes
        self.questions: OrderedDict[int, tuple[bytearray, int, float]] = OrderedDict()   # unfinished fragments
        self.abandoned: OrderedDict[int, None] = OrderedDict()   # ids whose question was dropped part-way
        self.stats = {"frames_in": 0, "frames_out": 0, "bad_frames": 0, "queries": 0, "busy": 0, "resends": 0,
                      "answers_dropped": 0, "errors": 0, "ui_errors": 0}
        self.last_sent = time.monotonic()
        self.last_pong = time.monotonic()
        self.closed = threading.Event()

    # -- output ---------------------------------------------------------------------------------

    def send(self, frame: Frame) -> None:
        with self.lock:
            frame.seq = self.seq
            self.seq = (self.seq + 1) & 0xFFFF
            self.transport.write(frame.encode())
            self.stats["frames_out"] += 1
            self.last_sent = time.monotonic()

    def error(self, code: ErrorCode, text: str, request_id: int = 0) -> None:
        self.send(Frame(MsgType.ERROR, request_id, pack(MsgType.ERROR, text[:200], code=int(code))))

    def pump(self, out: Outgoing) -> None:
        """Send what the window allows of one answer, then DONE when all of it has gone out."""
        with self.lock:
            if out.forgotten:
                return
            limit = self.max_payload - 4
            while out.sent < len(out.data) and out.sent - out.acked < self.window:
                end = min(len(out.data), out.sent + limit, out.acked + self.window)
                while end < len(out.data) and (out.data[end] & 0xC0) == 0x80:
                    end -= 1  # never inside a UTF-8 character
                if out.restart_at is not None and out.sent < out.restart_at < end:
                    end = out.restart_at  # the replacement starts a CHUNK of its own
                if end <= out.sent:
                    break
                piece = bytes(out.data[out.sent:end])
                flags = Flags.RESTART if out.sent == out.restart_at else Flags.NONE
                self.send(Frame(MsgType.CHUNK, out.request_id, pack(MsgType.CHUNK, piece, offset=out.sent),
                                flags=int(flags)))
                out.sent = end
            if out.done is not None and not out.done_sent and out.sent == len(out.data):
                self.send(Frame(MsgType.DONE, out.request_id, pack(MsgType.DONE, **out.done)))
                out.done_sent = True
                out.finished_at = time.monotonic()
            self._enforce_budget()

    def _enforce_budget(self) -> None:
        total = sum(len(o.data) for o in self.answers.values())
        for rid, out in list(self.answers.items()):
            if total <= ANSWER_BUFFER_BYTES:
                break
            if out.done_sent:  # oldest finished answers go first
                total -= len(out.data)
                del self.answers[rid]
                self.dropped.add(rid)
                self.stats["answers_dropped"] += 1
                log.warning("%s: answer %d dropped unacknowledged (buffer over %d bytes)", self.name, rid,
                            ANSWER_BUFFER_BYTES)

    # -- input ----------------------------------------------------------------------------------

    def handle_bytes(self, data: bytes) -> None:
        self._expire_questions()
        for item in self.decoder.feed(data):
            if isinstance(item, FrameError):
                self.stats["bad_frames"] += 1
                log.info("%s: bad frame: %s", self.name, item)
                self.error(item.code, str(item), item.request_id)
                continue
            self.stats["frames_in"] += 1
            try:
                self.handle(item)
            except FrameError as e:
                self.stats["bad_frames"] += 1
                if item.type == MsgType.QUERY and e.request_id in self.questions:
                    self._abandon(e.request_id)   # a question with a part missing is never answered
                self.error(e.code, str(e), e.request_id)
            except TransportClosed:
                raise
            except Exception as e:   # a bug handling one frame must not end the link
                log.exception("%s: handling %s failed", self.name, item.type)
                self.stats["errors"] += 1
                if item.type == MsgType.QUERY and item.request_id in self.questions:
                    self._abandon(item.request_id)
                self._fail(item.request_id if item.type == MsgType.QUERY else 0, f"internal error ({type(e).__name__})")

    def handle(self, frame: Frame) -> None:
        try:
            fields, text = unpack(frame)
        except FrameError:
            if frame.type == MsgType.HELLO:   # a HELLO that fails, however it fails: afresh and not ready
                self.forget_requests()
                self.ready = False
            raise
        mtype = MsgType(frame.type)
        if mtype == MsgType.HELLO:
            return self._hello(fields, text)
        if mtype == MsgType.PING:
            return self.send(Frame(MsgType.PONG, 0, pack(MsgType.PONG, nonce=fields["nonce"])))
        if mtype == MsgType.PONG:
            self.last_pong = time.monotonic()
            return None
        if mtype == MsgType.ERROR:     # the UI reports a problem with what we sent: log it, never answer it
            self.stats["ui_errors"] += 1
            log.warning("%s: the UI reports error %s on request %d: %s", self.name, fields.get("code"),
                        frame.request_id, text)
            return None
        if not self.ready:
            return self.error(ErrorCode.NOT_READY, "send HELLO first", frame.request_id)
        handler = {MsgType.QUERY: self._query, MsgType.CANCEL: self._cancel, MsgType.RESEND: self._resend,
                   MsgType.ACK: self._ack, MsgType.STATUS_REQUEST: self._status}.get(mtype)
        if handler is None:
            self.stats["bad_frames"] += 1
            return self.error(ErrorCode.UNKNOWN_TYPE, f"{mtype.name} is not sent to the bridge", frame.request_id)
        return handler(frame, fields, text)

    def forget_requests(self) -> None:
        """Start afresh (a HELLO, a closed link): cancel every request in flight and drop every answer
        and unfinished question; nothing more is sent for any of them."""
        with self.lock:
            for out in self.answers.values():
                out.forgotten = True
                if out.request is not None and out.done is None:
                    out.request.cancel()
            self.answers.clear()
            self.questions.clear()
            self.abandoned.clear()
            self.dropped.clear()
            self.delivered.clear()

    def _hello(self, fields: dict, name: str) -> None:
        if self.answers or self.questions:
            log.info("%s: HELLO: %d requests in flight and %d unfinished questions dropped", self.name,
                     len(self.answers), len(self.questions))
        self.forget_requests()      # every HELLO starts the conversation afresh (docs/protocol.md §5.1)
        version = min(PROTOCOL_VERSION, fields["max_version"])
        if version < max(MIN_VERSION, fields["min_version"]):
            self.ready = False
            return self.error(ErrorCode.VERSION_MISMATCH, f"bridge speaks {MIN_VERSION}..{PROTOCOL_VERSION}, "
                              f"peer {fields['min_version']}..{fields['max_version']}")
        if fields["max_payload"] < MIN_PAYLOAD or 0 < fields["window"] < MIN_WINDOW:
            self.ready = False
            return self.error(ErrorCode.BAD_PAYLOAD, f"HELLO offers max_payload {fields['max_payload']} (at least "
                              f"{MIN_PAYLOAD}) and window {fields['window']} (0 for {DEFAULT_WINDOW}, else at least "
                              f"{MIN_WINDOW})")
        self.max_payload = min(MAX_PAYLOAD, fields["max_payload"])
        self.window = fields["window"] or DEFAULT_WINDOW    # smaller than a payload: smaller CHUNKs
        self.ready = True
        log.info("%s: HELLO from %r, version %d, max_payload %d, window %d", self.name, name, version,
                 self.max_payload, self.window)
        self.send(Frame(MsgType.HELLO, 0, pack(MsgType.HELLO, "jee1-bridge", min_version=MIN_VERSION,
                                               max_version=PROTOCOL_VERSION, max_payload=self.max_payload,
                                               window=self.window)))

    def _query(self, frame: Frame, fields: dict, text: str) -> None:
        rid = frame.request_id
        if rid == 0:
            raise FrameError(ErrorCode.BAD_PAYLOAD, "QUERY needs a non-zero request_id")
        if rid in self.answers and rid not in self.questions:
            return self.error(ErrorCode.DUPLICATE_REQUEST, f"request {rid} is in flight", rid)
        if rid not in self.abandoned:   # a refused id evicts nothing; one that expires now is refused below
            self._expire_questions(new=rid if rid not in self.questions and frame.flags & Flags.MORE else None)
        if rid in self.abandoned:    # its late fragments must not pass for a question of their own
            return self.error(ErrorCode.BAD_PAYLOAD, f"the question of request {rid} was dropped part-way; send it "
                              f"again under a new request_id", rid)
        buffer, _, _ = self.questions.setdefault(rid, (bytearray(), fields["max_tokens"], time.monotonic()))
        buffer += text.encode()
        if len(buffer) > MAX_QUESTION_BYTES:
            self._abandon(rid)
            return self.error(ErrorCode.OVERSIZE, f"question over {MAX_QUESTION_BYTES} bytes", rid)
        if frame.flags & Flags.MORE:
            return None
        del self.questions[rid]
        with self.lock:
            in_flight = sum(1 for o in self.answers.values() if not o.done_sent)
        if in_flight >= MAX_IN_FLIGHT:
            return self.error(ErrorCode.BUSY, f"{MAX_IN_FLIGHT} requests already in flight on this link", rid)
        self.stats["queries"] += 1
        try:
            request = self.engine.submit(buffer.decode(), max_tokens=fields["max_tokens"] or None)
        except Busy as e:
            self.stats["busy"] += 1
            return self.error(ErrorCode.BUSY, str(e), rid)
        except QuestionTooLong as e:
            return self.error(ErrorCode.QUESTION_TOO_LONG, str(e), rid)
        except InputError as e:  # an empty question
            return self.error(ErrorCode.BAD_PAYLOAD, str(e), rid)
        except Jee1Error as e:   # an engine shutting down
            return self._fail(rid, str(e))
        out = Outgoing(rid, request)
        with self.lock:
            self.answers[rid] = out
            self.dropped.discard(rid)
        threading.Thread(target=self._produce, args=(out,), name=f"bridge-{rid}", daemon=True).start()

    def _expire_questions(self, new: int | None = None) -> None:
        """Unfinished fragmented questions are bounded: each is kept at most PARTIAL_QUESTION_S from its
        first fragment (checked whenever bytes arrive, and on an idle link), and when a ``new`` one
        starts beyond MAX_PARTIAL_QUESTIONS the oldest goes; either is dropped with an ERROR the UI sees."""
        now = time.monotonic()
        for rid, (_, _, started) in list(self.questions.items()):
            too_many = new is not None and len(self.questions) >= MAX_PARTIAL_QUESTIONS
            if now - started > PARTIAL_QUESTION_S or too_many:
                self._abandon(rid)
                reason = "too old" if now - started > PARTIAL_QUESTION_S else "too many"
                self.error(ErrorCode.BAD_PAYLOAD, f"unfinished question {rid} dropped ({reason})", rid)

    def _fail(self, rid: int, reason: str) -> None:
        """ERROR ENGINE_ERROR and, for a request, DONE with reason error: the UI's request always ends."""
        self.error(ErrorCode.ENGINE_ERROR, reason, rid)
        if rid:
            self.send(Frame(MsgType.DONE, rid, pack(MsgType.DONE, reason=int(DoneReason.ERROR), flags=0, total_bytes=0,
                                                    tokens=0, answer_crc32=crc32(b""))))

    def _abandon(self, rid: int) -> None:
        """Drop an unfinished question; later fragments on its id are refused, never answered as a
        question of their own (the last ABANDONED_REMEMBERED ids are remembered)."""
        self.questions.pop(rid, None)
        self.abandoned.pop(rid, None)
        self.abandoned[rid] = None
        while len(self.abandoned) > ABANDONED_REMEMBERED:
            self.abandoned.popitem(last=False)

    def _produce(self, out: Outgoing) -> None:
        try:
            for kind, text in out.request.events():
                with self.lock:
                    if kind == "replace":
                        out.restart_at = len(out.data)
                    out.data += text.encode()
                    self.pump(out)
            answer = out.request.answer
            with self.lock:
                if out.forgotten:
                    return
                if answer.finish_reason == "error":
                    self.error(ErrorCode.ENGINE_ERROR, answer.error or "engine error", out.request_id)
                out.done = {"reason": int(FINISH_REASONS[answer.finish_reason]), "flags": int(done_flags(answer)),
                            "total_bytes": len(out.data), "tokens": min(answer.completion_tokens, 0xFFFF),
                            "answer_crc32": crc32(bytes(out.data))}
                self.pump(out)
        except TransportClosed:   # a write failed or timed out, maybe part-way through a frame: end the link
            out.request.cancel()
            _close_quietly(self.transport)
        except Exception as e:   # the answer's caller must see an ERROR and a DONE, never silence
            log.exception("%s: request %d failed", self.name, out.request_id)
            out.request.cancel()
            try:
                with self.lock:
                    if out.forgotten:
                        return
                    self.stats["errors"] += 1
                    self.error(ErrorCode.ENGINE_ERROR, f"internal error ({type(e).__name__})", out.request_id)
                    out.done = {"reason": int(DoneReason.ERROR), "flags": 0, "total_bytes": len(out.data),
                                "tokens": 0, "answer_crc32": crc32(bytes(out.data))}
                    self.pump(out)
            except TransportClosed:
                pass

    def _lookup(self, rid: int) -> Outgoing | None:
        out = self.answers.get(rid)
        if out is None:
            code = ErrorCode.ANSWER_DROPPED if rid in self.dropped else ErrorCode.UNKNOWN_REQUEST
            self.error(code, f"no answer kept for request {rid}", rid)
        return out

    def _cancel(self, frame: Frame, fields: dict, text: str) -> None:
        if frame.request_id not in self.answers and frame.request_id in self.delivered:
            return      # already answered and acknowledged: nothing to stop
        out = self._lookup(frame.request_id)
        if out is not None:
            out.request.cancel()

    def _resend(self, frame: Frame, fields: dict, text: str) -> None:
        delivered = self.delivered.get(frame.request_id)
        if frame.request_id not in self.answers and delivered and fields["offset"] >= delivered[0]:
            # every byte was acknowledged, but the UI never saw DONE: send it again
            return self.send(Frame(MsgType.DONE, frame.request_id, pack(MsgType.DONE, **delivered[1])))
        out = self._lookup(frame.request_id)
        if out is None:
            return
        with self.lock:
            offset = min(fields["offset"], len(out.data))
            while offset > 0 and offset < len(out.data) and (out.data[offset] & 0xC0) == 0x80:
                offset -= 1
            self.stats["resends"] += 1
            out.sent = offset
            out.acked = min(out.acked, offset)
            out.done_sent = False
            self.pump(out)

    def _ack(self, frame: Frame, fields: dict, text: str) -> None:
        delivered = self.delivered.get(frame.request_id)
        if frame.request_id not in self.answers and delivered and fields["offset"] >= delivered[0]:
            return      # the final ACK of the total after DONE, when a chunk's ACK already carried it
        out = self._lookup(frame.request_id)
        if out is None:
            return
        with self.lock:
            out.acked = max(out.acked, min(fields["offset"], out.sent))
            if out.done_sent and out.acked == len(out.data):
                del self.answers[out.request_id]   # delivered: keep just its DONE, for a RESEND of a lost one
                self.delivered.pop(out.request_id, None)
                self.delivered[out.request_id] = (len(out.data), out.done)
                while len(self.delivered) > DELIVERED_REMEMBERED:
                    self.delivered.popitem(last=False)
            else:
                self.pump(out)

    def _status(self, frame: Frame, fields: dict, text: str) -> None:
        totals = self.service.totals() if self.service is not None else {}
        status = self.engine.status() | {"link": self.name, **{f"link_{k}": v for k, v in self.stats.items()},
                                         **{f"service_{k}": v for k, v in totals.items()}}
        for part in fragments(MsgType.STATUS, 0, json.dumps(status, default=str), self.max_payload):
            self.send(part)

    # -- loop -----------------------------------------------------------------------------------

    def run(self, stop: threading.Event) -> None:
        nonce = 0
        try:
            self.transport.write(b"\x00")   # ends whatever noise the UI's receiver holds (§2)
            while not stop.is_set():
                data = self.transport.read()
                if data:
                    self.handle_bytes(data)
                elif self.questions:
                    self._expire_questions()
                if not data and time.monotonic() - self.last_sent > HEARTBEAT_S:
                    if nonce and time.monotonic() - self.last_pong > 2 * HEARTBEAT_S:
                        log.warning("%s: no PONG for %.0f s: is the UI alive?", self.name,
                                    time.monotonic() - self.last_pong)
                    nonce += 1
                    self.send(Frame(MsgType.PING, 0, pack(MsgType.PING, nonce=nonce)))
        finally:
            self.closed.set()
            self.forget_requests()   # a closed connection keeps nothing


def _close_quietly(closable) -> None:
    try:
        closable.close()
    except Exception:
        log.exception("closing %r", closable)


class BridgeService:
    """Serial port(s) and a Unix socket in front of one engine; runs until ``stop`` is set."""

    def __init__(self, engine, stop: threading.Event):
        self.engine = engine
        self.stop = stop
        self.threads: list[threading.Thread] = []
        self.sessions: list[Session] = []
        self._totals_lock = threading.Lock()
        self._closed_totals: dict[str, int] = {}
        self.connections = 0

    def start_serial(self, url: str, baudrate: int) -> None:
        self._spawn(self._serial_loop, url, baudrate, name=f"bridge-serial-{url}")

    def start_unix(self, path: str) -> None:
        listener = UnixListener(path)
        self._spawn(self._accept_loop, listener, name=f"bridge-unix-{path}")

    def _spawn(self, target, *args, name: str) -> None:
        thread = threading.Thread(target=target, args=args, name=name, daemon=True)
        thread.start()
        self.threads.append(thread)

    def _serial_loop(self, url: str, baudrate: int) -> None:
        delay = 0.1
        while not self.stop.is_set():
            try:
                transport = SerialTransport(url, baudrate)
            except TransportClosed as e:
                log.warning("UI port %s unavailable (%s); retrying in %.1f s", url, e, delay)
                self.stop.wait(delay)
                delay = min(delay * 2, 5.0)
                continue
            delay = 0.1
            log.info("UI port %s open at %d baud", url, baudrate)
            session = Session(transport, self.engine, service=self)
            self._track(session)
            try:
                session.run(self.stop)
            except TransportClosed as e:
                log.warning("UI port %s lost (%s); waiting for it to come back", url, e)
            except Exception:   # reopen the port rather than leave the UI without a link
                log.exception("UI port %s: session failed; reopening", url)
                self.stop.wait(delay)
            finally:
                _close_quietly(transport)

    def _accept_loop(self, listener: UnixListener) -> None:
        try:
            while not self.stop.is_set():
                try:
                    transport = listener.accept()
                    if transport is None:
                        continue
                    session = Session(transport, self.engine, service=self)
                    self._track(session)
                    self._spawn(self._client, session, name="bridge-unix-client")
                except Exception:   # one bad connection must not close the socket for everyone
                    log.exception("UI socket: accepting a connection failed")
                    self.stop.wait(0.1)
        finally:
            _close_quietly(listener)

    def _client(self, session: Session) -> None:
        try:
            session.run(self.stop)
        except TransportClosed:
            log.info("%s: client disconnected", session.name)
        except Exception:
            log.exception("%s: session failed; connection closed", session.name)
        finally:
            _close_quietly(session.transport)

    def totals(self) -> dict:
        """Link figures over every connection since the service started, closed ones included."""
        with self._totals_lock:
            out = dict(self._closed_totals)
        for session in list(self.sessions):
            if not session.closed.is_set():
                for k, v in session.stats.items():
                    out[k] = out.get(k, 0) + v
        out["connections"] = self.connections
        return out

    def _track(self, session: Session) -> None:
        """Keep open sessions; fold closed ones into the service totals and forget them."""
        with self._totals_lock:
            for s in self.sessions:
                if s.closed.is_set():
                    for k, v in s.stats.items():
                        self._closed_totals[k] = self._closed_totals.get(k, 0) + v
            self.connections += 1
        self.sessions = [s for s in self.sessions if not s.closed.is_set()] + [session]
        self.threads = [t for t in self.threads if t.is_alive()]

    def join(self, timeout: float = 5.0) -> None:
        for thread in self.threads:
            thread.join(timeout)
