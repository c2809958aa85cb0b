"""One small class per transport behind one interface, selected by URL (as pyserial does):

* ``unix:///run/jee1/ui.sock`` — a Unix domain socket the bridge listens on (mode 0660, a stale
  socket file from a crashed run is replaced, a live one is refused);
* anything else is a pyserial URL: ``/dev/ttyS1``, ``loop://``, ``socket://host:port``, opened
  with the baud rate and, for device files, exclusively.

``read`` returns whatever bytes arrived within a short timeout (b"" if none) and raises
``TransportClosed`` when the other end is gone (USB unplugged, socket closed).
"""

from __future__ import annotations

import errno
import os
import select
import socket
from pathlib import Path

import serial

from jee1.errors import InputError

READ_TIMEOUT_S = 0.05
WRITE_TIMEOUT_S = 5.0     # a peer that takes no bytes for this long is gone


class TransportClosed(ConnectionError):
    pass


class SerialTransport:
    def __init__(self, url: str, baudrate: int = 115200):
        self.name = url
        kwargs = {"baudrate": baudrate, "timeout": READ_TIMEOUT_S, "write_timeout": WRITE_TIMEOUT_S}
        if "://" not in url:
            kwargs["exclusive"] = True
        try:
            self.port = serial.serial_for_url(url, **kwargs)
        except (serial.SerialException, OSError, ValueError) as e:
            raise TransportClosed(f"{url}: cannot open ({e})") from None

    def read(self) -> bytes:
        try:
            return self.port.read(max(1, self.port.in_waiting))
        except (serial.SerialException, OSError, TypeError) as e:
            raise TransportClosed(f"{self.name}: {e}") from None

    def write(self, data: bytes) -> None:
        try:
            self.port.write(data)
        except (serial.SerialException, OSError) as e:
            raise TransportClosed(f"{self.name}: {e}") from None

    def close(self) -> None:
        try:
            self.port.close()
        except (serial.SerialException, OSError):
            pass


class SocketTransport:
    def __init__(self, sock: socket.socket, name: str):
        self.sock = sock
        self.name = name
        sock.settimeout(WRITE_TIMEOUT_S)   # a UI busy for a moment is waited for, as on the serial line

    def read(self) -> bytes:
        try:
            ready, _, _ = select.select([self.sock], [], [], READ_TIMEOUT_S)
            if not ready:
                return b""
            data = self.sock.recv(4096)
        except (OSError, ValueError) as e:
            raise TransportClosed(f"{self.name}: {e}") from None
        if not data:
            raise TransportClosed(f"{self.name}: closed by the peer")
        return data

    def write(self, data: bytes) -> None:
        try:
            self.sock.sendall(data)
        except OSError as e:
            raise TransportClosed(f"{self.name}: {e}") from None

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass


class UnixListener:
    def __init__(self, path: str | Path, mode: int = 0o660):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.exists() or self.path.is_symlink():
            self._remove_stale()
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(str(self.path))
        os.chmod(self.path, mode)
        self.sock.listen(8)
        self.sock.settimeout(0.2)

    def _remove_stale(self) -> None:
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(str(self.path))
        except OSError as e:
            if e.errno in (errno.ECONNREFUSED, errno.ENOTSOCK, errno.ENOENT):
                self.path.unlink(missing_ok=True)  # nobody listens: a leftover from a crash
                return
            raise
        finally:
            probe.close()
        raise InputError(f"{self.path}: another process is already listening there")

    def accept(self) -> SocketTransport | None:
        try:
            conn, _ = self.sock.accept()
        except TimeoutError:
            return None
        return SocketTransport(conn, f"unix:{self.path}")

    def close(self) -> None:
        self.sock.close()
        self.path.unlink(missing_ok=True)


def unix_path(url: str) -> str | None:
    return url[len("unix://"):] if url.startswith("unix://") else None


def ipc_path(value: str) -> str:
    """``--ipc``: unix:///run/jee1/ui.sock or the bare path; any other scheme is refused."""
    path = unix_path(value)
    if path is None and "://" in value:
        raise InputError(f"--ipc {value}: only a Unix socket is served here (unix:///path/ui.sock or /path/ui.sock)")
    path = path if path is not None else value
    if not path:
        raise InputError("--ipc: the socket path is empty")
    return path
