"""``jee1 serve``: the engine as a long-lived process with a status file for ``jee1 status``."""

from __future__ import annotations

import json
import logging
import os
import signal
import threading
from pathlib import Path

from jee1.manifest import write_json_atomic

log = logging.getLogger(__name__)

STATUS_FILE = "status.json"
STATUS_EVERY_S = 5.0


def status_path(settings) -> Path:
    return Path(settings["cache"]["dir"]) / STATUS_FILE


def read_status(settings) -> dict | None:
    """The running service's last status, or None when no live service wrote one."""
    path = status_path(settings)
    try:
        data = json.loads(path.read_text())
        os.kill(int(data["pid"]), 0)
    except (OSError, ValueError, KeyError):
        return None
    return data


def open_engine(settings, quiet: bool):
    """The engine, with a progress bar while the model is checked against its manifest."""
    from jee1.convert.progress import phase_bar

    from .engine import Engine

    model = Path(settings["model"]["path"])
    size = model.stat().st_size if model.is_file() else None
    with phase_bar("verify model", size, quiet) as bar:
        return Engine(settings, progress=bar)


def run_service(settings, quiet: bool = False, ready: threading.Event | None = None,
                stop: threading.Event | None = None, ui_ports: tuple[str, ...] = (), baudrate: int = 115200,
                ipc: str | None = None, console_port: str | None = None, console_secret: str | None = None) -> None:
    stop = stop or threading.Event()
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: stop.set())
    path = status_path(settings)
    with open_engine(settings, quiet) as engine:
        from jee1.firmware_bridge.bridge import BridgeService

        bridge = BridgeService(engine, stop)
        for port in ui_ports:
            bridge.start_serial(port, baudrate)
        if ipc:
            bridge.start_unix(ipc)
        if console_port:
            from jee1.firmware_bridge.console import start_console

            start_console(bridge, console_port, baudrate, console_secret, settings)
        links = [*(f"unix://{ipc}" for _ in [ipc] if ipc), *ui_ports]
        log.info("jee1 serve: ready (pid %d); UI link on %s%s", os.getpid(), ", ".join(links) or "nothing",
                 f"; console on {console_port}" if console_port else "")
        if ready:
            ready.set()
        try:
            failing = False
            while True:
                try:
                    write_json_atomic(path, engine.status() | {"pid": os.getpid(), "service": "running"})
                    failing = False
                except OSError as e:     # a full or read-only cache folder must not end the service
                    if not failing:
                        log.error("%s: cannot write the status file (%s); still serving", path, e.strerror)
                    failing = True
                if stop.wait(STATUS_EVERY_S):
                    break
        finally:
            stop.set()
            bridge.join()
            try:
                path.unlink(missing_ok=True)
            except OSError as e:
                log.warning("%s: cannot remove the status file (%s)", path, e.strerror)
    log.info("jee1 serve: stopped")
