"""Whether the OS says the wall clock is synchronised (NTP, PTP, an RTC the kernel trusts).

A board without a real-time clock boots at its last saved time until NTP answers, and some sites block NTP:
the agent says what it knows in its state and telemetry, and the controller files what it reports on its own
time line anyway (fleet.store). Read with adjtimex(2) in read-only mode (``TIME_ERROR``: not synchronised);
where the service's seccomp filter refuses that call, systemd-timesyncd's flag file; else unknown (None).
"""

from __future__ import annotations

import ctypes
from pathlib import Path

TIME_ERROR = 5  # adjtimex's answer while the kernel considers the clock unsynchronised
TIMESYNCD_FLAG = Path("/run/systemd/timesync/synchronized")  # made by systemd-timesyncd once it synced


def synced() -> bool | None:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        timex = ctypes.create_string_buffer(512)  # struct timex; modes = 0 (the first field): only read
        state = libc.adjtimex(timex)
        if state >= 0:
            return state != TIME_ERROR
    except (OSError, AttributeError):
        pass
    return True if TIMESYNCD_FLAG.exists() else None
