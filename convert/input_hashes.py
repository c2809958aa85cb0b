"""The inputs' sha256 for the manifest, computed in a thread while the merge reads the same files.

The merge reads tensors in plan order through memory maps; this reads each input file front to
back with plain reads.  Both go through the page cache, so on a machine that can cache what the
merge just read the files come off the disk about once instead of twice (for the 70B: 130 GB read
once less).  The digests are the ordinary per-file sha256 (docs/manifest.md).
"""

from __future__ import annotations

import threading
from pathlib import Path

from jee1.manifest import file_record


class _Stopped(Exception):
    pass


class InputHashes:
    def __init__(self, files: list[tuple[Path, str]]):
        """``files``: (path, role) pairs, hashed in that order."""
        self.files = files
        self.total = sum(path.stat().st_size for path, _ in files)
        self.done = 0
        self._stop = threading.Event()
        self._records: list[dict] = []
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="hash-inputs", daemon=True)
        self._thread.start()

    def update(self, n: int) -> None:          # file_record's progress callback, per 8 MiB read
        if self._stop.is_set():
            raise _Stopped
        self.done += n

    def _run(self) -> None:
        try:
            self._records = [dict(file_record(path, progress=self), role=role) for path, role in self.files]
        except _Stopped:
            pass
        except BaseException as e:  # noqa: BLE001 - handed to the caller of result()
            self._error = e

    def result(self, progress=None) -> list[dict]:
        """The records, once the thread is done (``progress`` gets the bytes still being read)."""
        reported = self.done
        if progress is not None:
            progress.update(reported)
        while self._thread.is_alive():
            self._thread.join(0.2)
            if progress is not None:
                progress.update(self.done - reported)
                reported = self.done
        if self._error is not None:
            raise self._error
        return self._records

    def stop(self) -> None:
        """Stop early (the conversion failed); never raises."""
        self._stop.set()
        self._thread.join()
