"""Talking to systemd without a dependency: sd_notify(3) is one datagram on the Unix socket $NOTIFY_SOCKET.

Every call is a no-op when the agent does not run under systemd (no NOTIFY_SOCKET), and a send that fails
is logged once, never raised: the agent keeps serving whatever its service manager does.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Mapping

log = logging.getLogger("edgefleet.agent.systemd")

_warned = False


def _address(environ: Mapping[str, str]) -> str | None:
    addr = environ.get("NOTIFY_SOCKET", "")
    if len(addr) < 2 or addr[0] not in "@/":
        return None
    return "\0" + addr[1:] if addr[0] == "@" else addr  # '@': the abstract namespace


def notify(*lines: str) -> bool:
    """Send ``KEY=VALUE`` lines as one message; True if systemd's socket took it."""
    global _warned
    addr = _address(os.environ)
    if addr is None:
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
            s.sendto("\n".join(lines).encode(), addr)
        return True
    except OSError as e:
        if not _warned:
            _warned = True
            log.warning("cannot notify systemd on %s: %s", os.environ.get("NOTIFY_SOCKET"), e)
        return False


def _one_line(text: str) -> str:
    return " ".join(text.split())


def ready(status: str | None = None) -> bool:
    """Startup (or a reload) is complete."""
    return notify("READY=1", *([f"STATUS={_one_line(status)}"] if status else []))


def reloading() -> bool:
    """A reload began; ``ready()`` ends it. MONOTONIC_USEC is what systemd >= 253 wants with
    Type=notify-reload; older ones ignore it."""
    return notify("RELOADING=1", f"MONOTONIC_USEC={time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000}")


def stopping(status: str | None = None) -> bool:
    return notify("STOPPING=1", *([f"STATUS={_one_line(status)}"] if status else []))


def status(text: str) -> bool:
    """A one-line status, shown by `systemctl status`."""
    return notify(f"STATUS={_one_line(text)}")


class Watchdog:
    """systemd's software watchdog (WatchdogSec=): WATCHDOG=1 at least every half of WATCHDOG_USEC.

    ``kick()`` sends at most once a period (half the timeout). The caller decides whether the process is
    healthy and calls ``kick()`` only then: a wedged process stops kicking and systemd kills and restarts it.
    Disabled (``enabled`` False, ``kick()`` a no-op) without NOTIFY_SOCKET or WATCHDOG_USEC, or when
    WATCHDOG_PID names another process (the variables were inherited, not meant for us).
    """

    def __init__(self, timeout_usec: int | None) -> None:
        self.timeout_s = timeout_usec / 1e6 if timeout_usec else None
        self.period_s = self.timeout_s / 2 if self.timeout_s else None
        self._last: float | None = None

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Watchdog:
        env = os.environ if environ is None else environ
        try:
            usec = int(env.get("WATCHDOG_USEC", "0"))
            pid = int(env.get("WATCHDOG_PID") or os.getpid())
        except ValueError:
            return cls(None)
        if usec <= 0 or pid != os.getpid() or _address(env) is None:
            return cls(None)
        return cls(usec)

    @property
    def enabled(self) -> bool:
        return self.period_s is not None

    def kick(self) -> bool:
        """Send WATCHDOG=1 if a period has passed since the last one; True if sent."""
        if self.period_s is None:
            return False
        now = time.monotonic()
        if self._last is not None and now - self._last < self.period_s:
            return False
        self._last = now
        return notify("WATCHDOG=1")


def on_signal(event):
    """A signal handler that sets ``event``, from another thread: a handler runs on the main thread between two
    bytecodes, possibly while that thread is inside ``event.wait()`` holding the event's lock, where setting it
    directly would deadlock (a stop signal then hangs the process)."""
    import threading

    return lambda *_: threading.Thread(target=event.set, name="signal", daemon=True).start()
