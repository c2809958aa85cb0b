"""Golden vectors shared by the Python and C codec tests, and the worked examples of docs/protocol.md §6.

``python -m jee1.firmware_bridge.vectors`` rewrites tests/vectors/frames.txt from the Python codec;
``python -m jee1.firmware_bridge.vectors --doc docs/protocol.md`` rewrites §6 of the document (review the
diff: both are the wire contract; tests fail while either differs from the codec).

Line formats (fields separated by one space, hex in lower case, '-' for empty):
  frame NAME VERSION TYPE FLAGS SEQ REQUEST_ID PAYLOAD_HEX ENCODED_HEX
  error NAME ERROR_CODE ENCODED_HEX          (the bytes, delimiter included, must give this error)
"""

from __future__ import annotations

import sys
from pathlib import Path

from .codec import Frame, cobs_encode, crc32, pack, unpack
from .protocol import HEADER, MAX_ENCODED, DoneFlags, DoneReason, ErrorCode, Flags, MsgType

ANSWER = "Heparin is reversed by protamine sulfate."
# 250 bytes: with offset 41's zeros before it and a CRC without a zero after it, the body ends on a
# full 254-byte COBS block (the end form the document must show)
LONG_TEXT = ("Protamine sulfate reverses unfractionated heparin: 1 mg neutralises about 100 units given in the "
             "previous 2-3 hours. Give it slowly IV (at most 5 mg/min, 50 mg in all) and watch for low blood "
             "pressure, a slow pulse and anaphylaxis after fish allergy.")
LOOPING = "idididididididididididididididididididid"
REPLACEMENT = "The device could not produce a usable answer to this question."


def examples() -> list[tuple[str, Frame]]:
    return [
        ("hello", Frame(MsgType.HELLO, 0, pack(MsgType.HELLO, "jee1-ui", min_version=1, max_version=1,
                                                max_payload=1024, window=4096), seq=0)),
        ("hello_bridge", Frame(MsgType.HELLO, 0, pack(MsgType.HELLO, "jee1-bridge", min_version=1, max_version=1,
                                                       max_payload=1024, window=4096), seq=0)),
        ("query", Frame(MsgType.QUERY, 7, pack(MsgType.QUERY, "What is the antidote for heparin?",
                                               max_tokens=256, reserved=0), seq=1)),
        ("query_more", Frame(MsgType.QUERY, 8, pack(MsgType.QUERY, "first part of a long question, ",
                                                    max_tokens=0, reserved=0), seq=2, flags=int(Flags.MORE))),
        ("query_last", Frame(MsgType.QUERY, 8, pack(MsgType.QUERY, "and its last part?", max_tokens=0, reserved=0),
                             seq=3)),
        ("cancel", Frame(MsgType.CANCEL, 7, b"", seq=3)),
        ("resend", Frame(MsgType.RESEND, 7, pack(MsgType.RESEND, offset=18), seq=4)),
        ("ack", Frame(MsgType.ACK, 7, pack(MsgType.ACK, offset=42), seq=5)),
        ("chunk_ascii", Frame(MsgType.CHUNK, 7, pack(MsgType.CHUNK, ANSWER[:18], offset=0), seq=0)),
        ("chunk_utf8", Frame(MsgType.CHUNK, 9, pack(MsgType.CHUNK, "37,5 °C — µg", offset=120), seq=1)),
        ("chunk_254_end", Frame(MsgType.CHUNK, 7, pack(MsgType.CHUNK, LONG_TEXT, offset=41), seq=8)),
        ("chunk_looping", Frame(MsgType.CHUNK, 5, pack(MsgType.CHUNK, LOOPING, offset=0), seq=10)),
        ("chunk_restart", Frame(MsgType.CHUNK, 5, pack(MsgType.CHUNK, REPLACEMENT, offset=len(LOOPING)), seq=11,
                                flags=int(Flags.RESTART))),
        ("done_replaced", Frame(MsgType.DONE, 5, pack(MsgType.DONE, reason=int(DoneReason.COMPLETE),
                                                      flags=int(DoneFlags.REPLACED),
                                                      total_bytes=len(LOOPING + REPLACEMENT), tokens=20,
                                                      answer_crc32=crc32((LOOPING + REPLACEMENT).encode())),
                                seq=12)),
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
        ("oversize_by_one", ErrorCode.OVERSIZE, b"\x55" * MAX_ENCODED + b"\x00"),   # MAX_ENCODED + 1 with the 0x00
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


# docs/protocol.md §6: (vector name, heading), in the document's order
DOC_EXAMPLES = [
    ("hello", "HELLO from the UI"),
    ("hello_bridge", "HELLO from the bridge (its answer: the values in force)"),
    ("query", "QUERY"),
    ("query_more", "QUERY, first fragment (MORE set)"),
    ("query_last", "QUERY, last fragment of the same question (MORE clear: the question is 'first part of a long "
                   "question, and its last part?')"),
    ("cancel", "CANCEL"),
    ("resend", "RESEND"),
    ("ack", "ACK"),
    ("chunk_ascii", "CHUNK"),
    ("chunk_utf8", "CHUNK with multi-byte UTF-8"),
    ("chunk_254_end", "CHUNK whose body is 270 bytes and ends on a full 254-byte COBS block (code 0xff, then the "
                      "final empty block 0x01)"),
    ("done", "DONE"),
    ("chunk_looping", "CHUNK of an answer that will be replaced (the model looped)"),
    ("chunk_restart", f"CHUNK with RESTART: the replacement starts at offset {len(LOOPING)}; the UI takes offsets "
                      f"0-{len(LOOPING) - 1} off the screen"),
    ("done_replaced", f"DONE with REPLACED (total_bytes and answer_crc32 cover all {len(LOOPING + REPLACEMENT)} bytes, "
                      "the discarded ones included)"),
    ("error", "ERROR"),
    ("ping", "PING"),
    ("pong", "PONG"),
    ("status_request", "STATUS_REQUEST"),
    ("status", "STATUS"),
]
DOC_START = "## 6. Worked examples"
DOC_END = "## 7."
HEX_PER_LINE = 32


def _hex_lines(label: str, data: bytes) -> list[str]:
    rows = [data[i:i + HEX_PER_LINE].hex(" ") for i in range(0, len(data), HEX_PER_LINE)] or [""]
    return [f"    {label:<7} {rows[0]}"] + [f"    {'':<7} {row}" for row in rows[1:]]


def render_doc() -> str:
    """§6 of docs/protocol.md, from the codec."""
    frames = dict(examples())
    lines = [DOC_START,
             "Every message type, as body (before COBS) and as sent on the wire (COBS + 0x00), in hex, 32 bytes a",
             "line. Generated by `python -m jee1.firmware_bridge.vectors --doc docs/protocol.md`; the same frames",
             "are in `tests/vectors/frames.txt`. Each example stands alone: the values are illustrative, not one",
             "conversation, and the replacement text is shortened.", ""]
    for name, heading in DOC_EXAMPLES:
        frame = frames[name]
        fields, text = unpack(frame)
        described = [f"request_id={frame.request_id}", f"seq={frame.seq}"]
        flags = Flags(frame.flags)
        if flags:
            described.append("flags=" + "|".join(f.name for f in Flags if f and f in flags))
        values = [f"{k}={v}" for k, v in fields.items()] + ([f"text={text!r}"] if text else [])
        lines.append(f"**{heading}**: " + ", ".join(described) + ("; " + ", ".join(values) if values else ""))
        lines.append("")
        lines += _hex_lines("body", frame.body()) + _hex_lines("on wire", frame.encode())
        lines.append("")
    return "\n".join(lines) + "\n"


def rewrite_doc(path: Path) -> None:
    text = path.read_text(encoding="utf-8")
    start, end = text.index(DOC_START), text.index(DOC_END)
    path.write_text(text[:start] + render_doc() + text[end:], encoding="utf-8")


if __name__ == "__main__":
    if sys.argv[1:2] == ["--doc"]:
        doc = Path(sys.argv[2]) if len(sys.argv) > 2 else Path("docs/protocol.md")
        rewrite_doc(doc)
        print(f"rewrote §6 of {doc}")
    else:
        target = Path(sys.argv[1]) if len(sys.argv) > 1 else Path("tests/vectors/frames.txt")
        target.write_text(render())
        print(f"wrote {target}")
