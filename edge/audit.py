"""Audit log: one JSON object per line, rotated by size.

Question and answer text are stored only when ``audit.log_text`` is on.  Otherwise each is stored
as HMAC-SHA256 under a per-device key (``audit.key`` in the device state folder, created on first
start, mode 0600): equal texts still correlate on one device, so a record can be matched to a
complaint, but a guessable short message ("I want to kill myself") cannot be looked up by hashing
it, and nothing correlates across devices.  Whoever holds the device key (root on the device) can
still test guesses; the log protects against a copied log, not against the device's owner.

A full or failing disk never stops the device answering: a record that cannot be written is
counted as lost, the log reports itself degraded (``jee1 status``, the console's ``status``), and
it recovers by itself once a record can be written again.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import logging.handlers
import secrets
import threading
from datetime import datetime, timezone
from pathlib import Path

from jee1.errors import ResourceError
from jee1.manifest import create_file_atomic

log = logging.getLogger(__name__)
KEY_FILE = "audit.key"


def text_digest(text: str) -> str:
    """Plain SHA-256 of a text, for identities that are not secret (a file's place and age)."""
    return "sha256:" + hashlib.sha256(text.encode("utf-8")).hexdigest()


def load_or_create_key(path: Path) -> bytes:
    """The device's audit key: 32 random bytes, created once with mode 0600."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        key = secrets.token_bytes(32)
        try:
            create_file_atomic(path, key, mode=0o600)   # a full disk leaves no short key behind
            return key
        except FileExistsError:
            key = path.read_bytes()
            if len(key) < 32:
                raise ResourceError(f"{path}: the audit key is shorter than 32 bytes; remove it to make a new one")
            return key
    except OSError as e:
        raise ResourceError(f"{path}: cannot read or create the audit key ({e.strerror})") from None


class _Handler(logging.handlers.RotatingFileHandler):
    def handleError(self, record):   # called inside emit's except: let AuditLog count the loss
        raise


class AuditLog:
    def __init__(self, path: str | Path, max_bytes: int, backups: int, log_text: bool, key_dir: str | Path | None = None):
        self.path = Path(path)
        self.log_text = log_text
        self._key = load_or_create_key(Path(key_dir or self.path.parent) / KEY_FILE)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._handler = _Handler(self.path, maxBytes=max_bytes, backupCount=backups, encoding="utf-8")
        except OSError as e:
            raise ResourceError(f"{self.path}: cannot open the audit log ({e.strerror})") from None
        self._handler.setFormatter(logging.Formatter("%(message)s"))
        self._lock = threading.Lock()
        self.lost = 0              # records that could not be written
        self.degraded = False

    def text(self, value: str | None):
        if value is None:
            return None
        if self.log_text:
            return value
        return "hmac-sha256:" + hmac.new(self._key, value.encode("utf-8"), hashlib.sha256).hexdigest()

    def record(self, event: str, **fields) -> None:
        entry = {"ts": datetime.now(timezone.utc).isoformat(timespec="milliseconds"), "event": event, **fields}
        record = logging.makeLogRecord({"msg": json.dumps(entry, ensure_ascii=False, default=str),
                                        "levelno": logging.INFO, "levelname": "INFO"})
        with self._lock:
            try:
                self._handler.handle(record)
            except (OSError, ValueError) as e:
                self.lost += 1
                self._reopen()
                if not self.degraded:
                    self.degraded = True
                    log.error("%s: audit log degraded, records are being lost (%s)", self.path,
                              getattr(e, "strerror", None) or e)
                return
            if self.degraded:
                self.degraded = False
                log.warning("%s: audit log recovered; %d records were lost", self.path, self.lost)

    def _reopen(self) -> None:
        """Drop the stream (and whatever it still buffers) so the next record opens the file afresh."""
        stream, self._handler.stream = self._handler.stream, None
        if stream is not None:
            try:
                stream.close()
            except OSError:
                pass

    def status(self) -> dict:
        return {"path": str(self.path), "degraded": self.degraded, "lost_records": self.lost}

    def close(self) -> None:
        with self._lock:
            try:
                self._handler.close()
            except (OSError, ValueError):
                self.lost += 1   # the last buffered record(s) could not be flushed
