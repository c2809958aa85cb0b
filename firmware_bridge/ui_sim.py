"""``jee1 ui-sim``: a reference UI client — what the firmware does, in Python (tests, demo, technicians).

It says HELLO, sends a QUERY, assembles CHUNKs by offset, asks for a RESEND when it sees a gap or
when DONE's length or CRC disagree with what it holds, acknowledges, and returns the answer.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field

from .codec import Decoder, Frame, FrameError, crc32, fragments, pack, unpack
from .protocol import MAX_PAYLOAD, PROTOCOL_VERSION, DoneFlags, DoneReason, ErrorCode, Flags, MsgType


class LinkError(RuntimeError):
    def __init__(self, code: int, text: str):
        super().__init__(f"{ErrorCode(code).name if code in ErrorCode._value2member_map_ else code}: {text}")
        self.code = code


@dataclass
class Reply:
    text: str                 # what the UI shows: from the RESTART chunk on, for a replaced answer
    reason: DoneReason
    tokens: int
    replaced: bool
    resends: int = 0
    flags: int = 0
    bad_frames: int = 0
    chunks: int = 0
    chunk_times: list[float] = field(default_factory=list)
    discarded: str = ""       # streamed text the UI stopped showing when the replacement began

    @property
    def safety_kind(self) -> str | None:
        """What the UI shows for a safety answer: emergency, crisis or not_english."""
        if self.reason != DoneReason.SAFETY:
            return None
        if self.flags & DoneFlags.CRISIS:
            return "crisis"
        return "not_english" if self.flags & DoneFlags.NOT_ENGLISH else "emergency"


class UIClient:
    def __init__(self, transport, window: int = 4096, max_payload: int = MAX_PAYLOAD):
        self.transport = transport
        self.window = window
        self.max_payload = max_payload
        self.decoder = Decoder()
        self.pending: list[Frame] = []
        self.errors: list[tuple[int, int, str]] = []   # (request_id, code, text) of ERROR frames
        self.bad_frames = 0
        self._ids = itertools.count(1)
        self.seq = 0

    def send(self, frame: Frame) -> None:
        frame.seq = self.seq
        self.seq = (self.seq + 1) & 0xFFFF
        self.transport.write(frame.encode())

    def _next(self, timeout: float) -> Frame | None:
        return self._next_matching(lambda frame: True, timeout)

    def _next_matching(self, wanted, timeout: float) -> Frame | None:
        """The oldest received frame ``wanted`` accepts, reading more while none has arrived;
        the others stay queued for whoever asks for them (several requests share one link)."""
        deadline = time.monotonic() + timeout
        while True:
            for i, frame in enumerate(self.pending):
                if wanted(frame):
                    return self.pending.pop(i)
            if time.monotonic() >= deadline:
                return None
            for item in self.decoder.feed(self.transport.read()):
                if isinstance(item, FrameError):
                    self.bad_frames += 1
                elif item.type == MsgType.PING:
                    self.send(Frame(MsgType.PONG, 0, pack(MsgType.PONG, nonce=unpack(item)[0]["nonce"])))
                else:
                    if item.type == MsgType.ERROR:
                        fields, text = unpack(item)
                        self.errors.append((item.request_id, fields["code"], text))
                    self.pending.append(item)

    def hello(self, min_version: int = 1, max_version: int = PROTOCOL_VERSION, timeout: float = 5.0) -> dict:
        self.transport.write(b"\x00")   # ends whatever noise the bridge's receiver holds (docs/protocol.md §2)
        self.send(Frame(MsgType.HELLO, 0, pack(MsgType.HELLO, "jee1-ui-sim", min_version=min_version,
                                               max_version=max_version, max_payload=self.max_payload,
                                               window=self.window)))
        while (frame := self._next(timeout)) is not None:
            if frame.type == MsgType.HELLO:
                return unpack(frame)[0]
            if frame.type == MsgType.ERROR:
                raise LinkError(unpack(frame)[0]["code"], unpack(frame)[1])
        raise TimeoutError("no HELLO from the bridge")

    def query(self, question: str, max_tokens: int = 0, request_id: int | None = None) -> int:
        rid = request_id or next(self._ids)
        for frame in fragments(MsgType.QUERY, rid, question, self.max_payload, max_tokens=max_tokens, reserved=0):
            self.send(frame)
        return rid

    def cancel(self, request_id: int) -> None:
        self.send(Frame(MsgType.CANCEL, request_id))

    def ask(self, question: str, max_tokens: int = 0, on_text=None, timeout: float = 60.0,
            silence_s: float = 1.0, on_restart=None) -> Reply:
        rid = self.query(question, max_tokens)
        return self.receive(rid, on_text, timeout, silence_s, on_restart)

    def receive(self, rid: int, on_text=None, timeout: float = 60.0, silence_s: float = 1.0,
                on_restart=None) -> Reply:
        """The answer to ``rid``: ``on_text(new text)`` as it arrives, ``on_restart()`` when a replacement
        begins (what was shown before it is to be taken off the screen)."""
        data = bytearray()
        shown_from = 0            # offset of the RESTART chunk: the text shown starts there
        acked, resends, chunks, times = 0, 0, 0, []
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            frame = self._next_matching(lambda f: f.request_id == rid, silence_s)
            if frame is None:  # silence: a CHUNK or the DONE may have been lost
                self.send(Frame(MsgType.RESEND, rid, pack(MsgType.RESEND, offset=len(data))))
                resends += 1
                continue
            fields, text = unpack(frame)
            if frame.type == MsgType.ERROR:
                raise LinkError(fields["code"], text)
            if frame.type == MsgType.CHUNK:
                piece = text.encode()
                if fields["offset"] > len(data):            # a gap: something was lost
                    self.send(Frame(MsgType.RESEND, rid, pack(MsgType.RESEND, offset=len(data))))
                    resends += 1
                elif fields["offset"] + len(piece) > len(data):
                    if frame.flags & Flags.RESTART and fields["offset"] == len(data):
                        shown_from = fields["offset"]
                        if on_restart:
                            on_restart()
                    new = piece[len(data) - fields["offset"]:]
                    data += new
                    chunks += 1
                    times.append(time.monotonic())
                    if on_text:
                        on_text(new.decode())
                    if len(data) - acked >= self.window // 2:
                        acked = len(data)
                        self.send(Frame(MsgType.ACK, rid, pack(MsgType.ACK, offset=acked)))
            elif frame.type == MsgType.DONE:
                if fields["total_bytes"] != len(data) or fields["answer_crc32"] != crc32(bytes(data)):
                    resend_from = len(data) if fields["total_bytes"] > len(data) else 0
                    if resend_from == 0:
                        data.clear()
                        acked = shown_from = 0
                    self.send(Frame(MsgType.RESEND, rid, pack(MsgType.RESEND, offset=resend_from)))
                    resends += 1
                    continue
                self.send(Frame(MsgType.ACK, rid, pack(MsgType.ACK, offset=len(data))))
                return Reply(data[shown_from:].decode(), DoneReason(fields["reason"]), fields["tokens"],
                             bool(fields["flags"] & DoneFlags.REPLACED), resends, fields["flags"], self.bad_frames,
                             chunks, times, data[:shown_from].decode())
        raise TimeoutError(f"request {rid}: no DONE within {timeout} s")

    def status(self, timeout: float = 5.0) -> dict:
        import json

        self.send(Frame(MsgType.STATUS_REQUEST))
        text = ""
        while (frame := self._next(timeout)) is not None:
            if frame.type == MsgType.STATUS:
                text += unpack(frame)[1]
                if not frame.flags & 1:
                    return json.loads(text)
            elif frame.type == MsgType.ERROR and frame.request_id == 0:
                fields, message = unpack(frame)
                raise LinkError(fields["code"], message)
        raise TimeoutError("no STATUS from the bridge")
