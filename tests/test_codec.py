"""The frame codec: golden vectors (shared with C), property tests, and a differential test that
builds the C library and drives it through ctypes on random frames and corruptions."""

import ctypes
import random
import shutil
import subprocess
from pathlib import Path

import pytest
from hypothesis import given, settings, strategies as st

from jee1.firmware_bridge.codec import (Decoder, Frame, FrameError, cobs_decode, cobs_encode, fragments, pack,
                                        split_utf8, unpack)
from jee1.firmware_bridge.protocol import MAX_PAYLOAD, DoneFlags, ErrorCode, Flags, MsgType

REPO = Path(__file__).resolve().parents[1]
VECTORS = REPO / "tests" / "vectors" / "frames.txt"
C_DIR = REPO / "firmware_bridge" / "c"


def vector_lines(kind):
    return [line.split() for line in VECTORS.read_text().splitlines() if line.startswith(kind + " ")]


@pytest.mark.parametrize("fields", vector_lines("frame"), ids=lambda f: f[1])
def test_python_codec_matches_the_golden_frames(fields):
    _, _, version, mtype, flags, seq, request_id, payload_hex, encoded_hex = fields
    payload = b"" if payload_hex == "-" else bytes.fromhex(payload_hex)
    frame = Frame(int(mtype), int(request_id), payload, int(seq), int(flags), int(version))
    assert frame.encode().hex() == encoded_hex
    (decoded,) = Decoder().feed(bytes.fromhex(encoded_hex))
    assert decoded == frame


@pytest.mark.parametrize("fields", vector_lines("error"), ids=lambda f: f[1])
def test_python_codec_classifies_the_golden_bad_frames(fields):
    _, _, code, encoded_hex = fields
    (result,) = Decoder().feed(bytes.fromhex(encoded_hex))
    assert isinstance(result, FrameError) and result.code == int(code)


def test_typed_payloads_round_trip():
    frame = Frame(MsgType.QUERY, 5, pack(MsgType.QUERY, "Dose of µg?", max_tokens=64, reserved=0))
    fields, text = unpack(frame)
    assert fields == {"max_tokens": 64, "reserved": 0} and text == "Dose of µg?"
    with pytest.raises(FrameError) as e:
        unpack(Frame(MsgType.CHUNK, 5, pack(MsgType.CHUNK, b"\xc3", offset=0)))
    assert e.value.code == ErrorCode.BAD_UTF8 and e.value.request_id == 5
    with pytest.raises(FrameError) as e:
        unpack(Frame(0x7F, 9))
    assert e.value.code == ErrorCode.UNKNOWN_TYPE
    with pytest.raises(FrameError) as e:
        Frame(MsgType.STATUS, 0, b"x" * (MAX_PAYLOAD + 1)).encode()
    assert e.value.code == ErrorCode.OVERSIZE


@given(st.text(max_size=3000), st.integers(min_value=5, max_value=200))
def test_long_text_splits_without_cutting_a_character(text, limit):
    pieces = split_utf8(text, limit)
    assert b"".join(pieces).decode() == text and all(len(p) <= limit for p in pieces)
    for p in pieces:
        p.decode()  # each piece is valid UTF-8 by itself
    frames = fragments(MsgType.STATUS, 0, text, max_payload=limit)
    assert all(f.flags & Flags.MORE for f in frames[:-1]) and not frames[-1].flags & Flags.MORE


frames_st = st.builds(Frame, type=st.integers(0, 255), request_id=st.integers(0, 2**32 - 1),
                      payload=st.binary(max_size=MAX_PAYLOAD), seq=st.integers(0, 65535), flags=st.integers(0, 255))


@settings(max_examples=200, deadline=None)
@given(st.lists(frames_st, min_size=1, max_size=5), st.integers(1, 64))
def test_round_trip_in_any_chunking(frames, chunk):
    stream = b"".join(f.encode() for f in frames)
    decoder, out = Decoder(), []
    for i in range(0, len(stream), chunk):
        out += decoder.feed(stream[i:i + chunk])
    assert out == frames


@settings(max_examples=200, deadline=None)
@given(frames_st, frames_st, st.binary(min_size=1, max_size=300), st.integers(0, 10**6), st.integers(0, 7))
def test_resynchronises_after_garbage_and_bit_flips(before, after, garbage, where, bit):
    damaged = bytearray(before.encode())
    pos = where % (len(damaged) - 1)
    damaged[pos] ^= 1 << bit                      # corrupt the first frame
    stream = bytes(damaged) + garbage + b"\x00" + after.encode()
    results = Decoder().feed(stream)
    assert results[-1] == after                   # the next frame after a delimiter is always intact
    assert all(isinstance(r, FrameError) or r == before for r in results[:-1])


@given(st.binary(max_size=2000))
def test_cobs_round_trip(data):
    encoded = cobs_encode(data)
    assert b"\x00" not in encoded and cobs_decode(encoded) == data


# -- the C codec, built here and driven through ctypes ---------------------------------------

class CFrame(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint8), ("type", ctypes.c_uint8), ("flags", ctypes.c_uint8),
                ("seq", ctypes.c_uint16), ("request_id", ctypes.c_uint32), ("payload_len", ctypes.c_uint16),
                ("payload", ctypes.POINTER(ctypes.c_uint8))]


MAX_ENCODED = 1046


class CDecoder(ctypes.Structure):
    _fields_ = [("buf", ctypes.c_uint8 * MAX_ENCODED), ("len", ctypes.c_size_t), ("overflow", ctypes.c_int),
                ("errors", ctypes.c_uint32)]


@pytest.fixture(scope="module")
def clib(tmp_path_factory):
    cc = shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if cc is None:
        pytest.skip("no C compiler")
    lib = tmp_path_factory.mktemp("c") / "libjee1_frame.so"
    subprocess.run([cc, "-std=c99", "-O2", "-Wall", "-Wextra", "-Werror", "-pedantic", "-Wconversion", "-shared",
                    "-fPIC", "-o", str(lib), str(C_DIR / "jee1_frame.c")], check=True)
    c = ctypes.CDLL(str(lib))
    c.jf_frame_encode.argtypes = [ctypes.POINTER(CFrame), ctypes.c_void_p, ctypes.c_size_t, ctypes.POINTER(ctypes.c_size_t)]
    c.jf_decoder_push.argtypes = [ctypes.POINTER(CDecoder), ctypes.c_uint8, ctypes.POINTER(CFrame)]
    c.jf_decoder_init.argtypes = [ctypes.POINTER(CDecoder)]
    c.jf_crc32.argtypes, c.jf_crc32.restype = [ctypes.c_char_p, ctypes.c_size_t], ctypes.c_uint32
    return c


def c_encode(c, frame: Frame) -> bytes:
    payload = (ctypes.c_uint8 * max(1, len(frame.payload))).from_buffer_copy(frame.payload or b"\x00")
    f = CFrame(frame.version, frame.type, frame.flags, frame.seq, frame.request_id, len(frame.payload), payload)
    out = (ctypes.c_uint8 * (MAX_ENCODED + 8))()
    n = ctypes.c_size_t()
    assert c.jf_frame_encode(ctypes.byref(f), out, len(out), ctypes.byref(n)) == 0
    return bytes(out[:n.value])


def c_decode(c, data: bytes) -> list:
    d, f, out = CDecoder(), CFrame(), []
    c.jf_decoder_init(ctypes.byref(d))
    for byte in data:
        rc = c.jf_decoder_push(ctypes.byref(d), byte, ctypes.byref(f))
        if rc == 1:
            out.append(Frame(f.type, f.request_id, bytes(f.payload[:f.payload_len]), f.seq, f.flags, f.version))
        elif rc < 0:
            out.append(-rc)
    return out


def as_comparable(results):
    return [r.code.value if isinstance(r, FrameError) else r for r in results]


def test_c_crc_check_value(clib):
    assert clib.jf_crc32(b"123456789", 9) == 0xCBF43926


def test_c_and_python_agree_byte_for_byte(clib):
    rng = random.Random(20261124)
    for _ in range(300):
        frame = Frame(rng.randrange(256), rng.randrange(2**32), rng.randbytes(rng.choice([0, 1, 5, 253, 254, 255, 600, MAX_PAYLOAD])),
                      rng.randrange(65536), rng.randrange(256))
        wire = frame.encode()
        assert c_encode(clib, frame) == wire                       # Python -> bytes <- C
        assert c_decode(clib, wire) == [frame]                     # Python-encoded, C-decoded
        assert Decoder().feed(c_encode(clib, frame)) == [frame]    # C-encoded, Python-decoded


def test_c_and_python_agree_on_corrupted_streams(clib):
    rng = random.Random(7)
    for _ in range(300):
        frames = [Frame(rng.randrange(256), rng.randrange(2**32), rng.randbytes(rng.randrange(0, 300)))
                  for _ in range(3)]
        stream = bytearray(b"".join(f.encode() for f in frames))
        for _ in range(rng.randrange(1, 4)):
            op = rng.randrange(3)
            pos = rng.randrange(len(stream))
            if op == 0:
                stream[pos] ^= 1 << rng.randrange(8)
            elif op == 1:
                del stream[pos:pos + rng.randrange(1, 20)]
            else:
                stream[pos:pos] = rng.randbytes(rng.randrange(1, 40))
        assert as_comparable(Decoder().feed(bytes(stream))) == c_decode(clib, bytes(stream))


def test_oversize_garbage_is_one_error_in_both(clib):
    stream = b"\x55" * 5000 + b"\x00" + Frame(MsgType.PING, 1, pack(MsgType.PING, nonce=3)).encode()
    assert as_comparable(Decoder().feed(stream)) == c_decode(clib, stream)
    assert c_decode(clib, stream)[0] == ErrorCode.OVERSIZE


def test_cmake_build_and_ctest(tmp_path):
    if not shutil.which("cmake") or not shutil.which("ctest"):
        pytest.skip("cmake not installed")
    build = tmp_path / "build"
    subprocess.run(["cmake", "-S", str(REPO), "-B", str(build)], check=True, capture_output=True)
    subprocess.run(["cmake", "--build", str(build)], check=True, capture_output=True)
    result = subprocess.run(["ctest", "--test-dir", str(build), "--output-on-failure"], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_libfuzzer_on_the_c_decoder(tmp_path):
    """CMake builds the libFuzzer target (ASan + UBSan) when the compiler is clang; ctest runs it for 15 s."""
    clang = shutil.which("clang")
    if not clang or not shutil.which("cmake"):
        pytest.skip("clang (with libclang-rt) not installed: the fuzz target is not built here")
    build = tmp_path / "fuzz"
    configure = subprocess.run(["cmake", "-S", str(REPO), "-B", str(build), f"-DCMAKE_C_COMPILER={clang}"],
                               capture_output=True, text=True)
    assert configure.returncode == 0, configure.stderr
    built = subprocess.run(["cmake", "--build", str(build)], capture_output=True, text=True)
    if "fuzzer" in built.stderr and built.returncode != 0:
        pytest.skip("clang without the libFuzzer runtime (libclang-rt)")
    assert built.returncode == 0, built.stderr
    result = subprocess.run(["ctest", "--test-dir", str(build), "-R", "frame_fuzz", "--output-on-failure"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "100% tests passed" in result.stdout, result.stdout + result.stderr


def _doc_table_rows(heading_line: str) -> list[list[str]]:
    """The rows of the first markdown table after the line that starts with ``heading_line``."""
    lines = (Path(__file__).parents[1] / "docs" / "protocol.md").read_text(encoding="utf-8").splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(heading_line))
    rows, in_table = [], False
    for line in lines[start + 1:]:
        if line.startswith("|"):
            in_table = True
            cells = [c.strip() for c in line.strip("|").split("|")]
            if not set(cells[0]) <= set("- ") and cells[0] not in ("code", "bit"):
                rows.append(cells)
        elif in_table:
            break
    return rows


def test_protocol_doc_lists_exactly_the_error_codes():
    rows = _doc_table_rows("ERROR codes")
    assert {(int(code), name) for code, name, _ in rows} == {(int(c), c.name) for c in ErrorCode}


def test_protocol_doc_lists_exactly_the_done_flags():
    rows = _doc_table_rows("DONE reason")
    assert {(int(value, 16), name) for _, value, name, _ in rows} == {(int(f), f.name) for f in DoneFlags}


def test_protocol_doc_worked_examples_are_the_codecs_frames():
    """§6 of docs/protocol.md is generated from the codec's golden frames; a hand edit or a codec
    change shows here (regenerate: python -m jee1.firmware_bridge.vectors --doc docs/protocol.md)."""
    from jee1.firmware_bridge.vectors import DOC_END, DOC_START, render_doc

    text = (Path(__file__).parents[1] / "docs" / "protocol.md").read_text(encoding="utf-8")
    assert text[text.index(DOC_START):text.index(DOC_END)] == render_doc()


def test_a_body_ending_on_a_full_cobs_block_has_one_end_form_and_both_are_read(clib):
    """§2: the sender ends such a body with the empty block 0x01; receivers accept it with or without."""
    from jee1.firmware_bridge.vectors import examples

    frame = dict(examples())["chunk_254_end"]
    wire = frame.encode()
    assert wire[-257] == 0xFF and wire[-2:] == b"\x01\x00" and 0 not in frame.body()[-254:]
    for form in (wire, wire[:-2] + b"\x00"):
        assert as_comparable(Decoder().feed(form)) == as_comparable([frame]) == c_decode(clib, form)
