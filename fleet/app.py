"""``Fleet``: the controller's one composition root, built alike by the CLI and the tests.

store (SQLite) + broker (an embedded mosquitto unless one is given) + MQTT link + HTTP API (uvicorn in
a thread) + housekeeping (a thread: the heartbeat sweep every second, retention every minute).
``serve()`` runs in the foreground until SIGINT/SIGTERM; tests use ``start_background()`` and ``stop()``.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import signal
import socket
import tempfile
import threading
from pathlib import Path
from typing import Callable

from agent.errors import EdgefleetError
from fleet.auth import DEFAULT_MAX_BUNDLE_BYTES, Auth, any_caller_is_a_device
from fleet.broker import Mosquitto
from agent.config import parse_mqtt_url as parse_broker_url
from fleet.link import CLIENT_ID, Link
from fleet.retention import Housekeeper, Policy
from fleet.rollouts import Rollouts
from fleet.store import OFFLINE_AFTER_INTERVALS, Store

log = logging.getLogger("edgefleet.fleet")

DB = "fleet.db"
BUNDLES = "bundles"
BROKER_DIR = "mosquitto"
CONTROLLER_JSON = "controller.json"


def parse_hostport(text: str, what: str) -> tuple[str, int]:
    """``HOST:PORT`` -> (host, port); port 0 means a free port."""
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise EdgefleetError(f"invalid {what} {text!r}: expected HOST:PORT, e.g. 127.0.0.1:8080")
    return host.strip("[]"), int(port)


class Fleet:
    def __init__(self, data_dir: Path, broker_url: str | None = None, http_host: str = "127.0.0.1",
                 http_port: int = 8080, public_url: str | None = None, mqtt_listen: str = "127.0.0.1:1883",
                 client_id: str = CLIENT_ID, offline_after: float = OFFLINE_AFTER_INTERVALS,
                 retention: Policy | None = None, sweep_every_s: float = 1.0,
                 compact_every_s: float = 60.0, allowed_hosts: tuple[str, ...] = (),
                 max_bundle_bytes: int = DEFAULT_MAX_BUNDLE_BYTES,
                 device_identity: Callable[[dict], str | None] | None = None) -> None:
        self.data_dir = Path(data_dir)
        # operators (fleet/auth.py): the extra names the API answers to, the upload cap, who counts as a device
        self.allowed_hosts, self.max_bundle_bytes = tuple(allowed_hosts), max_bundle_bytes
        self.device_identity = device_identity or any_caller_is_a_device  # no client certificates yet
        self.auth: Auth | None = None
        self.new_admin_token: str | None = None  # the first admin token, made by this start (DATA/admin.token)
        self.offline_after = offline_after  # telemetry intervals of silence that make a device offline
        self.retention = retention or Policy()
        self._sweep_every_s = sweep_every_s
        self._compact_every_s = compact_every_s
        self.housekeeper: Housekeeper | None = None
        self.rollouts: Rollouts | None = None  # the rollout driver (fleet/rollouts.py)
        self.http_host = http_host
        self.http_port = http_port
        self.client_id = client_id
        self._broker_url = broker_url
        self._public_url = public_url
        self._mqtt_listen = mqtt_listen
        self.store: Store | None = None
        self.broker: Mosquitto | None = None
        self.link: Link | None = None
        self.app = None
        self._sock: socket.socket | None = None
        self._server = None
        self._thread: threading.Thread | None = None
        self._lock_file = None
        self._wrote_json = False

    # -- addresses -----------------------------------------------------------------------------
    @property
    def broker_url(self) -> str:
        if self._broker_url is None:
            raise EdgefleetError("the fleet controller is not started")
        return self._broker_url

    @property
    def http_url(self) -> str:
        if self._sock is None:
            raise EdgefleetError("the fleet controller is not started")
        host = self.http_host if ":" not in self.http_host else f"[{self.http_host}]"
        return f"http://{host}:{self.http_port}"

    @property
    def public_url(self) -> str:
        """The base URL devices download bundles from."""
        if self._public_url:
            return self._public_url.rstrip("/")
        if self.http_host in ("0.0.0.0", "::", ""):
            return f"http://{socket.gethostname()}:{self.http_port}"
        return self.http_url

    # -- lifecycle -----------------------------------------------------------------------------
    def start(self) -> "Fleet":
        """Open the store, bind HTTP, start the broker (unless one was given) and connect to it."""
        if self.store is not None:
            return self
        if self._broker_url is not None:
            parse_broker_url(self._broker_url)  # a bad URL fails before anything starts
        try:
            self._lock_data_dir()
            self.store = Store(self.data_dir / DB, offline_after=self.offline_after).open()
            self._bind()
            if self._broker_url is None:
                host, port = parse_hostport(self._mqtt_listen, "--mqtt-listen address")
                self.broker = Mosquitto(self.data_dir / BROKER_DIR, host=host, port=port).start()
                connect_host = "127.0.0.1" if host in ("0.0.0.0", "") else host
                self._broker_url = f"mqtt://{connect_host}:{self.broker.port}"
            self.link = Link(self._broker_url, self.store, client_id=self.client_id).start()
            self.housekeeper = Housekeeper(self.store, self.retention, self._sweep_every_s,
                                           self._compact_every_s).start()
            from fleet.api import create_app

            self.auth = Auth.for_controller(self.store, self.http_host, self.public_url, self.allowed_hosts,
                                            device_identity=self.device_identity,
                                            max_bundle_bytes=self.max_bundle_bytes)
            self.new_admin_token = self.auth.ensure_admin(self.data_dir)
            self.app = create_app(self.store, self.link, self.data_dir / BUNDLES, lambda: self.public_url,
                                  self.auth)
            self.rollouts = self.app.state.rollouts = Rollouts(self.store, self.link, lambda: self.public_url).start()
        except BaseException:
            self.stop()
            raise
        return self

    def _lock_data_dir(self) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        f = open(self.data_dir / ".lock", "a+")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            f.close()
            raise EdgefleetError(f"another fleet controller is using {self.data_dir}") from None
        self._lock_file = f

    def _bind(self) -> None:
        family = socket.AF_INET6 if ":" in self.http_host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((self.http_host, self.http_port))
            sock.listen(128)
        except OSError as e:
            sock.close()
            raise EdgefleetError(f"cannot listen on {self.http_host}:{self.http_port}: "
                                 f"{e.strerror or e}") from None
        sock.set_inheritable(True)
        self._sock = sock
        self.http_port = sock.getsockname()[1]

    def start_background(self, timeout: float = 30.0) -> "Fleet":
        """Start everything and serve HTTP from a thread; returns once HTTP accepts requests."""
        import uvicorn

        self.start()
        if self._thread is not None:
            return self
        config = uvicorn.Config(self.app, log_config=None, log_level="warning", access_log=False,
                                lifespan="off", timeout_graceful_shutdown=5)
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [self._sock]},
                                        name="edgefleet-http", daemon=True)
        self._thread.start()
        ready = threading.Event()
        while not ready.wait(0.02):
            if self._server.started:
                break
            if not self._thread.is_alive() or timeout <= 0:
                self.stop()
                raise EdgefleetError(f"the HTTP server did not start on {self.http_url}")
            timeout -= 0.02
        self._write_controller_json()
        log.info("serving HTTP on %s, broker %s", self.http_url, self.broker_url)
        return self

    def serve(self, ready: Callable[["Fleet"], None] | None = None) -> None:
        """Run in the foreground until SIGINT or SIGTERM, then stop everything cleanly."""
        stop = threading.Event()
        previous = {s: signal.signal(s, lambda *_: stop.set()) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            self.start_background()
            if ready is not None:
                ready(self)
            while not stop.wait(0.5):
                if not self._thread.is_alive():
                    raise EdgefleetError("the HTTP server stopped unexpectedly")
        finally:
            self.stop()
            for s, handler in previous.items():
                signal.signal(s, handler)

    def stop(self) -> None:
        """Stop HTTP, the link (keeping its broker session) and the embedded broker; idempotent."""
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(15)
            self._thread = None
        self._server = None
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        if self.housekeeper is not None:
            self.housekeeper.stop()
            self.housekeeper = None
        if self.rollouts is not None:
            self.rollouts.stop()
            self.rollouts = None
        if self.link is not None:
            self.link.stop()
            self.link = None
        if self.broker is not None:
            self.broker.stop()
            self.broker = None
            self._broker_url = None
        if self.store is not None:
            self.store.close()
            self.store = None
        if self._wrote_json:
            (self.data_dir / CONTROLLER_JSON).unlink(missing_ok=True)
            self._wrote_json = False
        if self._lock_file is not None:
            self._lock_file.close()  # releases the lock
            self._lock_file = None

    def compact(self, now: float | None = None) -> dict[str, int]:
        """Run retention now (the housekeeper also does every minute); ``now`` for tests."""
        if self.housekeeper is None:
            raise EdgefleetError("the fleet controller is not started")
        return self.housekeeper.compact(now)

    def _write_controller_json(self) -> None:
        doc = {"http": self.http_url, "broker": self.broker_url, "pid": os.getpid()}
        fd, tmp = tempfile.mkstemp(dir=self.data_dir, prefix=".controller.", suffix=".json")
        with os.fdopen(fd, "w") as f:
            json.dump(doc, f)
        os.replace(tmp, self.data_dir / CONTROLLER_JSON)
        self._wrote_json = True

    def __enter__(self) -> "Fleet":
        return self.start_background()

    def __exit__(self, *exc) -> None:
        self.stop()
