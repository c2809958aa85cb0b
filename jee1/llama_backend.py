"""The one place that imports llama-cpp-python: routes llama.cpp's log into ``logging``.

llama.cpp logs through a C callback in fragments (a line may arrive in several calls, the
``CONT`` level continues the previous one); the bridge joins them into whole lines and logs
each under the ``jee1.llama_cpp`` logger.  llama-cpp-python's own ``print(..., file=sys.stderr)``
calls during model construction are captured the same way by ``load_llama``.
"""

from __future__ import annotations

import contextlib
import ctypes
import io
import logging
import signal
import sys
import threading
from pathlib import Path

import llama_cpp
import numpy as np

log = logging.getLogger("jee1.llama_cpp")

# enum ggml_log_level in ggml.h (llama-cpp-python's own table predates the current order)
GGML_LOG_LEVELS = {0: logging.INFO, 1: logging.DEBUG, 2: logging.INFO, 3: logging.WARNING, 4: logging.ERROR}
GGML_LOG_LEVEL_CONT = 5
# llama.cpp's INFO is chatty (every tensor and KV on load): keep it at DEBUG for us.
_OUR_LEVEL = {logging.INFO: logging.DEBUG}

_lock = threading.Lock()
_pending = {"level": logging.DEBUG, "text": ""}
_emitting = threading.local()


def _emit(level: int, text: str) -> None:
    if getattr(_emitting, "active", False):
        # a log handler wrote to the captured stderr while we were logging (e.g. logging's
        # last-resort handler during load_llama): pass it through instead of re-entering
        sys.__stderr__.write(text)
        return
    _emitting.active = True
    try:
        _emit_locked(level, text)
    finally:
        _emitting.active = False


def _emit_locked(level: int, text: str) -> None:
    with _lock:
        if level != GGML_LOG_LEVEL_CONT and _pending["text"]:
            _flush_locked()
        if level != GGML_LOG_LEVEL_CONT:
            _pending["level"] = _OUR_LEVEL.get(GGML_LOG_LEVELS.get(level, logging.INFO),
                                               GGML_LOG_LEVELS.get(level, logging.INFO))
        _pending["text"] += text
        while "\n" in _pending["text"]:
            line, _pending["text"] = _pending["text"].split("\n", 1)
            if line.strip():
                log.log(_pending["level"], "%s", line)


def _flush_locked() -> None:
    if _pending["text"].strip():
        log.log(_pending["level"], "%s", _pending["text"])
    _pending["text"] = ""


@llama_cpp.llama_log_callback
def _callback(level: int, text: bytes, _user_data) -> None:
    _emit(level, text.decode("utf-8", errors="replace"))


# An exception raised inside a ctypes callback is printed and dropped by ctypes.  Python runs a
# signal handler wherever the main thread happens to be, and during a model load that is often
# the log callback above: a Ctrl-C (KeyboardInterrupt) or SIGTERM (SystemExit) raised there would
# be lost and the run would go on (seen: 27 of 40).  So the handlers of SIGINT and SIGTERM are
# wrapped: inside the callback they only note the signal, and ``raise_deferred``, called when
# llama.cpp returns, runs the handler.
_deferred: list[tuple[object, int]] = []


def _in_log_callback(frame) -> bool:
    while frame is not None:
        if frame.f_code.co_name == "_callback" and frame.f_globals.get("__name__") == __name__:
            return True
        frame = frame.f_back
    return False


def deferring(handler):
    """``handler`` for ``signal.signal``, held back while llama.cpp is calling into Python."""
    if getattr(handler, "jee1_deferring", False) or not callable(handler):
        return handler

    def wrapped(signum, frame):
        if _in_log_callback(frame):
            _deferred.append((handler, signum))
            return
        handler(signum, frame)

    wrapped.jee1_deferring = True
    return wrapped


def defer_signals(*signums: int) -> None:
    """Wrap the current handlers of ``signums`` (main thread only; CLIs call it after installing theirs)."""
    if threading.current_thread() is not threading.main_thread():
        return
    for signum in signums:
        signal.signal(signum, deferring(signal.getsignal(signum)))


def raise_deferred() -> None:
    """Run the handler of a signal that arrived while llama.cpp was calling back into Python."""
    if _deferred:
        handler, signum = _deferred[0]
        _deferred.clear()
        handler(signum, None)


defer_signals(signal.SIGINT, signal.SIGTERM)


def route_llama_log() -> None:
    """Send llama.cpp's log (and ggml's) to ``logging``; idempotent, called on import."""
    llama_cpp.llama_log_set(_callback, ctypes.c_void_p(0))


route_llama_log()


class _LogStream(io.TextIOBase):
    """A file-like object that turns llama-cpp-python's stderr prints into log lines."""

    def write(self, text: str) -> int:
        _emit(GGML_LOG_LEVEL_CONT if _pending["text"] else 2, text)
        return len(text)


@contextlib.contextmanager
def captured_stderr_prints():
    with contextlib.redirect_stderr(_LogStream()):
        yield


def load_llama(path, **kwargs) -> "llama_cpp.Llama":
    """``llama_cpp.Llama`` with everything it says going to ``logging``.

    ``verbose=True`` keeps llama-cpp-python from redirecting file descriptors to /dev/null
    around the load (which would also swallow our own log handlers' output).
    """
    with captured_stderr_prints():
        llama = llama_cpp.Llama(model_path=str(path), verbose=True, **kwargs)
    llama.verbose = False  # later Python-side prints (generate's cache notes) stay off
    try:
        raise_deferred()
    except BaseException:
        llama.close()
        raise
    return llama


class TokenPieces:
    """Token id -> its bytes, exactly (llama-cpp-python's helper returns a zero-padded buffer)."""

    def __init__(self, llama: "llama_cpp.Llama"):
        self._vocab = llama._model.vocab
        self._buf = ctypes.create_string_buffer(256)

    def __call__(self, token: int) -> bytes:
        n = llama_cpp.llama_token_to_piece(self._vocab, token, self._buf, len(self._buf), 0, False)
        if n < 0:  # a longer piece than the buffer: grow once and retry
            self._buf = ctypes.create_string_buffer(-n)
            n = llama_cpp.llama_token_to_piece(self._vocab, token, self._buf, len(self._buf), 0, False)
        return self._buf.raw[:n]


def vocab_token_count(path) -> int | None:
    """Load only the vocabulary of a GGUF with llama.cpp; its token count, or None if it refuses."""
    params = llama_cpp.llama_model_default_params()
    params.vocab_only = True
    model = llama_cpp.llama_model_load_from_file(str(path).encode(), params)
    try:
        if not model:
            return None
        return int(llama_cpp.llama_vocab_n_tokens(llama_cpp.llama_model_get_vocab(model)))
    finally:
        if model:
            llama_cpp.llama_model_free(model)
        raise_deferred()


# llama.cpp's own SIMD row converters (ggml-cpu.h), the same rounding llama.cpp applies, and
# about 10x faster than numpy's float16 casts; the converter's merge loop is bound by them.
_ggml_cpu = ctypes.CDLL(str(Path(llama_cpp.__file__).parent / "lib" / "libggml-cpu.so"))
_ggml_cpu.ggml_cpu_init.argtypes, _ggml_cpu.ggml_cpu_init.restype = [], None
_ggml_cpu.ggml_cpu_init()
_ROW_CONVERTERS = {}
for _name, _src, _dst, _bf16 in (("ggml_cpu_fp32_to_fp16", np.float32, np.float16, False),
                                 ("ggml_cpu_fp16_to_fp32", np.float16, np.float32, False),
                                 ("ggml_cpu_fp32_to_bf16", np.float32, np.uint16, True),
                                 ("ggml_cpu_bf16_to_fp32", np.uint16, np.float32, True)):
    _fn = getattr(_ggml_cpu, _name)
    _fn.argtypes, _fn.restype = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64], None
    _ROW_CONVERTERS[(np.dtype(_src), np.dtype(_dst), _bf16)] = _fn


def convert_rows(src: np.ndarray, dst: np.ndarray, bf16: bool = False) -> None:
    """Convert ``src`` into ``dst`` (same shape, C-contiguous) between float32 and float16/bfloat16.

    bfloat16 travels as uint16 bit patterns; pass ``bf16=True`` for it.
    """
    fn = _ROW_CONVERTERS.get((src.dtype, dst.dtype, bf16))
    if fn is None or src.shape != dst.shape or not (src.flags.c_contiguous and dst.flags.c_contiguous):
        raise ValueError(f"cannot convert {src.dtype}{src.shape} -> {dst.dtype}{dst.shape} (bf16={bf16})")
    fn(src.ctypes.data, dst.ctypes.data, src.size)


def versions() -> dict[str, str]:
    from importlib.metadata import version

    return {
        "llama_cpp_python": llama_cpp.__version__,
        "gguf": version("gguf"),
        "llama_cpp_system_info": llama_cpp.llama_print_system_info().decode("utf-8", "replace").strip(),
    }


def supports_gpu_offload() -> bool:
    return bool(llama_cpp.llama_supports_gpu_offload())


# -- a context's tokens, for drafts that keep their own context in step with the target's ----------

def context_tokens(llama: "llama_cpp.Llama") -> np.ndarray:
    """The tokens in ``llama``'s KV cache, in order."""
    return llama.input_ids[: llama.n_tokens]


def clear_context(llama: "llama_cpp.Llama") -> None:
    """Empty the context: no tokens, no KV cache."""
    llama.reset()
    llama._ctx.kv_cache_seq_rm(-1, 0, -1)


def capture_sequence_state(llama: "llama_cpp.Llama", seq: int = 0) -> bytes:
    """llama.cpp's state of sequence ``seq`` (its KV cache), as bytes."""
    ctx = llama._ctx.ctx
    size = llama_cpp.llama_state_seq_get_size(ctx, seq)
    buf = (ctypes.c_uint8 * size)()
    written = llama_cpp.llama_state_seq_get_data(ctx, buf, size, seq)
    return bytes(buf[:written])


def install_sequence_state(llama: "llama_cpp.Llama", state: bytes, tokens: list[int], seq: int = 0) -> bool:
    """Replace the context by a captured state holding ``tokens``; False if llama.cpp refuses it.
    The logits are not restored: the next evaluation refreshes them."""
    llama._ctx.kv_cache_seq_rm(-1, 0, -1)
    buf = (ctypes.c_uint8 * len(state)).from_buffer_copy(state)
    if llama_cpp.llama_state_seq_set_data(llama._ctx.ctx, buf, len(state), seq) != len(state):
        return False
    llama.input_ids[:len(tokens)] = tokens
    llama.n_tokens = len(tokens)
    llama._requires_eval = True
    return True


def rewind(llama: "llama_cpp.Llama", n: int) -> None:
    """Keep only the first ``n`` tokens of the context (KV cache included)."""
    if n < llama.n_tokens:
        llama._ctx.kv_cache_seq_rm(-1, n, -1)
        llama.n_tokens = n


def evaluate(llama: "llama_cpp.Llama", tokens: list[int]) -> None:
    """Append ``tokens`` to the context; afterwards ``last_logits`` holds the next-token logits."""
    if tokens:
        llama.eval(tokens)
        raise_deferred()


def last_logits(llama: "llama_cpp.Llama") -> np.ndarray:
    """Logits after the last evaluated token (a view into llama.cpp's buffer, valid until the next eval)."""
    ptr = llama_cpp.llama_get_logits_ith(llama._ctx.ctx, -1)
    return np.ctypeslib.as_array(ptr, shape=(llama.n_vocab(),))
