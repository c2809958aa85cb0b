"""The technician console: a line-oriented service shell on its own serial port (picocom, screen).

Login first, by challenge-response: the console shows a fresh random challenge; the technician's
laptop computes HMAC-SHA256(device service secret, challenge) with ``jee1 service-response`` and
types the hex result.  Failed attempts lock the console for a doubling delay; an idle session is
logged out; every command and every failed login goes to the audit log; the secret is never shown.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import secrets
import threading
import time
from collections import deque
from pathlib import Path

from jee1 import __version__
from jee1.errors import InputError

from .transports import SerialTransport, TransportClosed

log = logging.getLogger(__name__)

IDLE_TIMEOUT_S = 300.0
LOCKOUT_BASE_S = 2.0
LOCKOUT_MAX_S = 300.0
SELFTEST_QUESTION = "What is the antidote for heparin?"
HELP = """commands:
  help                 this list
  status               engine and link status
  version              software and model versions
  ask <question>       answer a question (streamed)
  selftest             answer a fixed question and check the UI link
  log [n]              last n audit-log lines (default 20)
  verify-model         re-hash the model against its manifest
  cache rebuild        rebuild the warm prompt-prefix cache
  logout               end the session"""


def load_secret(path: str | Path) -> bytes:
    try:
        data = Path(path).read_bytes().strip()
    except OSError as e:
        raise InputError(f"{path}: cannot read the service secret ({e.strerror})") from None
    if len(data) < 16:
        raise InputError(f"{path}: the service secret must be at least 16 bytes")
    return data


def response_for(secret: bytes, challenge: str) -> str:
    return hmac.new(secret, challenge.strip().encode(), hashlib.sha256).hexdigest()


class Console:
    def __init__(self, transport, engine, secret: bytes, bridge=None, clock=time.monotonic):
        self.transport = transport
        self.engine = engine
        self.secret = secret
        self.bridge = bridge
        self.clock = clock
        self.logged_in = False
        self.failures = 0
        self.locked_until = 0.0
        self.challenge = ""
        self.last_input = clock()
        self.line = bytearray()
        self.last_was_cr = False  # CR LF from a terminal is one line end, not two

    def write(self, text: str) -> None:
        self.transport.write(text.replace("\n", "\r\n").encode())

    def audit(self, event: str, **fields) -> None:
        self.engine.audit.record(event, console=self.transport.name, **fields)

    def prompt(self) -> None:
        if self.logged_in:
            self.write("jee1> ")
        else:
            self.challenge = secrets.token_hex(16)
            self.write(f"JEE1 service console {__version__}\nchallenge: {self.challenge}\nresponse: ")

    # -- input --------------------------------------------------------------------------------

    def feed(self, data: bytes) -> None:
        for byte in data:
            if byte in (0x0D, 0x0A):
                if byte == 0x0A and not self.line and self.last_was_cr:
                    self.last_was_cr = False
                    continue
                self.last_was_cr = byte == 0x0D
                line = self.line.decode("utf-8", errors="replace").strip()
                self.line.clear()
                self.write("\n")
                self.last_input = self.clock()
                self.handle_line(line)
            elif byte in (0x08, 0x7F):
                if self.line:
                    self.line.pop()
                    self.write("\b \b")
            elif byte >= 0x20 and len(self.line) < 4096:
                self.line.append(byte)
                self.transport.write(bytes([byte]))  # echo, as terminal programs expect

    def handle_line(self, line: str) -> None:
        if not self.logged_in:
            return self._login(line)
        if not line:
            return self.prompt()
        self.audit("console_command", command=line.split()[0], args=len(line.split()) - 1)
        command, _, rest = line.partition(" ")
        handler = {"help": lambda _: self.write(HELP + "\n"), "status": self._status, "version": self._version,
                   "ask": self._ask, "selftest": self._selftest, "log": self._log, "verify-model": self._verify,
                   "cache": self._cache, "logout": self._logout}.get(command)
        if handler is None:
            self.write(f"unknown command {command!r}; type help\n")
        else:
            handler(rest.strip())
        if self.logged_in:
            self.prompt()

    def _login(self, line: str) -> None:
        now = self.clock()
        if now < self.locked_until:
            self.write(f"locked: try again in {self.locked_until - now:.0f} s\n")
            return self.prompt()
        if self.challenge and line and hmac.compare_digest(line.lower(), response_for(self.secret, self.challenge)):
            self.logged_in = True
            self.failures = 0
            self.audit("console_login")
            self.write("logged in; type help\n")
            return self.prompt()
        self.failures += 1
        delay = min(LOCKOUT_BASE_S * 2 ** (self.failures - 1), LOCKOUT_MAX_S)
        self.locked_until = now + delay
        self.audit("console_login_failed", failures=self.failures, locked_s=delay)
        self.write(f"login failed; locked for {delay:.0f} s\n")
        self.prompt()

    def check_idle(self) -> None:
        if self.logged_in and self.clock() - self.last_input > IDLE_TIMEOUT_S:
            self.audit("console_idle_logout")
            self.write("\nidle timeout: logged out\n")
            self.logged_in = False
            self.prompt()

    # -- commands -----------------------------------------------------------------------------

    def _status(self, _):
        for key, value in self.engine.status().items():
            self.write(f"{key:<24} {value}\n")

    def _version(self, _):
        st = self.engine.status()
        self.write(f"jee1 {__version__}; model {st['model']} {st['quant']} sha256 {st['sha256'][:16]}...; "
                   f"safety rules {st['safety_rules']}\n")

    def _ask(self, question):
        if not question:
            return self.write("usage: ask <question>\n")
        request = self.engine.submit(question)
        for text in request:
            self.write(text)
        self.write(f"\n[{request.answer.finish_reason}]\n")

    def _selftest(self, _):
        answer = self.engine.ask(SELFTEST_QUESTION, max_tokens=8)
        model_ok = answer.finish_reason in ("complete", "truncated") and answer.completion_tokens > 0
        self.write(f"model:  {'PASS' if model_ok else 'FAIL'} ({answer.completion_tokens} tokens, "
                   f"{answer.finish_reason})\n")
        sessions = self.bridge.sessions if self.bridge else []
        live = [s for s in sessions if not s.closed.is_set()]
        self.write(f"UI link: {'PASS' if live else 'FAIL'} ({len(live)} open, "
                   f"{sum(s.stats['bad_frames'] for s in sessions)} bad frames)\n")
        self.audit("console_selftest", model_ok=model_ok, links=len(live))

    def _log(self, arg):
        n = int(arg) if arg.isdigit() else 20
        path = self.engine.audit.path
        lines = deque(path.read_text(encoding="utf-8").splitlines(), maxlen=n) if path.is_file() else []
        for line in lines:
            self.write(line + "\n")

    def _verify(self, _):
        from jee1.edge.model_check import ModelRejected, check_model

        s = self.engine.settings["model"]
        try:
            result = check_model(self.engine.model_path, [Path(k) for k in s["trusted_keys"]], None)
            self.write(f"model OK: sha256 {result.sha256[:16]}... matches its manifest\n")
        except (ModelRejected, InputError) as e:
            self.write(f"model FAILED verification: {e}\n")

    def _cache(self, arg):
        if arg != "rebuild":
            return self.write("usage: cache rebuild\n")
        self.engine.rebuild_cache()
        self.write("warm prefix rebuilt\n")

    def _logout(self, _):
        self.logged_in = False
        self.audit("console_logout")
        self.write("logged out\n")
        self.prompt()

    def run(self, stop: threading.Event) -> None:
        self.prompt()
        while not stop.is_set():
            data = self.transport.read()
            if data:
                self.feed(data)
            self.check_idle()


def start_console(bridge, url: str, baudrate: int, secret_path: str | None, settings) -> threading.Thread:
    secret = load_secret(secret_path or "/etc/jee1/service.key")

    def loop():
        delay = 0.1
        while not bridge.stop.is_set():
            try:
                transport = SerialTransport(url, baudrate)
            except TransportClosed as e:
                log.warning("console port unavailable (%s); retrying in %.1f s", e, delay)
                bridge.stop.wait(delay)
                delay = min(delay * 2, 5.0)
                continue
            delay = 0.1
            try:
                Console(transport, bridge.engine, secret, bridge).run(bridge.stop)
            except TransportClosed:
                log.warning("console port %s lost", url)
            finally:
                transport.close()

    thread = threading.Thread(target=loop, name="jee1-console", daemon=True)
    thread.start()
    bridge.threads.append(thread)
    return thread
