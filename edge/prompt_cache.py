"""The warm prefix: the fixed part of every prompt evaluated once, its KV state kept in memory and
on disk (keyed by model hash + prefix hash + cache settings), and restored into the context so
that a request only evaluates the question."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from pathlib import Path

import llama_cpp

from jee1.llama_backend import (capture_sequence_state, clear_context, context_tokens, evaluate,
                                install_sequence_state)

log = logging.getLogger(__name__)

FORMAT = "jee1-prefix-state/1"
SEQ = 0


def cache_key(model_identity: str, prefix_tokens: list[int], n_ctx: int, kv_type: str) -> str:
    digest = hashlib.sha256(json.dumps([prefix_tokens, n_ctx, kv_type, llama_cpp.__version__]).encode())
    return f"{model_identity[:16]}-{digest.hexdigest()[:16]}"


class WarmPrefix:
    def __init__(self, llama: "llama_cpp.Llama", tokens: list[int], key: str, cache_dir: Path | None):
        self.llama = llama
        self.tokens = list(tokens)
        self.path = Path(cache_dir) / f"prefix-{key}.state" if cache_dir else None
        self.state: bytes | None = None
        self.source = "none"

    # -- llama.cpp sequence state ---------------------------------------------------------

    def _capture(self) -> bytes:
        return capture_sequence_state(self.llama, SEQ)

    def _install(self, state: bytes) -> bool:
        return install_sequence_state(self.llama, state, self.tokens, SEQ)

    # -- lifecycle --------------------------------------------------------------------------

    def prepare(self) -> None:
        """Load the state from disk, or evaluate the prefix once and save it."""
        if self.path and self.path.is_file() and self._load_file():
            self.source = "disk"
            return
        clear_context(self.llama)
        evaluate(self.llama, self.tokens)
        self.state = self._capture()
        self.source = "evaluated"
        if self.path:
            self._save_file()

    def _load_file(self) -> bool:
        try:
            with open(self.path, "rb") as f:
                header = json.loads(f.readline())
                state = f.read()
            if header.get("format") != FORMAT or header.get("tokens") != self.tokens or len(state) != header["bytes"]:
                log.warning("%s: stale or foreign prefix state, re-evaluating", self.path)
                return False
        except (OSError, ValueError, KeyError) as e:
            log.warning("%s: unreadable prefix state (%s), re-evaluating", self.path, e)
            return False
        if not self._install(state):
            log.warning("%s: llama.cpp refused the prefix state, re-evaluating", self.path)
            return False
        self.state = state
        return True

    def _save_file(self) -> None:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=".prefix-", dir=self.path.parent)
            with os.fdopen(fd, "wb") as f:
                f.write(json.dumps({"format": FORMAT, "tokens": self.tokens, "bytes": len(self.state)}).encode() + b"\n")
                f.write(self.state)
            os.replace(tmp, self.path)
        except OSError as e:
            log.warning("%s: cannot save the prefix state (%s); it stays in memory", self.path, e)

    def ensure(self) -> bool:
        """Make sure the context starts with the prefix; True when it does (restored or still there)."""
        if self.state is None:
            return False
        n = len(self.tokens)
        have = context_tokens(self.llama)
        if len(have) >= n and list(have[:n]) == self.tokens:
            return True  # generate()'s prefix match trims the rest
        return self.restore()

    def restore(self) -> bool:
        """Put the saved prefix state into the context, whatever it holds now."""
        return self.state is not None and self._install(self.state)

    def rebuild(self) -> None:
        if self.path:
            self.path.unlink(missing_ok=True)
        self.state = None
        self.prepare()
