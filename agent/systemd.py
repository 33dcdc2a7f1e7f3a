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


# --- the unit's device access (agent install --accelerator) -----------------------------------------------------
# The unit has PrivateDevices=yes: a /dev with only the pseudo devices. A runtime that uses an accelerator needs its
# device nodes instead: the drop-in ``accelerators.conf`` turns that off and lets the agent open those nodes alone
# (DevicePolicy=closed: the pseudo devices and each DeviceAllow=). Where the nodes appear only later (NVIDIA's
# /dev/nvidia-uvm is made on first use by nvidia-modprobe; a driver loaded after boot), the device class is allowed
# by its /proc/devices name. DRI render nodes and NPUs belong to the groups render / video.
ACCELERATORS = ("nvidia", "dri", "npu")
_NODES = {"nvidia": ("nvidia[0-9]*", "nvidiactl", "nvidia-uvm", "nvidia-uvm-tools", "nvidia-modeset"),
          "dri": ("dri/renderD[0-9]*",), "npu": ("accel/accel[0-9]*",)}
_CLASSES = {"nvidia": ("char-nvidia-frontend", "char-nvidia-uvm"), "dri": ("char-drm",), "npu": ("char-accel",)}
ACCELERATOR_GROUPS = ("render", "video")


def accelerator_nodes(kind: str, dev: str | os.PathLike = "/dev") -> list[str]:
    """The device nodes of ``kind`` (nvidia, dri, npu) under ``dev``, as their paths in /dev."""
    from pathlib import Path

    base = Path(dev)
    found = sorted({p.relative_to(base).as_posix() for pattern in _NODES[kind] for p in base.glob(pattern)})
    return [f"/dev/{name}" for name in found]


def accelerators_present(dev: str | os.PathLike = "/dev") -> list[str]:
    """The kinds of accelerator whose nodes ``dev`` has (``--accelerator auto``)."""
    return [kind for kind in ACCELERATORS if accelerator_nodes(kind, dev)]


def accelerator_dropin(kinds: list[str], dev: str | os.PathLike = "/dev") -> bytes | None:
    """The unit's drop-in letting the agent use ``kinds`` (the nodes ``dev`` has, and for NVIDIA, or a kind whose
    nodes are not there yet, its device class); None for no kinds: the unit's PrivateDevices=yes stands."""
    if not kinds:
        return None
    allow, groups = [], False
    for kind in ACCELERATORS:
        if kind not in kinds:
            continue
        nodes = accelerator_nodes(kind, dev)
        allow += nodes
        if kind == "nvidia" or not nodes:
            allow += _CLASSES[kind]
        groups |= kind in ("dri", "npu")
    lines = [f"# Written by `edgefleet agent install --accelerator`: the agent may use {', '.join(kinds)} (its",
             "# device nodes alone; every other device stays closed). Re-run install to change it.",
             "[Service]", "PrivateDevices=no", "DevicePolicy=closed",
             *(f"DeviceAllow={a} rw" for a in dict.fromkeys(allow))]
    if groups:  # added to the unit's own SupplementaryGroups= (a list: a drop-in extends it)
        lines.append(f"SupplementaryGroups={' '.join(ACCELERATOR_GROUPS)}")
    return ("\n".join(lines) + "\n").encode()
