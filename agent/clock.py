"""Whether the OS says the wall clock is synchronised (NTP, PTP, an RTC the kernel trusts).

A board without a real-time clock boots at its last saved time until NTP answers, and some sites block NTP:
the agent says what it knows in its state and telemetry, and the controller files what it reports on its own
time line anyway. systemd-timesyncd's flag file says "synchronised" where timesyncd runs; else adjtimex(2) in
read-only mode (``TIME_ERROR``: not synchronised), but only outside a seccomp filter: the service's
``SystemCallFilter=@system-service`` leaves the @clock calls out (they would fail, or kill a stricter
filter); else unknown (None). The answer is kept for a minute.
"""

from __future__ import annotations

import ctypes
import time
from pathlib import Path

TIME_ERROR = 5  # adjtimex's answer while the kernel considers the clock unsynchronised
TIMESYNCD_FLAG = Path("/run/systemd/timesync/synchronized")  # made by systemd-timesyncd once it synced
CACHE_S = 60.0
_cache: tuple[float, bool | None] = (float("-inf"), None)


def _filtered() -> bool:
    """Whether a seccomp filter is on this process (mode 2 in /proc/self/status)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Seccomp:"):
                return line.split()[1] != "0"
    except (OSError, IndexError):
        pass
    return True  # cannot tell: do not make a call that may be forbidden


def _ask() -> bool | None:
    if TIMESYNCD_FLAG.exists():
        return True
    if _filtered():
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        timex = ctypes.create_string_buffer(512)  # struct timex; modes = 0 (its first field): only read
        state = libc.adjtimex(timex)
    except (OSError, AttributeError):
        return None
    return None if state < 0 else state != TIME_ERROR


def synced() -> bool | None:
    global _cache
    at, value = _cache
    if time.monotonic() - at > CACHE_S:
        value = _ask()
        _cache = (time.monotonic(), value)
    return value
