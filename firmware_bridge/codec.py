"""Frame codec: COBS framing, CRC-32, header and typed payloads, a byte-stream decoder that
resynchronises at the next 0x00 after any corruption.  The C codec in firmware_bridge/c/ is the
same contract; tests/vectors/frames.txt holds the golden frames both must produce."""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field

from .protocol import CRC, HEADER, MAX_ENCODED, MAX_PAYLOAD, PAYLOADS, ErrorCode, Flags, MsgType


class FrameError(ValueError):
    def __init__(self, code: ErrorCode, message: str, request_id: int = 0):
        super().__init__(message)
        self.code = code
        self.request_id = request_id


def crc32(data: bytes) -> int:
    """CRC-32/ISO-HDLC: poly 0x04C11DB7 (reflected 0xEDB88320), init and xorout 0xFFFFFFFF."""
    return zlib.crc32(data) & 0xFFFFFFFF


def cobs_encode(data: bytes) -> bytes:
    out = bytearray()
    block = bytearray()
    for byte in data:
        if byte == 0:
            out.append(len(block) + 1)
            out += block
            block.clear()
        else:
            block.append(byte)
            if len(block) == 254:
                out.append(255)
                out += block
                block.clear()
    out.append(len(block) + 1)
    out += block
    return bytes(out)


def cobs_decode(data: bytes) -> bytes:
    out = bytearray()
    i, n = 0, len(data)
    while i < n:
        code = data[i]
        end = i + code
        if code == 0 or end > n or 0 in data[i + 1:end]:
            raise FrameError(ErrorCode.BAD_FRAMING, "invalid COBS encoding")
        out += data[i + 1:end]
        i = end
        if code < 255 and i < n:
            out.append(0)
    return bytes(out)


@dataclass
class Frame:
    type: int
    request_id: int = 0
    payload: bytes = b""
    seq: int = 0
    flags: int = 0
    version: int = 1

    def body(self) -> bytes:
        if len(self.payload) > MAX_PAYLOAD:
            raise FrameError(ErrorCode.OVERSIZE, f"payload of {len(self.payload)} bytes exceeds {MAX_PAYLOAD}")
        head = HEADER.pack(self.version, self.type, self.flags, 0, self.seq & 0xFFFF, self.request_id, len(self.payload))
        return head + self.payload + CRC.pack(crc32(head + self.payload))

    def encode(self) -> bytes:
        return cobs_encode(self.body()) + b"\x00"


def parse_body(body: bytes) -> Frame:
    if len(body) < HEADER.size + CRC.size:
        raise FrameError(ErrorCode.BAD_LENGTH, f"frame of {len(body)} bytes is shorter than header and CRC")
    version, mtype, flags, _reserved, seq, request_id, length = HEADER.unpack_from(body)
    if HEADER.size + length + CRC.size != len(body):
        raise FrameError(ErrorCode.BAD_LENGTH, f"payload length {length} disagrees with a {len(body)}-byte frame")
    (crc,) = CRC.unpack_from(body, len(body) - CRC.size)
    if crc != crc32(body[:-CRC.size]):
        raise FrameError(ErrorCode.BAD_CRC, "CRC mismatch")
    if length > MAX_PAYLOAD:
        raise FrameError(ErrorCode.OVERSIZE, f"payload of {length} bytes exceeds {MAX_PAYLOAD}", request_id)
    return Frame(mtype, request_id, body[HEADER.size:HEADER.size + length], seq, flags, version)


@dataclass
class Decoder:
    """Feed bytes as they arrive; get whole frames, or FrameError for each bad one, in order."""

    buffer: bytearray = field(default_factory=bytearray)
    overflow: bool = False
    errors: int = 0

    def feed(self, data: bytes) -> list[Frame | FrameError]:
        out: list[Frame | FrameError] = []
        start = 0
        while True:
            end = data.find(b"\x00", start)
            if end < 0:
                self._take(data[start:])
                return out
            self._take(data[start:end])
            if self.buffer or self.overflow:
                out.append(self._finish())
            start = end + 1

    def _take(self, data: bytes) -> None:
        if self.overflow:
            return
        if len(self.buffer) + len(data) > MAX_ENCODED - 1:     # MAX_ENCODED counts the delimiter
            self.overflow = True
            self.buffer.clear()
        else:
            self.buffer += data

    def _finish(self) -> Frame | FrameError:
        try:
            if self.overflow:
                raise FrameError(ErrorCode.OVERSIZE, f"frame longer than {MAX_ENCODED} bytes")
            return parse_body(cobs_decode(bytes(self.buffer)))
        except FrameError as e:
            self.errors += 1
            return e
        finally:
            self.buffer.clear()
            self.overflow = False


# -- typed payloads ---------------------------------------------------------------------------

def pack(mtype: MsgType, text: str | bytes = b"", **fields) -> bytes:
    fixed, names, has_text = PAYLOADS[mtype]
    tail = text.encode("utf-8") if isinstance(text, str) else text
    if tail and not has_text:
        raise FrameError(ErrorCode.BAD_PAYLOAD, f"{mtype.name} carries no text")
    return fixed.pack(*(fields[n] for n in names)) + tail


def unpack(frame: Frame) -> tuple[dict, str]:
    """(fixed fields, text) of a frame's payload; UNKNOWN_TYPE / BAD_PAYLOAD / BAD_UTF8 name the request."""
    try:
        mtype = MsgType(frame.type)
    except ValueError:
        raise FrameError(ErrorCode.UNKNOWN_TYPE, f"unknown message type 0x{frame.type:02x}", frame.request_id) from None
    fixed, names, has_text = PAYLOADS[mtype]
    if len(frame.payload) < fixed.size or (not has_text and len(frame.payload) != fixed.size):
        raise FrameError(ErrorCode.BAD_PAYLOAD, f"{mtype.name} payload of {len(frame.payload)} bytes", frame.request_id)
    values = dict(zip(names, fixed.unpack_from(frame.payload), strict=True))
    try:
        text = frame.payload[fixed.size:].decode("utf-8")
    except UnicodeDecodeError:
        raise FrameError(ErrorCode.BAD_UTF8, f"{mtype.name} text is not valid UTF-8", frame.request_id) from None
    return values, text


def split_utf8(text: str, limit: int) -> list[bytes]:
    """UTF-8 pieces of at most ``limit`` bytes, never cutting inside a character."""
    data, pieces, start = text.encode("utf-8"), [], 0
    while start < len(data):
        end = min(len(data), start + limit)
        while end < len(data) and (data[end] & 0xC0) == 0x80:
            end -= 1
        pieces.append(data[start:end])
        start = end
    return pieces or [b""]


def fragments(mtype: MsgType, request_id: int, text: str, max_payload: int = MAX_PAYLOAD, **fields) -> list[Frame]:
    """A message whose text exceeds one frame, as several frames flagged MORE but the last."""
    fixed, _, _ = PAYLOADS[mtype]
    pieces = split_utf8(text, max_payload - fixed.size)
    return [Frame(mtype, request_id, pack(mtype, piece, **fields),
                  flags=int(Flags.MORE) if i < len(pieces) - 1 else 0) for i, piece in enumerate(pieces)]
