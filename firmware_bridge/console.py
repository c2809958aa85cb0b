"""The technician console: a line-oriented service shell on its own serial port (picocom, screen).

Login first, by challenge-response: the console shows a fresh random challenge; the technician's
laptop computes HMAC-SHA256(device service secret, challenge) with ``jee1 service-response`` and
types the hex result.  Failed attempts lock the console for a doubling delay that belongs to the
port, not to one open of it (kept in device state: unplugging the cable or restarting the service
does not reset it); an empty line only shows a new challenge; an idle session is logged out; every
command and every failed login goes to the audit log; the secret is never shown.  No input ends the
console: an error in a command is logged, audited and answered, and the console carries on.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import re
import secrets
import threading
import time
from collections import deque
from pathlib import Path

from jee1 import __version__
from jee1.errors import Busy
from jee1.errors import InputError
from jee1.manifest import create_file_atomic, write_json_atomic

from .transports import SerialTransport, TransportClosed

log = logging.getLogger(__name__)

IDLE_TIMEOUT_S = 300.0
LOCKOUT_BASE_S = 2.0
LOCKOUT_MAX_S = 300.0
SELFTEST_QUESTION = "What is the antidote for heparin?"
RESPONSE = re.compile(r"[0-9a-f]{64}")   # what a login response may be: HMAC-SHA256 as lower-case hex
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


# -- service secrets: one per device, derived from a fleet key that never leaves the workshop ------

_SERIAL = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_DERIVATION = b"jee1 device service secret v1\0"


def check_serial(serial: str) -> str:
    if not _SERIAL.fullmatch(serial or ""):
        raise InputError(f"serial {serial!r}: 1-64 letters, digits, '.', '_' or '-', starting with a letter or digit")
    return serial


def device_secret(fleet_key: bytes, serial: str) -> bytes:
    """The device's service secret: HMAC-SHA256(fleet key, label + serial), as 64 hex characters.
    A device holds only its own; whoever reads it off one device can open that device alone."""
    return hmac.new(fleet_key, _DERIVATION + check_serial(serial).encode(), hashlib.sha256).hexdigest().encode()


def write_secret(path: Path, secret: bytes) -> None:
    """Write a secret file mode 0600, atomically; refuse to overwrite one."""
    path = Path(path)
    if path.exists():
        raise InputError(f"{path}: exists; remove it first if it is really to be replaced")
    try:
        create_file_atomic(path, secret + b"\n", mode=0o600)   # never over a secret that appeared meanwhile
    except FileExistsError:
        raise InputError(f"{path}: exists; remove it first if it is really to be replaced") from None


class Lockout:
    """Failed logins and the time the port is locked until (wall clock), kept in a 0600 JSON file
    when a path is given, so the doubling delay survives a replugged cable and a restart."""

    def __init__(self, path: Path | None):
        self.path = path
        self.failures, self.locked_until = 0, 0.0
        if path is not None and path.is_file():
            try:
                data = json.loads(path.read_text(encoding="utf-8"))
                self.failures, self.locked_until = int(data["failures"]), float(data["locked_until"])
            except (OSError, ValueError, KeyError, TypeError) as e:
                log.warning("%s: unreadable console lockout state (%s); the port stays locked for the longest delay",
                            path, e)
                self.failures, self.locked_until = 99, time.time() + LOCKOUT_MAX_S

    def save(self) -> None:
        if self.path is None:
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            write_json_atomic(self.path, {"failures": self.failures, "locked_until": self.locked_until}, mode=0o600)
        except OSError as e:   # the lockout still holds in memory
            log.warning("%s: cannot keep the console lockout state (%s)", self.path, e.strerror)


class Console:
    def __init__(self, transport, engine, secret: bytes, bridge=None, clock=time.time, lockout: Lockout | None = None):
        self.transport = transport
        self.engine = engine
        self.secret = secret
        self.bridge = bridge
        self.clock = clock
        self.logged_in = False
        self.lockout = lockout or Lockout(None)
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
        """One line, whatever it holds: an exception in a command is logged, audited and answered."""
        try:
            self._handle_line(line)
        except Exception as e:   # the console must outlive any command
            log.exception("console command failed")
            self._safe_audit("console_error", error=type(e).__name__)
            self.write(f"error: {'engine busy, try again' if isinstance(e, Busy) else 'internal error (logged)'}\n")
            self.prompt()

    def _handle_line(self, line: str) -> None:
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

    def _safe_audit(self, event: str, **fields) -> None:
        try:
            self.audit(event, **fields)
        except Exception:
            log.exception("audit record %s lost", event)

    def _login(self, line: str) -> None:
        now = self.clock()
        if not line:                       # an empty Enter: a new challenge, not a failed attempt
            return self.prompt()
        if now < self.lockout.locked_until:
            self.write(f"locked: try again in {self.lockout.locked_until - now:.0f} s\n")
            return self.prompt()
        answer = line.lower()
        if self.challenge and RESPONSE.fullmatch(answer) and hmac.compare_digest(
                answer.encode("ascii"), response_for(self.secret, self.challenge).encode("ascii")):
            self.logged_in = True
            self.lockout.failures = 0
            self.lockout.save()
            self.audit("console_login")
            self.write("logged in; type help\n")
            return self.prompt()
        self.lockout.failures += 1
        delay = min(LOCKOUT_BASE_S * 2 ** min(self.lockout.failures - 1, 16), LOCKOUT_MAX_S)
        self.lockout.locked_until = now + delay
        self.lockout.save()
        self.audit("console_login_failed", failures=self.lockout.failures, locked_s=delay)
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
        digest = f"sha256 {st['sha256'][:16]}..." if st.get("sha256") else "unverified (no sha256)"
        self.write(f"jee1 {__version__}; model {st['model']} {st['quant']} {digest}; "
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
        n = int(arg) if arg.isascii() and arg.isdigit() else 20
        path = self.engine.audit.path
        lines = deque(path.read_text(encoding="utf-8").splitlines(), maxlen=n) if path.is_file() else []
        for line in lines:
            self.write(line + "\n")

    def _verify(self, _):
        from jee1.edge.model_check import ModelRejected, check_model

        s = self.engine.settings["model"]
        try:
            result = check_model(self.engine.model_path, [Path(k) for k in s["trusted_keys"]], None,
                                 require_protected=s["require_protected"])
            result.close()
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
            try:
                if data:
                    self.feed(data)
                self.check_idle()
            except TransportClosed:
                raise
            except Exception as e:   # a bug in line handling: reset the line, carry on
                log.exception("console input failed")
                self._safe_audit("console_error", error=type(e).__name__)
                self.line.clear()


def start_console(bridge, url: str, baudrate: int, secret_path: str | None, settings) -> threading.Thread:
    secret = load_secret(secret_path or "/etc/jee1/service.key")
    state_dir = settings["cache"]["dir"]
    lockout = Lockout(Path(state_dir) / "console_lockout.json" if state_dir else None)

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
                Console(transport, bridge.engine, secret, bridge, lockout=lockout).run(bridge.stop)
            except TransportClosed:
                log.warning("console port %s lost", url)
            except Exception:   # never let the port die with the service still running
                log.exception("console on %s failed; reopening", url)
                bridge.stop.wait(delay)
            finally:
                try:
                    transport.close()
                except Exception:
                    log.exception("closing console port %s", url)

    thread = threading.Thread(target=loop, name="jee1-console", daemon=True)
    thread.start()
    bridge.threads.append(thread)
    return thread
