"""The embedded broker: mosquitto as a child process, configured for a controller that must not lose messages
and for devices that may speak only for themselves.

FINDINGS (MQTT): with mosquitto's defaults a slow subscriber loses most QoS 1 messages although every
publisher got its PUBACK, so the queue and in-flight limits are raised here, and persistence is on so the
controller's persistent session and retained messages survive a broker restart.

With a ``pki`` (the default for ``fleet serve``) it listens with TLS only and requires a client certificate
from the fleet CA (``require_certificate``); the certificate's CN is the client's user name and client id
(``use_identity_as_username``, ``use_username_as_clientid``: nobody can claim another's id or take over its
session); anonymous clients are refused; revoked certificates are in the CRL; and the ACL file lets a device
publish only ``edgefleet/v1/<its id>/{state,telemetry,events,quality}`` and read only its own ``desired``,
``cmd`` and ``ack`` (the controller's end-to-end acknowledgements), while the controller's identity reads and
writes every device's topics. A revoked device id gets an explicit ``deny`` in the ACL, which mosquitto applies
to a live connection on SIGHUP (``reload()``), when it also rereads the CRL for new connections. Packets over
``MAX_PACKET_SIZE`` disconnect their sender. Without a ``pki``
(``fleet serve --insecure``) it is a plaintext broker that anyone who can reach it may use.
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
from typing import TYPE_CHECKING

from agent.errors import EdgefleetError

if TYPE_CHECKING:
    from fleet.pki import PKI

_PR_SET_PDEATHSIG = 1
CONFIG = "mosquitto.conf"
LOG = "mosquitto.log"
OUTPUT = "mosquitto.out"  # its stdout/stderr: what it says before the log file is open
ACL = "acl"
MAX_PACKET_SIZE = 128 * 1024  # bytes; the largest message of the contract is a few KiB


def acl_text(revoked: list[str] = (), workers: list[str] = ()) -> str:
    """The ACL file: the controller's identity (and each controller worker's, ``fleet.pki.worker_cn``) reads and
    writes every device's topics; a device publishes its own reports and reads its own desired model, commands
    and acks; a revoked id may do nothing."""
    from fleet.pki import CONTROLLER_CN, worker_cn

    lines = ["# written by edgefleet; regenerated on every start and revocation", "",
             f"user {CONTROLLER_CN}", "topic readwrite edgefleet/v1/#", ""]
    for name in sorted(set(workers)):  # names are [a-z0-9._-] (fleet.pki.WORKER_RE)
        lines += [f"user {worker_cn(name)}", "topic readwrite edgefleet/v1/#", ""]
    for device_id in sorted(set(revoked)):  # ids are [a-z0-9._-]: nothing here can break the file's syntax
        lines += [f"user {device_id}", "topic deny #", ""]
    lines += ["# every other client: a device, its user name being the CN of its certificate",
              "pattern write edgefleet/v1/%u/state", "pattern write edgefleet/v1/%u/telemetry",
              "pattern write edgefleet/v1/%u/events", "pattern write edgefleet/v1/%u/quality",
              "pattern read edgefleet/v1/%u/desired",
              "pattern read edgefleet/v1/%u/cmd", "pattern read edgefleet/v1/%u/ack", ""]
    return "\n".join(lines)


def secure_listener(pki: "PKI", host: str, port: int, acl_path: Path) -> list[str]:
    """mosquitto.conf lines for a listener only the fleet's certificates may use, under the ACL at ``acl_path``."""
    return ["per_listener_settings false", "allow_anonymous false", f"acl_file {acl_path}",
            f"listener {port} {host}", f"cafile {pki.ca_crt}", f"certfile {pki.broker_crt}",
            f"keyfile {pki.broker_key}", f"crlfile {pki.crl}", "require_certificate true",
            "use_identity_as_username true", "use_username_as_clientid true", "tls_version tlsv1.2",
            f"max_packet_size {MAX_PACKET_SIZE}"]


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
                 start_timeout: float = 10.0, pki: "PKI | None" = None, workers: list[str] = ()) -> None:
        self.data_dir = Path(data_dir)
        self.workers = list(workers)  # controller workers the ACL admits besides the controller (fleet serve --worker)
        self.host = host
        self.port = port
        self.start_timeout = start_timeout
        self.pki = pki
        self.proc: subprocess.Popen | None = None
        self._revoked: list[str] = []

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{'mqtts' if self.pki else 'mqtt'}://{host}:{self.port}"

    @property
    def acl_path(self) -> Path:
        return self.data_dir / ACL

    def acl(self) -> str:
        return acl_text(self._revoked, self.workers)

    def set_revoked(self, device_ids: list[str]) -> None:
        """Deny these device ids everything (written to the ACL now; applied to live connections by reload())."""
        self._revoked = sorted(set(device_ids))
        if self.pki is not None:
            self.data_dir.mkdir(parents=True, exist_ok=True)
            _write_text(self.acl_path, self.acl())

    def reload(self, timeout: float = 5.0) -> bool:
        """SIGHUP: mosquitto rereads its config, ACL and CRL (the CRL for new connections; the ACL at once).

        Returns once its log says it reloaded (it handles the signal in its main loop, which then applies the
        new ACL before it reads from any client again), or False after ``timeout``."""
        if not self.running:
            return False
        try:
            offset = self.log_path.stat().st_size
        except OSError:
            offset = 0
        self.proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                with open(self.log_path, "rb") as f:
                    f.seek(offset)
                    if b"Reloading config" in f.read():
                        return True
            except OSError:
                pass
            time.sleep(0.02)
        return False

    @property
    def log_path(self) -> Path:
        return self.data_dir / LOG

    def config(self) -> str:
        persist = self.data_dir / "persistence"
        if self.pki is None:
            access = ["# INSECURE (fleet serve --insecure): plaintext, and anyone who reaches it may use it",
                      f"listener {self.port} {self.host}", "allow_anonymous true", f"max_packet_size {MAX_PACKET_SIZE}"]
        else:
            access = secure_listener(self.pki, self.host, self.port, self.acl_path)
        return "\n".join([
            "# written by edgefleet; regenerated on every start",
            f"user {pwd.getpwuid(os.geteuid()).pw_name}",  # as root, mosquitto would switch to 'mosquitto'
            *access,
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
        if self.pki is not None:
            _write_text(self.acl_path, self.acl())
        for attempt in range(3 if pick else 1):
            if pick:
                self.port = free_port(self.host)
            conf = self.data_dir / CONFIG
            _write_text(conf, self.config())
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

    def _wait_ready(self) -> bool:  # the TCP port answers (TLS or not: the handshake needs a client certificate)
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


def _write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
