"""The embedded broker: mosquitto as a child process, configured for a controller that must not lose messages.

FINDINGS (MQTT): with mosquitto's defaults a slow subscriber loses most QoS 1 messages although every
publisher got its PUBACK, so the queue and in-flight limits are raised here, and persistence is on so the
controller's persistent session and retained messages survive a broker restart.
"""

from __future__ import annotations

import atexit
import ctypes
import os
import pwd
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

from agent.errors import EdgefleetError

_PR_SET_PDEATHSIG = 1
CONFIG = "mosquitto.conf"
LOG = "mosquitto.log"
OUTPUT = "mosquitto.out"  # its stdout/stderr: what it says before the log file is open


def find_mosquitto() -> str:
    path = shutil.which("mosquitto") or shutil.which("mosquitto", path="/usr/sbin:/usr/local/sbin:/sbin")
    if not path:
        raise EdgefleetError("mosquitto is not installed: apt-get install mosquitto")
    return path


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago (the caller binds it soon after)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _die_with_parent(parent: int):
    def preexec() -> None:  # runs in the child between fork and exec
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
        if os.getppid() != parent:  # the parent died before prctl took effect
            os._exit(1)

    return preexec


class Mosquitto:
    """A mosquitto child process listening on ``host:port`` (0: a free port), its state in ``data_dir``.

    The child gets SIGTERM when the thread that started it dies (PR_SET_PDEATHSIG), so start it from
    the main thread (or one that lives as long as the controller); ``stop()`` ends it cleanly.
    """

    def __init__(self, data_dir: Path, host: str = "127.0.0.1", port: int = 0,
                 start_timeout: float = 10.0) -> None:
        self.data_dir = Path(data_dir)
        self.host = host
        self.port = port
        self.start_timeout = start_timeout
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"mqtt://{self.host}:{self.port}"

    @property
    def log_path(self) -> Path:
        return self.data_dir / LOG

    def config(self) -> str:
        persist = self.data_dir / "persistence"
        return "\n".join([
            "# written by edgefleet; regenerated on every start",
            f"user {pwd.getpwuid(os.geteuid()).pw_name}",  # as root, mosquitto would switch to 'mosquitto'
            f"listener {self.port} {self.host}",
            "allow_anonymous true",
            "persistence true",
            f"persistence_location {persist}/",
            "autosave_interval 60",
            "max_queued_messages 100000",
            "max_inflight_messages 100",
            "persistent_client_expiration 7d",
            "set_tcp_nodelay true",
            f"log_dest file {self.log_path}",
            "log_type error",
            "log_type warning",
            "log_type notice",
            "log_type information",
            "log_timestamp_format %Y-%m-%dT%H:%M:%S",
            "",
        ])

    def start(self) -> "Mosquitto":
        if self.proc is not None:
            return self
        exe = find_mosquitto()
        self.data_dir.mkdir(parents=True, exist_ok=True)
        (self.data_dir / "persistence").mkdir(exist_ok=True)
        pick = self.port == 0
        for attempt in range(3 if pick else 1):
            if pick:
                self.port = free_port(self.host)
            conf = self.data_dir / CONFIG
            conf.write_text(self.config())
            out = open(self.data_dir / OUTPUT, "ab")
            try:
                self.proc = subprocess.Popen(
                    [exe, "-c", str(conf)], stdin=subprocess.DEVNULL, stdout=out, stderr=out,
                    preexec_fn=_die_with_parent(os.getpid()), start_new_session=True,  # no terminal Ctrl-C
                )
            finally:
                out.close()
            if self._wait_ready():
                atexit.register(self.stop)
                return self
            self.proc.wait()
            self.proc = None
            if not (pick and "in use" in self._tail()):  # another process took the port we picked: retry
                break
        raise EdgefleetError(f"mosquitto did not start listening on {self.host}:{self.port} "
                             f"(see {self.log_path}): {self._tail() or 'no output'}")

    def _wait_ready(self) -> bool:
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                return False
            try:
                with socket.create_connection((self.host, self.port), timeout=0.5):
                    return True
            except OSError:
                time.sleep(0.05)
        self.proc.terminate()
        return False

    def _tail(self, lines: int = 3) -> str:
        text = []
        for name in (OUTPUT, LOG):
            try:
                text += (self.data_dir / name).read_text(errors="replace").splitlines()[-lines:]
            except OSError:
                pass
        return " | ".join(t.strip() for t in text[-lines:] if t.strip())

    def stop(self, timeout: float = 10.0) -> None:
        proc, self.proc = self.proc, None
        atexit.unregister(self.stop)
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()  # SIGTERM: mosquitto saves its persistence database and exits
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def __enter__(self) -> "Mosquitto":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
