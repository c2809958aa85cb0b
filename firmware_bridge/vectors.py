"""Golden vectors shared by the Python and C codec tests: ``python -m jee1.firmware_bridge.vectors``
rewrites tests/vectors/frames.txt from the Python codec (review the diff: it is the wire contract).

Line formats (fields separated by one space, hex in lower case, '-' for empty):
  frame NAME VERSION TYPE FLAGS SEQ REQUEST_ID PAYLOAD_HEX ENCODED_HEX
  error NAME ERROR_CODE ENCODED_HEX          (the bytes, delimiter included, must give this error)
"""

from __future__ import annotations

import sys
from pathlib import Path

from .codec import Frame, cobs_encode, crc32, pack
from .protocol import HEADER, DoneReason, ErrorCode, Flags, MsgType

ANSWER = "Heparin is reversed by protamine sulfate."


def examples() -> list[tuple[str, Frame]]:
    return [
        ("hello", Frame(MsgType.HELLO, 0, pack(MsgType.HELLO, "jee1-ui", min_version=1, max_version=1,
                                                max_payload=1024, window=4096), seq=0)),
        ("query", Frame(MsgType.QUERY, 7, pack(MsgType.QUERY, "What is the antidote for heparin?",
                                               max_tokens=256, reserved=0), seq=1)),
        ("query_more", Frame(MsgType.QUERY, 8, pack(MsgType.QUERY, "first part of a long question, ",
                                                    max_tokens=0, reserved=0), seq=2, flags=int(Flags.MORE))),
        ("cancel", Frame(MsgType.CANCEL, 7, b"", seq=3)),
        ("resend", Frame(MsgType.RESEND, 7, pack(MsgType.RESEND, offset=18), seq=4)),
        ("ack", Frame(MsgType.ACK, 7, pack(MsgType.ACK, offset=42), seq=5)),
        ("chunk_ascii", Frame(MsgType.CHUNK, 7, pack(MsgType.CHUNK, ANSWER[:18], offset=0), seq=0)),
        ("chunk_utf8", Frame(MsgType.CHUNK, 9, pack(MsgType.CHUNK, "37,5 °C — µg", offset=120), seq=1)),
        ("done", Frame(MsgType.DONE, 7, pack(MsgType.DONE, reason=int(DoneReason.COMPLETE), flags=0,
                                             total_bytes=len(ANSWER.encode()), tokens=11,
                                             answer_crc32=crc32(ANSWER.encode())), seq=2)),
        ("error", Frame(MsgType.ERROR, 0, pack(MsgType.ERROR, "CRC mismatch", code=int(ErrorCode.BAD_CRC)), seq=3)),
        ("ping", Frame(MsgType.PING, 0, pack(MsgType.PING, nonce=0xDEADBEEF), seq=6)),
        ("pong", Frame(MsgType.PONG, 0, pack(MsgType.PONG, nonce=0xDEADBEEF), seq=4)),
        ("status_request", Frame(MsgType.STATUS_REQUEST, 0, b"", seq=7)),
        ("status", Frame(MsgType.STATUS, 0, pack(MsgType.STATUS, '{"model":"SM70","quant":"Q4_K_M"}'), seq=5)),
        ("zeros_in_payload", Frame(MsgType.PING, 0, bytes(4), seq=0)),
        ("long_run_254", Frame(MsgType.STATUS, 0, b"x" * 300, seq=0x1234, flags=0)),
    ]


def error_examples() -> list[tuple[str, ErrorCode, bytes]]:
    good = Frame(MsgType.PING, 0, pack(MsgType.PING, nonce=1)).body()
    bad_crc = good[:-1] + bytes([good[-1] ^ 0xFF])
    head = HEADER.pack(1, MsgType.PING, 0, 0, 0, 0, 9)           # claims 9 payload bytes, carries 4
    bad_len = head + bytes(4)
    bad_len += crc32(bad_len).to_bytes(4, "little")
    oversize_head = HEADER.pack(1, MsgType.STATUS, 0, 0, 0, 0, 1025)
    oversize = oversize_head + b"y" * 1025
    oversize += crc32(oversize).to_bytes(4, "little")
    return [
        ("bad_crc", ErrorCode.BAD_CRC, cobs_encode(bad_crc) + b"\x00"),
        ("bad_length", ErrorCode.BAD_LENGTH, cobs_encode(bad_len) + b"\x00"),
        ("short", ErrorCode.BAD_LENGTH, cobs_encode(b"\x01\x40\x00") + b"\x00"),
        ("bad_cobs", ErrorCode.BAD_FRAMING, b"\x09\x01\x02\x00"),
        ("oversize", ErrorCode.OVERSIZE, cobs_encode(oversize) + b"\x00"),
    ]


FORMAT_LINES = [
    "Line formats (fields separated by one space, hex in lower case, '-' for empty):",
    "frame NAME VERSION TYPE FLAGS SEQ REQUEST_ID PAYLOAD_HEX ENCODED_HEX",
    "error NAME ERROR_CODE ENCODED_HEX          (the bytes, delimiter included, must give this error)",
]


def render() -> str:
    lines = ["# " + line for line in FORMAT_LINES]
    for name, f in examples():
        lines.append(" ".join([ "frame", name, str(f.version), str(f.type), str(f.flags), str(f.seq),
                               str(f.request_id), f.payload.hex() or "-", f.encode().hex()]))
    for name, code, data in error_examples():
        lines.append(" ".join(["error", name, str(int(code)), data.hex()]))
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    target = Path(sys.argv[1]) if len(sys.argv) > 1 else Path("tests/vectors/frames.txt")
    target.write_text(render())
    print(f"wrote {target}")
