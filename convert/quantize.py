"""llama.cpp's own quantizer (``llama_model_quantize``) through llama-cpp-python.

The C call releases the GIL, so it runs in a worker thread while this thread reports the
output file's growth as the phase's progress.
"""

from __future__ import annotations

import ctypes
import shutil
import threading
from pathlib import Path

from jee1 import llama_backend  # noqa: F401  (routes llama.cpp's log into logging)
from jee1.errors import ResourceError

import llama_cpp

from .quant_types import QuantType

POLL_SECONDS = 0.2
FULL_BELOW = 16 * 1024 * 1024   # free bytes under which a failed write is put down to a full disk


def quantize(src: Path, dst: Path, quant: QuantType, threads: int, progress=None) -> None:
    params = llama_cpp.llama_model_quantize_default_params()
    params.nthread = threads
    params.ftype = int(quant.file_type)
    result: dict[str, int] = {}

    def run() -> None:
        result["rc"] = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))

    worker = threading.Thread(target=run, name="llama-quantize", daemon=True)
    worker.start()
    reported = 0
    while worker.is_alive():
        worker.join(POLL_SECONDS)
        if progress is not None and dst.exists():
            size = dst.stat().st_size
            progress.update(max(0, size - reported))
            reported = max(reported, size)
    if progress is not None:  # the estimate becomes the real size
        progress.total = reported
        progress.refresh()
    if result.get("rc", 1) != 0:
        if shutil.disk_usage(dst.parent).free < FULL_BELOW:   # its log only says "iostream error"
            raise ResourceError(f"{dst.parent}: no space left on the device while llama.cpp's quantizer wrote "
                                f"{quant.name}; nothing was kept")
        raise ResourceError(f"llama.cpp's quantizer failed on {src} -> {quant.name} "
                            f"(code {result.get('rc')}); its log says why")
