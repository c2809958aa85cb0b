"""Audit log: one JSON object per line, rotated by size.  Question and answer text only when
configured; otherwise their sha256, so a record can be matched to a complaint without storing it."""

from __future__ import annotations

import hashlib
import json
import logging
import logging.handlers
import threading
from datetime import datetime, timezone
from pathlib import Path

from jee1.errors import ResourceError


def text_digest(text: str) -> str:
    return "sha256:" + hashlib.sha256(text.encode("utf-8")).hexdigest()


class AuditLog:
    def __init__(self, path: str | Path, max_bytes: int, backups: int, log_text: bool):
        self.path = Path(path)
        self.log_text = log_text
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._handler = logging.handlers.RotatingFileHandler(self.path, maxBytes=max_bytes,
                                                                 backupCount=backups, encoding="utf-8")
        except OSError as e:
            raise ResourceError(f"{self.path}: cannot open the audit log ({e.strerror})") from None
        self._handler.setFormatter(logging.Formatter("%(message)s"))
        self._lock = threading.Lock()

    def text(self, value: str | None):
        if value is None:
            return None
        return value if self.log_text else text_digest(value)

    def record(self, event: str, **fields) -> None:
        entry = {"ts": datetime.now(timezone.utc).isoformat(timespec="milliseconds"), "event": event, **fields}
        record = logging.makeLogRecord({"msg": json.dumps(entry, ensure_ascii=False, default=str),
                                        "levelno": logging.INFO, "levelname": "INFO"})
        with self._lock:
            self._handler.handle(record)

    def close(self) -> None:
        self._handler.close()
