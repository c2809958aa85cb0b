"""The bridge over a real pseudo-terminal pair (set to a real baud rate) and a real Unix socket:
conversation, cancel, resend after corruption, bad frames, oversize, unplug/replug, a flood against
the busy limit; and the technician console."""

import contextlib
import json
import os
import re
import select
import socket
import stat
import termios
import threading
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from conftest import running_engine
from jee1.edge.cli import main as jee1_cli
from jee1.firmware_bridge.bridge import BridgeService
from jee1.firmware_bridge.codec import Frame, cobs_encode, crc32, pack, unpack
from jee1.firmware_bridge.console import Console, response_for
from jee1.firmware_bridge.protocol import HEADER, DoneFlags, DoneReason, ErrorCode, Flags, MsgType
from jee1.firmware_bridge.transports import SocketTransport, UnixListener
from jee1.firmware_bridge.ui_sim import LinkError, UIClient

QUESTION = "What is the antidote for heparin?"


class FdTransport:
    """The UI's end of the pty (the master side)."""

    def __init__(self, fd, corrupt_frame: int | None = None):
        self.fd, self.name = fd, "pty-master"
        self.corrupt_frame, self.frames_seen = corrupt_frame, 0

    def read(self):
        ready, _, _ = select.select([self.fd], [], [], 0.05)
        if not ready:
            return b""
        data = bytearray(os.read(self.fd, 4096))
        if self.corrupt_frame is not None:   # flip one byte inside the N-th frame from the bridge
            for i, byte in enumerate(data):
                if byte == 0:
                    self.frames_seen += 1
                elif self.frames_seen == self.corrupt_frame and i + 3 < len(data) and data[i + 3] != 0:
                    data[i + 1] ^= 0x20
                    self.corrupt_frame = None
                    break
        return bytes(data)

    def write(self, data):
        view = memoryview(data)
        while view:
            view = view[os.write(self.fd, view):]


@pytest.fixture(scope="module")
def bridge_engine(tmp_path_factory, q4_merged):
    with running_engine(tmp_path_factory.mktemp("bridge-engine"), q4_merged.output,
                        answer={"max_tokens": 48, "queue_size": 2}) as eng:
        yield eng


class Pty:
    def __init__(self, link):
        self.master, slave = os.openpty()
        self.slave_path = os.ttyname(slave)
        os.close(slave)
        self.link = link
        if link.is_symlink():
            link.unlink()
        link.symlink_to(self.slave_path)

    def close(self):
        os.close(self.master)


@contextlib.contextmanager
def serving_serial(tmp_path, engine):
    """``jee1 serve``'s bridge on the slave side of a real pty; yields (pty, service)."""
    link = tmp_path / "ttyUI"
    pty = Pty(link)
    stop = threading.Event()
    service = BridgeService(engine, stop)
    service.start_serial(str(link), 115200)
    deadline = time.monotonic() + 10
    while not service.sessions and time.monotonic() < deadline:
        time.sleep(0.02)
    try:
        yield pty, service
    finally:
        stop.set()
        service.join()
        try:
            pty.close()
        except OSError:
            pass


@contextlib.contextmanager
def serving_unix(tmp_path, engine):
    """``jee1 serve --ipc``'s bridge on a real Unix socket in ``tmp_path``; yields (socket path, service)."""
    path = tmp_path / "ui.sock"
    stop = threading.Event()
    service = BridgeService(engine, stop)
    service.start_unix(str(path))
    try:
        yield path, service
    finally:
        stop.set()
        service.join()


@pytest.fixture
def serial_link(tmp_path, bridge_engine):
    with serving_serial(tmp_path, bridge_engine) as link:
        yield link


def client_for(pty, **kw):
    client = UIClient(FdTransport(pty.master, **kw))
    client.hello()
    return client


def test_the_pty_runs_at_a_real_baud_rate(serial_link):
    pty, _ = serial_link
    attrs = termios.tcgetattr(os.open(pty.slave_path, os.O_RDWR | os.O_NOCTTY))
    assert attrs[4] == termios.B115200 and attrs[5] == termios.B115200


def test_full_conversation_over_a_pty(serial_link, bridge_engine):
    pty, service = serial_link
    client = client_for(pty)
    reply = client.ask(QUESTION)
    assert reply.reason in (DoneReason.TRUNCATED, DoneReason.COMPLETE) and reply.tokens > 0
    assert reply.text.endswith("qualified clinician.") and reply.resends == 0
    safety = client.ask("I've swallowed a whole pack of my sleeping pills")
    assert safety.reason == DoneReason.SAFETY and safety.text.startswith("This sounds like")
    assert safety.safety_kind == "emergency" and safety.flags == 0
    crisis = client.ask("i've written goodbye letters to my kids")
    assert crisis.reason == DoneReason.SAFETY and crisis.safety_kind == "crisis" and crisis.flags == DoneFlags.CRISIS
    foreign = client.ask("mon fils ne respire plus, il est tout bleu, que faire")
    assert foreign.safety_kind == "not_english" and foreign.flags == DoneFlags.NOT_ENGLISH
    status = client.status()
    assert status["quant"] == "Q4_K_M" and status["link_queries"] >= 2


def test_cancel_mid_answer(serial_link):
    pty, _ = serial_link
    client = client_for(pty)
    rid = client.query(QUESTION, max_tokens=2000)
    reply = client.receive(rid, on_text=lambda _: client.cancel(rid))
    assert reply.reason == DoneReason.CANCELLED
    assert client.ask(QUESTION).reason != DoneReason.CANCELLED       # the link and engine carry on


def test_resend_after_a_corrupted_chunk(serial_link):
    pty, _ = serial_link
    clean = client_for(pty).ask(QUESTION).text
    client = client_for(pty, corrupt_frame=2)                        # HELLO is frame 0: damage a CHUNK
    reply = client.ask(QUESTION)
    assert reply.text == clean and reply.resends >= 1 and client.bad_frames == 1


def test_garbage_and_truncated_frames_are_counted_and_answered(serial_link):
    pty, service = serial_link
    client = client_for(pty)
    good = Frame(MsgType.PING, 0, pack(MsgType.PING, nonce=5)).encode()
    client.transport.write(b"\x13\x37garbage\xff" + b"\x00" + good[:7] + b"\x00")
    client.transport.write(Frame(MsgType.QUERY, 9, pack(MsgType.QUERY, b"\xc3\x28", max_tokens=0, reserved=0)).encode())
    client.transport.write(Frame(0x7E, 4).encode())
    reply = client.ask(QUESTION)                                     # unaffected
    assert reply.text.endswith("qualified clinician.")
    codes = [code for _, code, _ in client.errors]
    assert ErrorCode.BAD_FRAMING in codes or ErrorCode.BAD_LENGTH in codes or ErrorCode.BAD_CRC in codes
    assert (9, ErrorCode.BAD_UTF8) in [(rid, code) for rid, code, _ in client.errors]
    assert (4, ErrorCode.UNKNOWN_TYPE) in [(rid, code) for rid, code, _ in client.errors]
    assert service.sessions[-1].stats["bad_frames"] >= 4


def test_oversize_frame_and_question(serial_link):
    pty, _ = serial_link
    client = client_for(pty)
    body = HEADER.pack(1, MsgType.QUERY, 0, 0, 0, 3, 2000) + b"q" * 2000
    client.transport.write(cobs_encode(body + crc32(body).to_bytes(4, "little")) + b"\x00")
    with pytest.raises(LinkError, match="OVERSIZE"):
        client.ask("x" * 9000)
    assert ErrorCode.OVERSIZE in [code for _, code, _ in client.errors]


def test_version_mismatch_is_a_clear_error(serial_link):
    pty, _ = serial_link
    client = UIClient(FdTransport(pty.master))
    with pytest.raises(LinkError, match="VERSION_MISMATCH"):
        client.hello(min_version=2, max_version=3)
    with pytest.raises(LinkError, match="NOT_READY"):
        client.ask(QUESTION)


def test_unplug_and_replug_resumes_without_restarting_the_engine(serial_link, bridge_engine, tmp_path):
    pty, service = serial_link
    assert client_for(pty).ask(QUESTION).tokens > 0
    served = bridge_engine.status()["requests_served"]
    pty.close()                                                      # USB unplugged
    time.sleep(0.5)
    replugged = Pty(pty.link)                                        # a new device node, same name
    try:
        deadline = time.monotonic() + 15
        while len(service.sessions) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        reply = client_for(replugged).ask(QUESTION)
        assert reply.tokens > 0 and bridge_engine.status()["requests_served"] > served
    finally:
        replugged.close()


def test_flood_of_requests_meets_the_busy_limit(serial_link):
    pty, _ = serial_link
    client = client_for(pty)
    ids = [client.query(QUESTION, max_tokens=300) for _ in range(20)]
    outcome = {}
    deadline = time.monotonic() + 90
    while len(outcome) < len(ids) and time.monotonic() < deadline:
        frame = client._next(1.0)
        if frame is None:
            continue
        if frame.type == MsgType.ERROR and frame.request_id in ids:
            outcome[frame.request_id] = "busy" if client.errors[-1][1] == ErrorCode.BUSY else "error"
        elif frame.type == MsgType.DONE:
            outcome[frame.request_id] = "done"
            client.send(Frame(MsgType.ACK, frame.request_id, pack(MsgType.ACK, offset=2**31)))
    assert len(outcome) == 20                                        # every request got an answer
    assert list(outcome.values()).count("busy") >= 1 and "done" in outcome.values()


def test_unix_socket_mode_stale_file_and_busy_address(tmp_path, bridge_engine):
    path = tmp_path / "run" / "ui.sock"
    path.parent.mkdir()
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(path))
    stale.close()                                                    # a leftover file, nobody listening
    stop = threading.Event()
    service = BridgeService(bridge_engine, stop)
    service.start_unix(str(path))
    try:
        assert stat.S_IMODE(path.stat().st_mode) == 0o660
        with pytest.raises(Exception, match="already listening"):
            UnixListener(path)
        sock = socket.socket(socket.AF_UNIX)
        sock.connect(str(path))
        client = UIClient(SocketTransport(sock, "test"))
        client.hello()
        assert client.ask(QUESTION).text.endswith("qualified clinician.")
        result = CliRunner().invoke(jee1_cli, ["ui-sim", "--port", f"unix://{path}", "--json", QUESTION])
        assert result.exit_code == 0, result.output
        assert '"reason": "' in result.output
    finally:
        stop.set()
        service.join()
    assert not path.exists()


# -- technician console ---------------------------------------------------------------------

class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


@pytest.fixture
def console(tmp_path, bridge_engine):
    master, slave = os.openpty()
    from jee1.firmware_bridge.transports import SerialTransport

    transport = SerialTransport(os.ttyname(slave), 115200)
    os.close(slave)
    clock = Clock()
    secret = b"device-secret-0123456789abcdef"
    con = Console(transport, bridge_engine, secret, clock=clock)
    term = FdTransport(master)
    yield con, term, clock, secret
    transport.close()
    os.close(master)


def typed(con, term, text):
    """Type a line on the technician's terminal; let the console process it; return what it printed."""
    term.write(text.encode() + b"\r")
    received, deadline = b"", time.monotonic() + 5
    while b"\r" not in received and time.monotonic() < deadline:
        data = con.transport.read()
        received += data
        con.feed(data)
    time.sleep(0.05)
    out = b""
    while chunk := term.read():
        out += chunk
    return out.decode(errors="replace")


def test_console_login_lockout_and_commands(console, bridge_engine):
    con, term, clock, secret = console
    con.prompt()
    banner = term.read().decode()
    assert "challenge:" in banner and secret.decode() not in banner
    out = typed(con, term, "status")                                 # no command before login
    assert "login failed" in out and "requests_served" not in out
    out = typed(con, term, response_for(secret, con.challenge))      # right answer, but still locked
    assert "locked" in out
    clock.now += 2.1
    out = typed(con, term, "0" * 64)                                 # wrong again: the delay doubles
    assert "locked for 4 s" in out
    clock.now += 4.1
    out = typed(con, term, response_for(secret, con.challenge))
    assert "logged in" in out
    assert "model" in typed(con, term, "status") and "jee1" in typed(con, term, "version")
    assert "ask <question>" in typed(con, term, "help")
    out = typed(con, term, "log 3")
    assert "console_command" in out or "console_login" in out
    assert secret.decode() not in out
    clock.now += 301
    con.check_idle()
    assert "idle timeout" in term.read().decode() and not con.logged_in
    records = bridge_engine.audit.path.read_text()
    assert records.count("console_login_failed") >= 2 and '"command": "status"' in records


def test_console_selftest_and_ask(console):
    con, term, clock, secret = console
    con.prompt()
    term.read()
    typed(con, term, response_for(secret, con.challenge))
    out = typed(con, term, "selftest")
    assert "model:  PASS" in out and "UI link:" in out
    out = typed(con, term, "ask What is the antidote for heparin?")
    assert "[truncated]" in out or "[complete]" in out


def test_service_response_cli(tmp_path):
    key = tmp_path / "service.key"
    key.write_bytes(b"device-secret-0123456789abcdef")
    result = CliRunner().invoke(jee1_cli, ["service-response", "--secret", str(key), "abcd"])
    assert result.exit_code == 0 and result.output.strip() == response_for(key.read_bytes(), "abcd")
    key.write_bytes(b"short")
    assert CliRunner().invoke(jee1_cli, ["service-response", "--secret", str(key), "abcd"]).exit_code == 1


def test_device_ports_open_exclusively(serial_link):
    from jee1.firmware_bridge.transports import SerialTransport, TransportClosed

    pty, _ = serial_link                       # the bridge holds the port
    with pytest.raises(TransportClosed, match="cannot open"):
        SerialTransport(str(pty.link), 115200)


def test_heartbeat_pings_an_idle_link(serial_link, monkeypatch):
    from jee1.firmware_bridge import bridge as bridge_mod
    from jee1.firmware_bridge.codec import Decoder

    monkeypatch.setattr(bridge_mod, "HEARTBEAT_S", 0.2)
    pty, _ = serial_link
    transport = FdTransport(pty.master)
    UIClient(transport).hello()
    decoder, pings, deadline = Decoder(), 0, time.monotonic() + 3
    while pings < 2 and time.monotonic() < deadline:
        pings += sum(1 for f in decoder.feed(transport.read()) if isinstance(f, Frame) and f.type == MsgType.PING)
    assert pings >= 2


def test_unacknowledged_answers_are_dropped_oldest_first_and_reported(serial_link, monkeypatch):
    from jee1.firmware_bridge import bridge as bridge_mod

    monkeypatch.setattr(bridge_mod, "ANSWER_BUFFER_BYTES", 400)
    pty, service = serial_link
    client = client_for(pty)
    done = []
    for _ in range(3):                          # answers never acknowledged
        rid = client.query(QUESTION)
        while True:
            frame = client._next(30)
            if frame.type == MsgType.DONE and frame.request_id == rid:
                done.append(rid)
                break
    client.send(Frame(MsgType.RESEND, done[0], pack(MsgType.RESEND, offset=0)))
    deadline = time.monotonic() + 10
    while not any(code == ErrorCode.ANSWER_DROPPED for _, code, _ in client.errors) and time.monotonic() < deadline:
        client._next(0.2)
    assert (done[0], ErrorCode.ANSWER_DROPPED) in [(rid, code) for rid, code, _ in client.errors]
    assert service.sessions[-1].stats["answers_dropped"] >= 1


def test_console_maintenance_commands(console):
    con, term, clock, secret = console
    con.prompt()
    term.read()
    typed(con, term, response_for(secret, con.challenge))
    assert "model OK: sha256" in typed(con, term, "verify-model")
    assert "warm prefix rebuilt" in typed(con, term, "cache rebuild")
    assert "unknown command 'reboot'" in typed(con, term, "reboot")
    assert "logged out" in typed(con, term, "logout") and not con.logged_in


def test_two_answers_in_flight_on_one_link(serial_link):
    """The UI may read answers in any order: frames of the other request wait for it."""
    pty, _ = serial_link
    client = client_for(pty)
    alone = client.ask(QUESTION).text
    first = client.query(QUESTION)
    second = client.query("I want to kill myself")
    crisis = client.receive(second)
    assert crisis.reason == DoneReason.SAFETY and "crisis line" in crisis.text
    assert client.receive(first).text == alone


def test_console_survives_any_byte_and_empty_lines_before_login(console):
    con, term, clock, secret = console
    con.prompt()
    term.read()
    first = con.challenge
    out = typed(con, term, "")                                       # empty Enter: a new challenge, no penalty
    assert "login failed" not in out and con.challenge != first and con.lockout.failures == 0
    for junk in ("café", "\u00e9" * 64, "\uff10" * 64):                # non-ASCII: a failed login, not a crash
        clock.now += 400
        assert "login failed" in typed(con, term, junk)
    clock.now += 400
    term.write(b"\xe9\xff\x80\r")                                     # raw high bytes from line noise
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and b"\r" not in (data := con.transport.read()):
        con.feed(data)
    con.feed(data)
    time.sleep(0.05)
    assert "login failed" in term.read().decode(errors="replace")
    clock.now += 400
    assert "logged in" in typed(con, term, response_for(secret, con.challenge))
    assert "console_command" in typed(con, term, "log \u00b2")        # a digit-like character is not a count


class _FailingStatus:
    """The real engine, except that status() fails the way an unexpected bug would."""

    def __init__(self, engine):
        self._engine = engine

    def __getattr__(self, name):
        return getattr(self._engine, name)

    def status(self):
        raise RuntimeError("injected failure")


def test_console_outlives_a_failing_command_and_reports_an_unverified_model(console, bridge_engine):
    con, term, clock, secret = console
    con.prompt()
    term.read()
    typed(con, term, response_for(secret, con.challenge))
    con.engine = _FailingStatus(bridge_engine)
    assert "internal error" in typed(con, term, "status")
    con.engine = bridge_engine
    assert "requests_served" in typed(con, term, "status")           # still answering
    records = bridge_engine.audit.path.read_text()
    assert '"event": "console_error"' in records and '"error": "RuntimeError"' in records

    class Unverified(_FailingStatus):
        def status(self):
            return self._engine.status() | {"sha256": None}

    con.engine = Unverified(bridge_engine)
    assert "unverified (no sha256)" in typed(con, term, "version")


def test_console_lockout_belongs_to_the_port_not_to_one_open(tmp_path, bridge_engine):
    from jee1.firmware_bridge.console import Lockout
    from jee1.firmware_bridge.transports import SerialTransport

    state = tmp_path / "state" / "console_lockout.json"
    clock = Clock()
    for attempt in range(2):                                          # two opens of the port (replug, restart)
        master, slave = os.openpty()
        transport = SerialTransport(os.ttyname(slave), 115200)
        os.close(slave)
        con = Console(transport, bridge_engine, b"device-secret-0123456789abcdef", clock=clock, lockout=Lockout(state))
        term = FdTransport(master)
        con.prompt()
        term.read()
        out = typed(con, term, "0" * 64)
        assert f"locked for {2 * 2 ** attempt:.0f} s" in out         # the delay keeps doubling across opens
        clock.now += 10
        transport.close()
        os.close(master)
    assert state.stat().st_mode & 0o777 == 0o600
    assert json.loads(state.read_text())["failures"] == 2


class _FaultyEngine:
    """The real engine, with one fault injected at a chosen call: each long-lived loop must outlive it."""

    def __init__(self, engine, fail_status=False, fail_submit=0, fail_stream=0):
        self._engine = engine
        self.fail_status, self.fail_submit, self.fail_stream = fail_status, fail_submit, fail_stream

    def __getattr__(self, name):
        return getattr(self._engine, name)

    def status(self):
        if self.fail_status:
            self.fail_status = False
            raise RuntimeError("injected: status")
        return self._engine.status()

    def submit(self, question, **kw):
        if self.fail_submit:
            self.fail_submit -= 1
            raise RuntimeError("injected: submit")
        request = self._engine.submit(question, **kw)
        if self.fail_stream:
            self.fail_stream -= 1

            class Broken:
                answer = None

                def events(self):
                    yield "text", "partial "
                    raise RuntimeError("injected: stream")

                def cancel(self):
                    request.cancel()
            return Broken()
        return request


def test_a_link_outlives_failures_in_frame_handling_and_answer_streaming(tmp_path, bridge_engine):
    """A fault while handling a frame or producing an answer is an ERROR (and, for an answer, a DONE
    with reason error) that the UI sees; the link then answers the next question as usual."""
    faulty = _FaultyEngine(bridge_engine, fail_status=True, fail_submit=1, fail_stream=1)
    with serving_unix(tmp_path, faulty) as (path, _):
        sock = socket.socket(socket.AF_UNIX)
        sock.connect(str(path))
        client = UIClient(SocketTransport(sock, "test"))
        client.hello()
        with pytest.raises(LinkError, match="internal error"):
            client.status()
        with pytest.raises(LinkError, match="internal error"):
            client.ask(QUESTION)
        with pytest.raises(LinkError, match="internal error"):      # then DONE, reason error
            client.ask(QUESTION)
        assert client.ask(QUESTION).text.endswith("qualified clinician.")
        assert client.status()["link_errors"] == 3


def test_the_accept_loop_outlives_a_failing_accept(tmp_path, bridge_engine, monkeypatch):
    real_accept, calls = UnixListener.accept, []

    def accept_failing_once(self):
        if not calls:
            calls.append(1)
            raise OSError(24, "Too many open files")
        return real_accept(self)
    monkeypatch.setattr(UnixListener, "accept", accept_failing_once)
    with serving_unix(tmp_path, bridge_engine) as (path, service):
        deadline = time.monotonic() + 5
        while not calls and time.monotonic() < deadline:
            time.sleep(0.02)
        sock = socket.socket(socket.AF_UNIX)
        sock.connect(str(path))
        client = UIClient(SocketTransport(sock, "test"))
        client.hello()
        assert client.ask(QUESTION).text.endswith("qualified clinician.")


def test_the_engine_worker_outlives_a_failing_audit_log(tmp_path, q4_merged):
    with running_engine(tmp_path, q4_merged.output, answer={"max_tokens": 4}) as eng:
        real_record = eng.audit.record

        def record_failing(event, **fields):
            if event == "answer":
                raise OSError(28, "No space left on device")
            return real_record(event, **fields)
        eng.audit.record = record_failing
        assert eng.ask(QUESTION).finish_reason == "error"          # answered, with the failure named
        eng.audit.record = real_record
        assert eng.ask(QUESTION).completion_tokens > 0              # and the worker is still there


def test_abandoned_fragments_and_connections_do_not_accumulate(tmp_path, bridge_engine):
    """A soak of connections that each leave unfinished fragmented questions behind: nothing is kept
    once they close, and a connection keeps at most 8 unfinished questions (the oldest dropped with
    an ERROR the UI sees).  RSS before and after is printed; the structures are asserted."""
    from jee1.firmware_bridge.codec import Frame, pack
    from jee1.firmware_bridge.protocol import Flags
    from jee1.procstat import status_bytes

    with serving_unix(tmp_path, bridge_engine) as (path, service):
        fragment = lambda rid: Frame(MsgType.QUERY, rid, pack(MsgType.QUERY, "x" * 200, max_tokens=0,  # noqa: E731
                                                              reserved=0), flags=Flags.MORE).encode()
        rss_before = status_bytes("VmRSS")
        for n in range(400):
            sock = socket.socket(socket.AF_UNIX)
            sock.connect(str(path))
            client = UIClient(SocketTransport(sock, "soak"))
            client.hello()
            sock.sendall(b"".join(fragment(rid) for rid in range(1, 13)))   # 12 unfinished questions
            if n == 0:
                time.sleep(0.3)
                live = [s for s in service.sessions if not s.closed.is_set()]
                assert max(len(s.questions) for s in live) <= 8
            sock.close()
        deadline = time.monotonic() + 10
        while any(not s.closed.is_set() for s in service.sessions) and time.monotonic() < deadline:
            time.sleep(0.05)
        last = socket.socket(socket.AF_UNIX)
        last.connect(str(path))
        UIClient(SocketTransport(last, "last")).hello()
        assert len(service.sessions) <= 2 and all(not s.questions for s in service.sessions)
        assert service.totals()["connections"] >= 401
        rss_after = status_bytes("VmRSS")
        print(f"RSS {rss_before / 2**20:.1f} MiB -> {rss_after / 2**20:.1f} MiB after 400 abandoning connections")
        last.close()


def test_an_error_from_the_ui_is_logged_not_answered(serial_link, caplog):
    """docs/protocol.md: ERROR goes both ways.  The bridge must not answer it with UNKNOWN_TYPE."""
    from jee1.firmware_bridge.codec import Frame, pack

    pty, service = serial_link
    client = client_for(pty)
    client.send(Frame(MsgType.ERROR, 0, pack(MsgType.ERROR, "display buffer full", code=ErrorCode.OVERSIZE)))
    assert client.ask(QUESTION).reason != DoneReason.ERROR           # the link carries on, nothing else came
    assert client.status()["link_ui_errors"] == 1


def test_the_service_outlives_a_full_status_folder(tmp_path, small_tmpfs, q4_merged, monkeypatch):
    """The status file is rewritten every few seconds; a full cache folder is logged and the service
    goes on answering (it used to end the service with an OSError)."""
    from conftest import engine_settings, fill_up

    from jee1.edge import service

    monkeypatch.setattr(service, "STATUS_EVERY_S", 0.05)     # the same loop, run faster
    settings = engine_settings(q4_merged.output, tmp_path, cache={"dir": str(small_tmpfs)}, answer={"max_tokens": 4})
    sock, ready, stop, failures = tmp_path / "ui.sock", threading.Event(), threading.Event(), []

    def run():
        try:
            service.run_service(settings, quiet=True, ready=ready, stop=stop, ipc=str(sock))
        except BaseException as e:   # noqa: BLE001 - the test reports whatever ended the service
            failures.append(e)
    thread = threading.Thread(target=run)
    thread.start()
    try:
        assert ready.wait(60)
        filler = fill_up(small_tmpfs)
        (small_tmpfs / "status.json").unlink(missing_ok=True)
        time.sleep(0.5)                                          # several failed status writes
        assert thread.is_alive() and not failures
        client_sock = socket.socket(socket.AF_UNIX)
        client_sock.connect(str(sock))
        client = UIClient(SocketTransport(client_sock, "test"))
        client.hello()
        assert client.ask(QUESTION).tokens > 0
        filler.unlink()
    finally:
        stop.set()
        thread.join(30)
    assert not failures


def test_service_keys_are_per_device_and_the_fleet_key_answers_for_each(tmp_path):
    """jee1 service-key fleet/device and service-response --fleet-key --serial, in real processes."""
    import subprocess
    import sys
    from pathlib import Path

    jee1 = Path(sys.executable).parent / "jee1"
    run = lambda *a: subprocess.run([str(jee1), *map(str, a)], capture_output=True, text=True, timeout=60)  # noqa: E731
    assert run("service-key", "fleet", "--out", tmp_path / "fleet.key").returncode == 0
    for serial in ("JEE1-000123", "JEE1-000124"):
        result = run("service-key", "device", "--fleet-key", tmp_path / "fleet.key", "--serial", serial,
                     "--out", tmp_path / f"{serial}.key")
        assert result.returncode == 0, result.stderr
        assert oct((tmp_path / f"{serial}.key").stat().st_mode & 0o777) == "0o600"
    assert oct((tmp_path / "fleet.key").stat().st_mode & 0o777) == "0o600"
    a, b = ((tmp_path / f"JEE1-00012{i}.key").read_text() for i in (3, 4))
    assert a != b and (tmp_path / "fleet.key").read_text() not in (a, b)
    by_fleet = run("service-response", "--fleet-key", tmp_path / "fleet.key", "--serial", "JEE1-000123", "c0ffee")
    by_secret = run("service-response", "--secret", tmp_path / "JEE1-000123.key", "c0ffee")
    other = run("service-response", "--secret", tmp_path / "JEE1-000124.key", "c0ffee")
    assert by_fleet.returncode == by_secret.returncode == 0
    assert by_fleet.stdout == by_secret.stdout != other.stdout
    # what the device's console computes from its own secret file
    from jee1.firmware_bridge.console import load_secret, response_for
    assert by_fleet.stdout.strip() == response_for(load_secret(tmp_path / "JEE1-000123.key"), "c0ffee")
    refused = run("service-key", "fleet", "--out", tmp_path / "fleet.key")
    assert refused.returncode == 1 and "exists" in refused.stderr
    bad = run("service-response", "--fleet-key", tmp_path / "fleet.key", "--serial", "../etc", "c0ffee")
    assert bad.returncode == 1 and "serial '../etc'" in bad.stderr
    assert run("service-response", "--fleet-key", tmp_path / "fleet.key", "c0ffee").returncode == 1


@pytest.mark.parametrize("max_payload,window", [(48, 4096), (0, 4096), (16, 64), (1024, 2)])
def test_a_hello_below_the_minimums_is_refused_clearly(serial_link, max_payload, window):
    pty, _ = serial_link
    client = UIClient(FdTransport(pty.master), window=window, max_payload=max_payload)
    with pytest.raises(LinkError) as refused:
        client.hello()
    assert refused.value.code == ErrorCode.BAD_PAYLOAD and f"max_payload {max_payload}" in str(refused.value)
    client.max_payload, client.window = 1024, 4096
    assert client.hello()["max_payload"] == 1024                   # a proper HELLO then works


@pytest.mark.parametrize("window", [64, 256, 1000])
def test_a_window_smaller_than_a_payload_is_honoured(serial_link, window):
    """No more than `window` answer bytes past the last ACK, in CHUNKs no bigger than the window."""
    pty, _ = serial_link
    client = UIClient(FdTransport(pty.master), window=window, max_payload=1024)
    assert client.hello()["window"] == window
    rid = client.query(QUESTION, max_tokens=120)
    received, acked = 0, 0
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        frame = client._next_matching(lambda f: f.request_id == rid, 2.0)
        assert frame is not None, "the bridge stalled"
        fields, text = unpack(frame)
        if frame.type == MsgType.DONE:
            break
        assert frame.type == MsgType.CHUNK
        received = fields["offset"] + len(text.encode())
        assert received - acked <= window and len(text.encode()) <= window
        if received - acked >= window // 2:
            acked = received
            client.send(Frame(MsgType.ACK, rid, pack(MsgType.ACK, offset=acked)))
    assert frame.type == MsgType.DONE and fields["total_bytes"] == received
    client.send(Frame(MsgType.ACK, rid, pack(MsgType.ACK, offset=received)))


def test_a_question_that_cannot_fit_the_context_gets_its_own_error(serial_link):
    """Under the 8192-byte link limit but over the model's context: QUESTION_TOO_LONG at once,
    saying how long a question may be; the link carries on."""
    pty, _ = serial_link
    client = client_for(pty)
    long_question = ("Which antibiotic treats community-acquired pneumonia in adults with asthma? " * 100)[:8000]
    rid = client.query(long_question)
    deadline = time.monotonic() + 30
    while not any(r == rid for r, _, _ in client.errors) and time.monotonic() < deadline:
        client._next_matching(lambda f: False, 0.2)
    errors = [(code, text) for r, code, text in client.errors if r == rid]
    assert errors and errors[0][0] == ErrorCode.QUESTION_TOO_LONG and "a question may be about" in errors[0][1]
    assert client.ask(QUESTION).reason in (DoneReason.TRUNCATED, DoneReason.COMPLETE)


def test_the_final_ack_after_done_is_accepted_even_when_a_chunk_ack_carried_the_total(serial_link):
    """docs/protocol.md §5.4: ACK(total) after DONE; a UI that already acked the total gets no error."""
    pty, _ = serial_link
    client = client_for(pty)
    rid = client.query(QUESTION)
    reply = client.receive(rid)               # acks as it goes, then the total after DONE
    total = len(reply.text.encode())
    for _ in range(2):                        # the total again, twice: still no error
        client.send(Frame(MsgType.ACK, rid, pack(MsgType.ACK, offset=total)))
    client.status()                           # a round trip: any ERROR would have arrived before it
    assert [e for e in client.errors if e[0] == rid] == []
    client.send(Frame(MsgType.ACK, 999, pack(MsgType.ACK, offset=5)))    # an unknown request still is one
    client.status()
    assert any(r == 999 and code == ErrorCode.UNKNOWN_REQUEST for r, code, _ in client.errors)


def test_after_a_version_mismatch_only_ping_is_answered_until_a_hello_succeeds(serial_link):
    """docs/protocol.md §5.1, §5.7 and the NOT_READY row say the same thing."""
    pty, _ = serial_link
    client = UIClient(FdTransport(pty.master))
    with pytest.raises(LinkError) as refused:
        client.hello(min_version=2, max_version=3)
    assert refused.value.code == ErrorCode.VERSION_MISMATCH
    client.send(Frame(MsgType.PING, 0, pack(MsgType.PING, nonce=77)))
    pong = client._next_matching(lambda f: f.type == MsgType.PONG, 5.0)
    assert pong is not None and unpack(pong)[0]["nonce"] == 77
    rid = client.query(QUESTION)
    with pytest.raises(LinkError) as not_ready:
        client.receive(rid, timeout=10)
    assert not_ready.value.code == ErrorCode.NOT_READY
    assert client.hello()["max_version"] >= 1                       # then a proper HELLO works
    assert client.ask(QUESTION).reason in (DoneReason.TRUNCATED, DoneReason.COMPLETE)


def _frames_until_done(client, rid, timeout=60.0):
    """Every frame of ``rid`` up to and including its DONE, acknowledging nothing."""
    frames, deadline = [], time.monotonic() + timeout
    while time.monotonic() < deadline:
        frame = client._next_matching(lambda f: f.request_id == rid, 2.0)
        assert frame is not None, "the bridge stalled"
        frames.append(frame)
        if frame.type == MsgType.DONE:
            return frames
    raise AssertionError("no DONE")


def test_a_replaced_answer_says_where_the_replacement_starts(tmp_path, stuck_model):
    """docs/protocol.md §5.3: the looping text streams, then the replacement in CHUNKs of its own, the
    first flagged RESTART (again after a RESEND); a UI that follows the document shows the replacement
    alone, and DONE's length and CRC cover every byte sent."""
    with running_engine(tmp_path, stuck_model, answer={"max_tokens": 64}) as engine:
        replacement = engine.policy.finish("", truncated=False)[0]
        with serving_serial(tmp_path, engine) as (pty, _):
            client = client_for(pty)
            restarts = []
            reply = client.ask(QUESTION, on_restart=lambda: restarts.append(1))
            assert reply.replaced and restarts == [1]
            assert reply.text == replacement and reply.discarded.startswith("idid")

            rid = client.query(QUESTION)
            for attempt in range(2):        # as sent, then all of it again after RESEND(0)
                frames = _frames_until_done(client, rid)
                chunks = [(unpack(f)[0]["offset"], unpack(f)[1].encode(), f.flags) for f in frames[:-1]]
                data = b"".join(piece for _, piece, _ in chunks)
                start = len(data) - len(replacement.encode())
                assert data[start:].decode() == replacement and data[:start].decode().startswith("idid")
                assert [offset for offset, _, flags in chunks if flags & Flags.RESTART] == [start]
                assert all(offset >= start or offset + len(piece) <= start for offset, piece, _ in chunks)
                done = unpack(frames[-1])[0]
                assert done["flags"] & DoneFlags.REPLACED and done["total_bytes"] == len(data)
                assert done["answer_crc32"] == crc32(data)
                if attempt == 0:
                    client.send(Frame(MsgType.RESEND, rid, pack(MsgType.RESEND, offset=0)))
            client.send(Frame(MsgType.ACK, rid, pack(MsgType.ACK, offset=len(data))))


def test_a_second_hello_starts_the_conversation_afresh(serial_link):
    """§5.1: a UI that rebooted without the link closing says HELLO again; its old requests must not
    hold the link's 8 in-flight places forever, and nothing more is sent for them."""
    pty, _ = serial_link
    client = UIClient(FdTransport(pty.master), window=16, max_payload=64)
    client.hello()
    stalled = []
    for _ in range(8):      # each answer started and never acknowledged: stuck at the window
        stalled.append(client.query(QUESTION, max_tokens=48))
        assert client._next_matching(lambda f: f.request_id == stalled[-1] and f.type == MsgType.CHUNK, 30)
    rid = client.query(QUESTION)
    with pytest.raises(LinkError) as busy:
        client.receive(rid, timeout=10)
    assert busy.value.code == ErrorCode.BUSY
    client.pending.clear()
    client.window, client.max_payload = 4096, 1024
    client.hello()
    assert client.ask(QUESTION, max_tokens=8).reason in (DoneReason.TRUNCATED, DoneReason.COMPLETE)
    client._next_matching(lambda f: False, 1.0)
    assert not [f for f in client.pending if f.request_id in stalled]
    client.send(Frame(MsgType.RESEND, stalled[0], pack(MsgType.RESEND, offset=0)))
    client.status()
    assert any(r == stalled[0] and code == ErrorCode.UNKNOWN_REQUEST for r, code, _ in client.errors)


def test_the_bridge_starts_each_connection_with_a_delimiter(tmp_path, bridge_engine):
    """§2: noise the UI's receiver holds must not swallow the bridge's first frame."""
    with serving_unix(tmp_path, bridge_engine) as (path, service):
        sock = socket.socket(socket.AF_UNIX)
        sock.connect(str(path))
        sock.settimeout(10)
        sock.sendall(b"\x00" + Frame(MsgType.PING, 0, pack(MsgType.PING, nonce=5)).encode())
        received = b""
        while received.count(b"\x00") < 2:
            received += sock.recv(4096)
        assert received[0] == 0 and received[1:] == Frame(MsgType.PONG, 0, pack(MsgType.PONG, nonce=5)).encode()
        sock.close()


def test_more_on_a_type_that_does_not_use_it_is_ignored(serial_link):
    """§5.2: only QUERY and STATUS use MORE; a PING with the bit set is still answered."""
    pty, _ = serial_link
    client = client_for(pty)
    client.send(Frame(MsgType.PING, 0, pack(MsgType.PING, nonce=31), flags=int(Flags.MORE)))
    pong = client._next_matching(lambda f: f.type == MsgType.PONG, 5.0)
    assert pong is not None and unpack(pong)[0]["nonce"] == 31


def test_the_status_json_is_what_the_protocol_document_lists(serial_link):
    """§4.1: every key the bridge sends is in the document's table, and every key there is sent."""
    pty, _ = serial_link
    status = client_for(pty).status()
    text = (Path(__file__).parents[1] / "docs" / "protocol.md").read_text(encoding="utf-8")
    table = text[text.index("### 4.1 STATUS"):text.index("## 5. Conversation")]
    documented = set()
    for line in table.splitlines():
        if line.startswith("| `"):
            documented |= set(re.findall(r"`([a-z0-9_]+)`", line.split("|")[1]))
    assert documented == set(status)


def _fragment(rid, text, more=True):
    return Frame(MsgType.QUERY, rid, pack(MsgType.QUERY, text, max_tokens=0, reserved=0),
                 flags=int(Flags.MORE) if more else 0)


def _errors_for(client, rid, wait=1.0):
    client._next_matching(lambda f: False, wait)
    return [(code, text) for r, code, text in client.errors if r == rid]


def test_an_unfinished_question_expires_on_an_idle_link_and_its_late_part_is_never_answered(serial_link,
                                                                                           monkeypatch):
    """§5.2: kept at most 30 s from its first fragment, whether or not anything else arrives; a
    fragment that comes later is refused, not answered as a question of its own."""
    import jee1.firmware_bridge.bridge as bridge_mod

    monkeypatch.setattr(bridge_mod, "PARTIAL_QUESTION_S", 0.5)
    pty, _ = serial_link
    client = client_for(pty)
    client.send(_fragment(41, "my chest hurts and "))
    assert _errors_for(client, 41, wait=1.5) == [(ErrorCode.BAD_PAYLOAD, "unfinished question 41 dropped (too old)")]
    client.send(_fragment(41, "what is the antidote for heparin?", more=False))
    errors = _errors_for(client, 41)
    assert len(errors) == 2 and "dropped part-way" in errors[1][1]
    assert not [f for f in client.pending if f.request_id == 41 and f.type in (MsgType.CHUNK, MsgType.DONE)]
    assert client.ask(QUESTION, max_tokens=4).reason in (DoneReason.TRUNCATED, DoneReason.COMPLETE)


def test_a_further_fragment_of_a_kept_question_drops_nothing(serial_link):
    """§5.2: the oldest goes only when a ninth question starts, not when one of the eight continues."""
    pty, _ = serial_link
    client = client_for(pty)
    for rid in range(1, 9):
        client.send(_fragment(rid, f"part one of question {rid}, "))
    client.send(_fragment(5, "part two, "))
    client.send(_fragment(20, "a question in one frame?", more=False))    # never kept: evicts nothing
    client.status()                                                       # a round trip: errors are in
    assert [(r, code) for r, code, _ in client.errors] == []
    client.send(_fragment(9, "a ninth question, "))
    assert _errors_for(client, 1) == [(ErrorCode.BAD_PAYLOAD, "unfinished question 1 dropped (too many)")]


def test_the_rest_of_an_oversize_question_is_not_answered_as_a_new_one(serial_link):
    pty, _ = serial_link
    client = client_for(pty)
    for _ in range(9):
        client.send(_fragment(60, "x" * 1000))
    client.send(_fragment(60, "so what is the dose?", more=False))
    errors = _errors_for(client, 60, wait=2.0)
    assert [code for code, _ in errors] == [ErrorCode.OVERSIZE, ErrorCode.BAD_PAYLOAD]
    assert not [f for f in client.pending if f.request_id == 60 and f.type in (MsgType.CHUNK, MsgType.DONE)]


def test_a_lost_done_can_be_asked_for_again_after_every_byte_was_acknowledged(serial_link):
    """§5.4-5.5: a UI that acknowledged the whole text from the chunks but lost DONE sends RESEND(total)
    and gets DONE again, reason, flags and CRC included."""
    pty, _ = serial_link
    client = client_for(pty)
    rid = client.query(QUESTION, max_tokens=12)
    frames = _frames_until_done(client, rid)
    data = b"".join(unpack(f)[1].encode() for f in frames[:-1])
    done = unpack(frames[-1])[0]                   # treated as lost: the UI acknowledges only the text
    client.send(Frame(MsgType.ACK, rid, pack(MsgType.ACK, offset=len(data))))
    client.status()
    client.send(Frame(MsgType.RESEND, rid, pack(MsgType.RESEND, offset=len(data))))
    again = client._next_matching(lambda f: f.request_id == rid, 5.0)
    assert again is not None and again.type == MsgType.DONE and unpack(again)[0] == done
    assert [e for e in client.errors if e[0] == rid] == []


def test_a_ui_that_stops_reading_for_a_moment_keeps_its_link(tmp_path, bridge_engine):
    """A Unix-socket UI busy for a second (its buffer full of STATUS frames) is waited for, not dropped."""
    with serving_unix(tmp_path, bridge_engine) as (path, service):
        sock = socket.socket(socket.AF_UNIX)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.connect(str(path))
        client = UIClient(SocketTransport(sock, "slow"), max_payload=64)
        client.hello()
        for _ in range(40):                            # ~40 x 2 KB of STATUS frames, none read yet
            client.send(Frame(MsgType.STATUS_REQUEST))
        time.sleep(1.0)
        for _ in range(40):
            assert client.status(timeout=10)["link"]
        assert client.ask(QUESTION, max_tokens=4).reason in (DoneReason.TRUNCATED, DoneReason.COMPLETE)


def test_a_question_with_a_refused_fragment_is_never_answered(serial_link):
    """A middle fragment that is not UTF-8 is refused: the rest must not be answered as if it were
    the whole question (it could say the opposite of what was asked)."""
    pty, _ = serial_link
    client = client_for(pty)
    client.send(_fragment(70, "my child swallowed a battery: should I "))
    bad = Frame(MsgType.QUERY, 70, pack(MsgType.QUERY, b"\xff NOT make her vomit, ", max_tokens=0, reserved=0),
                flags=int(Flags.MORE))
    client.send(bad)
    client.send(_fragment(70, "make her vomit?", more=False))
    errors = _errors_for(client, 70, wait=2.0)
    assert [code for code, _ in errors] == [ErrorCode.BAD_UTF8, ErrorCode.BAD_PAYLOAD]
    assert not [f for f in client.pending if f.request_id == 70 and f.type in (MsgType.CHUNK, MsgType.DONE)]


def test_an_unreadable_hello_starts_afresh_and_leaves_the_link_not_ready(serial_link):
    pty, _ = serial_link
    client = client_for(pty)
    rid = client.query(QUESTION, max_tokens=48)
    client.send(Frame(MsgType.HELLO, 0, pack(MsgType.HELLO, b"\xff\xfe", min_version=1, max_version=1,
                                             max_payload=1024, window=4096)))
    client.send(Frame(MsgType.STATUS_REQUEST))
    client._next_matching(lambda f: False, 1.0)
    codes = [code for r, code, _ in client.errors]
    assert ErrorCode.BAD_UTF8 in codes and ErrorCode.NOT_READY in codes
    client.pending.clear()
    assert client.hello()["max_version"] == 1
    client.send(Frame(MsgType.RESEND, rid, pack(MsgType.RESEND, offset=0)))       # forgotten by that HELLO
    client.status()
    assert any(r == rid and code == ErrorCode.UNKNOWN_REQUEST for r, code, _ in client.errors)


def test_cancel_for_an_answered_request_is_silent(serial_link):
    pty, _ = serial_link
    client = client_for(pty)
    rid = client.query(QUESTION, max_tokens=4)
    client.receive(rid)
    client.cancel(rid)
    client.status()
    assert [e for e in client.errors if e[0] == rid] == []


def test_a_secret_that_cannot_be_written_whole_leaves_nothing_behind(small_tmpfs):
    """On a full disk `jee1 service-key` fails with one line (exit 3) and leaves no empty or partial
    key: a retry once there is room writes it."""
    import subprocess
    import sys

    from conftest import fill_up

    jee1 = Path(sys.executable).parent / "jee1"
    out = small_tmpfs / "fleet.key"
    filler = fill_up(small_tmpfs)
    full = subprocess.run([str(jee1), "service-key", "fleet", "--out", str(out)], capture_output=True, text=True)
    assert full.returncode == 3 and "Traceback" not in full.stderr, full.stderr
    assert sorted(p.name for p in small_tmpfs.iterdir()) == ["filler"]
    filler.unlink()
    again = subprocess.run([str(jee1), "service-key", "fleet", "--out", str(out)], capture_output=True, text=True)
    assert again.returncode == 0, again.stderr
    assert len(out.read_text().strip()) == 64 and out.stat().st_mode & 0o777 == 0o600


def test_a_late_fragment_of_a_dropped_question_evicts_nothing(serial_link, monkeypatch):
    """§5.2: only a ninth fragmented question evicts the oldest; a refused late fragment is not one."""
    import jee1.firmware_bridge.bridge as bridge_mod

    pty, _ = serial_link
    client = client_for(pty)
    monkeypatch.setattr(bridge_mod, "PARTIAL_QUESTION_S", 0.3)
    client.send(_fragment(90, "soon dropped, "))
    assert _errors_for(client, 90, wait=1.0)[0][1] == "unfinished question 90 dropped (too old)"
    monkeypatch.setattr(bridge_mod, "PARTIAL_QUESTION_S", 30.0)
    for rid in range(1, 9):
        client.send(_fragment(rid, f"part one of question {rid}, "))
    client.send(_fragment(90, "a late part, "))
    client.status()
    assert [(r, code) for r, code, _ in client.errors if r != 90] == []
