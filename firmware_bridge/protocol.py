"""JEE1 UI link protocol, version 1: every constant of docs/protocol.md, as tables.

Frame on the byte stream: COBS(header | payload | crc32) followed by one 0x00 delimiter.
  header  12 bytes little-endian: version u8, type u8, flags u8, reserved u8 (0),
          seq u16, request_id u32 (0 = none), payload_len u16
  crc32   CRC-32/ISO-HDLC (zlib.crc32) over header and payload, little-endian
"""

from __future__ import annotations

import struct
from enum import IntEnum, IntFlag

PROTOCOL_VERSION = 1
MIN_VERSION = 1
HEADER = struct.Struct("<BBBBHIH")
CRC = struct.Struct("<I")
MAX_PAYLOAD = 1024                       # bytes; HELLO may agree on less, never more
MAX_BODY = HEADER.size + MAX_PAYLOAD + CRC.size
MAX_ENCODED = MAX_BODY + MAX_BODY // 254 + 1 + 1   # COBS overhead + the 0x00 delimiter
DEFAULT_WINDOW = 4096                    # answer bytes the bridge may send before an ACK (HELLO window 0)
MIN_PAYLOAD = 64                         # smallest max_payload a HELLO may offer: DONE's 12-byte fixed part
                                         # and an ERROR's code with a readable reason must fit
MIN_WINDOW = 4                           # smallest window: one UTF-8 character; CHUNKs never split one


class MsgType(IntEnum):
    HELLO = 0x01
    QUERY = 0x10
    CANCEL = 0x11
    RESEND = 0x12
    ACK = 0x13
    CHUNK = 0x20
    DONE = 0x21
    ERROR = 0x30
    PING = 0x40
    PONG = 0x41
    STATUS_REQUEST = 0x50
    STATUS = 0x51


class Flags(IntFlag):
    NONE = 0
    MORE = 0x01          # the payload continues in the next frame of the same type and request
    RESTART = 0x02       # CHUNK: the replacement starts here; the UI discards what it shows of the answer before


class DoneReason(IntEnum):
    COMPLETE = 0
    TRUNCATED = 1
    CANCELLED = 2
    SAFETY = 3
    ERROR = 4


class DoneFlags(IntFlag):
    REPLACED = 0x01      # the model's answer was replaced by the "could not answer" message
    CRISIS = 0x02        # reason SAFETY: the crisis message (self-harm), not the emergency message
    NOT_ENGLISH = 0x04   # reason SAFETY: the English-only notice (with the emergency number)


class ErrorCode(IntEnum):
    BAD_CRC = 1
    BAD_LENGTH = 2
    UNKNOWN_TYPE = 3
    BAD_UTF8 = 4
    OVERSIZE = 5
    VERSION_MISMATCH = 6
    BUSY = 7
    UNKNOWN_REQUEST = 8
    DUPLICATE_REQUEST = 9
    BAD_PAYLOAD = 10
    ENGINE_ERROR = 11
    NOT_READY = 12
    ANSWER_DROPPED = 13
    BAD_FRAMING = 14
    QUESTION_TOO_LONG = 15   # it and the fixed prompt do not fit the model's context


# Fixed part of each payload (struct format, field names); the rest of the payload, if the type
# has one, is UTF-8 text.  Types absent here carry no fixed part.
PAYLOADS: dict[MsgType, tuple[struct.Struct, tuple[str, ...], bool]] = {
    MsgType.HELLO: (struct.Struct("<BBHH"), ("min_version", "max_version", "max_payload", "window"), True),
    MsgType.QUERY: (struct.Struct("<HH"), ("max_tokens", "reserved"), True),
    MsgType.CANCEL: (struct.Struct("<"), (), False),
    MsgType.RESEND: (struct.Struct("<I"), ("offset",), False),
    MsgType.ACK: (struct.Struct("<I"), ("offset",), False),
    MsgType.CHUNK: (struct.Struct("<I"), ("offset",), True),
    MsgType.DONE: (struct.Struct("<BBIHI"), ("reason", "flags", "total_bytes", "tokens", "answer_crc32"), False),
    MsgType.ERROR: (struct.Struct("<H"), ("code",), True),
    MsgType.PING: (struct.Struct("<I"), ("nonce",), False),
    MsgType.PONG: (struct.Struct("<I"), ("nonce",), False),
    MsgType.STATUS_REQUEST: (struct.Struct("<"), (), False),
    MsgType.STATUS: (struct.Struct("<"), (), True),
}

MAX_QUESTION_BYTES = 8192                # a reassembled QUERY's text
ANSWER_BUFFER_BYTES = 64 * 1024          # answers kept for RESEND, all requests of a connection
MAX_IN_FLIGHT = 8                        # requests per connection
HEARTBEAT_S = 5.0                        # PING an idle link this often
