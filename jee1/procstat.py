"""This process's memory figures from /proc (Linux); None elsewhere."""

from __future__ import annotations


def status_bytes(field: str) -> int | None:
    """A kB field of /proc/self/status in bytes: "VmRSS" (resident now), "VmHWM" (peak)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def reset_peak_rss() -> None:
    """Restart VmHWM from the current RSS (Linux >= 4.0), so a phase can report its own peak."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass
