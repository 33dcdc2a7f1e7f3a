"""``Fleet``: the controller's one composition root, built alike by the CLI and the tests.

store (SQLite) + the fleet CA (``fleet.pki``, made once in ``DATA/pki``) + broker (an embedded mosquitto with
mutual TLS and an ACL, unless one is given) + MQTT link + HTTPS API (uvicorn in a thread; client
certificates optional, so devices can prove who they are) + housekeeping (a thread: the heartbeat sweep
every second, retention every minute). ``insecure=True`` (``fleet serve --insecure``) is plaintext MQTT and
HTTP with an anonymous broker: for local experiments only. ``serve()`` runs in the foreground until
SIGINT/SIGTERM; tests use ``start_background()`` and ``stop()``.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import signal
import socket
import ssl
import tempfile
import threading
from pathlib import Path
from typing import Callable
from urllib.parse import urlsplit

from agent import systemd, transport
from agent.errors import EdgefleetError
from fleet.auth import DEFAULT_MAX_BUNDLE_BYTES, Auth, any_caller_is_a_device
from fleet.broker import Mosquitto
from fleet.enroll import CERT_LIFETIME_S, Enrollment
from fleet.keys import Keys
from fleet.leader import Leadership
from fleet.link import CLIENT_ID, SESSION_EXPIRY_S, Link
from fleet.pki import PKI, WORKER_RE, default_hosts, fingerprint, pem
from fleet.retention import Housekeeper, Policy
from fleet.rollouts import Rollouts
from fleet.signer import DESIRED_TTL_S, MIN_DESIRED_TTL_S, Signer, resign
from fleet.store import MAX_CLOCK_OFFSET_S, OFFLINE_AFTER_INTERVALS, Store

log = logging.getLogger("edgefleet.fleet")

DB = "fleet.db"
BUNDLES = "bundles"
BROKER_DIR = "mosquitto"
CONTROLLER_JSON = "controller.json"
PKI_DIR = "pki"
SHARE = "edgefleet"  # the workers' shared-subscription group ($share/edgefleet/...)
# A worker's MQTT session ends with its connection. With a session kept, a broker goes on queueing a dead worker's
# share of new messages for it (mosquitto does); with none, they all go to the live workers. What was in flight to
# the dead one may be dropped (mosquitto #2662): the devices send again what the controller never acknowledged.
WORKER_SESSION_EXPIRY_S = 0


def check_worker(name: str, broker_url: str | None, store_url: str | None) -> str:
    """A worker's name, once checked with what a worker needs: an external broker and a PostgreSQL store (one
    line, EdgefleetError, when not)."""
    if not isinstance(name, str) or not WORKER_RE.fullmatch(name):
        raise EdgefleetError(f"invalid --worker {name!r}: 1 to 63 of a-z 0-9 . _ - (starting with a letter or digit)")
    if not broker_url:
        raise EdgefleetError("--worker needs an external --broker mqtts://HOST:PORT that all workers share "
                             "(the embedded broker is one process's)")
    if not str(store_url or "").lower().startswith(("postgresql://", "postgres://")):
        raise EdgefleetError("--worker needs a PostgreSQL store that all workers share: "
                             "--store postgresql://USER@HOST:PORT/DB")
    return name


def parse_hostport(text: str, what: str) -> tuple[str, int]:
    """``HOST:PORT`` -> (host, port); port 0 means a free port."""
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise EdgefleetError(f"invalid {what} {text!r}: expected HOST:PORT, e.g. 127.0.0.1:8080")
    return host.strip("[]"), int(port)


def _host_port(url: str) -> tuple[str, int]:
    u = transport.parse_url(url)
    return u.host, u.port


def _peer_cert_protocol():
    """uvicorn's h11 protocol, putting the TLS client certificate (DER, or nothing) of each connection into
    ``scope["state"]["peer_cert"]``: ASGI has no standard place for it, and the enrollment and bundle routes
    need to know which device is calling."""
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class PeerCertH11(H11Protocol):
        def connection_made(self, transport_) -> None:
            super().connection_made(transport_)
            ssl_object = transport_.get_extra_info("ssl_object")
            der = ssl_object.getpeercert(binary_form=True) if ssl_object is not None else None
            self.app_state = {**self.app_state, "peer_cert": der}  # this connection's own copy

    return PeerCertH11


class Fleet:
    def __init__(self, data_dir: Path, broker_url: str | None = None, http_host: str = "127.0.0.1",
                 http_port: int = 8080, public_url: str | None = None, mqtt_listen: str | None = None,
                 client_id: str = CLIENT_ID, offline_after: float = OFFLINE_AFTER_INTERVALS,
                 retention: Policy | None = None, sweep_every_s: float = 1.0,
                 compact_every_s: float = 60.0, *, insecure: bool = False, hostnames: list[str] = (),
                 broker_tls: transport.Tls | None = None, public_broker: str | None = None,
                 cert_lifetime_s: float = CERT_LIFETIME_S, pki_dir: Path | None = None,
                 max_bundle_bytes: int = DEFAULT_MAX_BUNDLE_BYTES,
                 device_identity: Callable[[dict], str | None] | None = None,
                 max_clock_offset_s: float = MAX_CLOCK_OFFSET_S, release_keys: list[str | Path] = (),
                 allow_unsigned: bool = False, desired_ttl_s: float = DESIRED_TTL_S,
                 store_url: str | None = None, metrics_per_device: bool = False, worker: str | None = None,
                 session_expiry_s: int | None = None) -> None:
        self.data_dir = Path(data_dir)
        # one of several controller workers (fleet/leader.py): a name, an external broker, a PostgreSQL store
        self.worker = check_worker(worker, broker_url, store_url) if worker is not None else None
        self.session_expiry_s = session_expiry_s if session_expiry_s is not None else (
            WORKER_SESSION_EXPIRY_S if worker is not None else SESSION_EXPIRY_S)
        if not 0 <= self.session_expiry_s <= 0xFFFFFFFF:
            raise EdgefleetError(f"invalid session expiry {self.session_expiry_s}: 0 to 4294967295 seconds")
        self.leadership: Leadership | None = None
        # the database (fleet/store/): sqlite:///PATH or postgresql://...; None: DATA/fleet.db, as always
        self.store_url = store_url
        # signing (fleet/signer.py, fleet/keys.py): release keys to list at start, whether unsigned bundles are
        # taken (experiments only), how long a signed desired is valid (it is signed again before it expires)
        self.release_keys = [Path(p) for p in release_keys]
        self.allow_unsigned = allow_unsigned
        self.metrics_per_device = metrics_per_device  # /metrics: each device's series too, not only aggregates
        if not desired_ttl_s >= MIN_DESIRED_TTL_S:
            raise EdgefleetError(f"the desired TTL must be at least {MIN_DESIRED_TTL_S:g} s (got {desired_ttl_s:g})")
        self.desired_ttl_s = float(desired_ttl_s)
        self.signer: Signer | None = None
        self.keys: Keys | None = None
        self.insecure = insecure  # plaintext MQTT and HTTP, an anonymous broker: local experiments only
        # more names devices and operators reach this controller by: in its certificates, and the Hosts it answers
        self.hostnames = list(hostnames)
        self.broker_tls = broker_tls  # with an external mqtts:// broker: its CA, our certificate and key
        self._public_broker = public_broker
        self.cert_lifetime_s = cert_lifetime_s
        self.pki: PKI | None = None
        self.pki_dir = Path(pki_dir) if pki_dir else self.data_dir / PKI_DIR  # the fleet CA (another dir: tests)
        self.enrollment: Enrollment | None = None
        # operators (fleet/auth.py): the upload cap, and who counts as a device at /bundles: the TLS client
        # certificate's device (any caller when insecure: there are no identities)
        self.max_bundle_bytes = max_bundle_bytes
        self.device_identity = device_identity or (any_caller_is_a_device if insecure else self._peer_device)
        self.auth: Auth | None = None
        self.new_admin_token: str | None = None  # the first admin token, made by this start (DATA/admin.token)
        self.offline_after = offline_after  # telemetry intervals of silence that make a device offline
        self.max_clock_offset_s = max_clock_offset_s  # a device clock further off is flagged (fleet/clock.py)
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
        self._mqtt_listen = mqtt_listen or f"127.0.0.1:{1883 if insecure else 8883}"
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
        return f"{self.scheme}://{host}:{self.http_port}"

    @property
    def scheme(self) -> str:
        return "http" if self.insecure else "https"

    @property
    def public_url(self) -> str:
        """The base URL devices enroll with and download bundles from."""
        if self._public_url:
            return self._public_url.rstrip("/")
        if self.http_host in ("0.0.0.0", "::", ""):
            return f"{self.scheme}://{socket.gethostname()}:{self.http_port}"
        return self.http_url

    @property
    def public_broker(self) -> str:
        """The broker URL enrolled devices are told: --public-broker, an external --broker as given, or the
        embedded broker at the public URL's host."""
        if self._public_broker:
            return self._public_broker
        if self.broker is None:
            return self.broker_url
        host = urlsplit(self.public_url).hostname or "127.0.0.1"
        host = f"[{host}]" if ":" in host else host
        return f"{'mqtt' if self.insecure else 'mqtts'}://{host}:{self.broker.port}"

    def _hosts(self) -> list[str]:
        """Every name the broker's and the controller's certificates carry."""
        hosts = default_hosts() + self.hostnames
        for url in (self._public_url, self._public_broker):
            if url and urlsplit(url).hostname:
                hosts.append(urlsplit(url).hostname)
        for host in (self.http_host, parse_hostport(self._mqtt_listen, "--mqtt-listen address")[0]):
            if host not in ("0.0.0.0", "::", ""):
                hosts.append(host)
        return hosts

    # -- lifecycle -----------------------------------------------------------------------------
    def start(self) -> "Fleet":
        """Open the store, bind HTTP, start the broker (unless one was given) and connect to it."""
        if self.store is not None:
            return self
        setup = None
        if self._broker_url is not None:  # a bad URL fails before anything starts
            try:
                transport.parse_url(self._broker_url, allow_plaintext=self.insecure, what="--broker")
            except transport.TransportError as e:
                raise EdgefleetError(f"{e}; --insecure allows it for a local experiment" if "plaintext" in str(e)
                                     else str(e)) from None
        if self._public_broker is not None:
            transport.parse_url(self._public_broker, allow_plaintext=self.insecure, what="--public-broker")
        try:
            self._lock_data_dir()
            setup = self._setup_lock()  # workers sharing the dir: one makes the CA and signing key, the others wait
            self.store = Store(self.store_url or self.data_dir / DB, offline_after=self.offline_after,
                               max_clock_offset_s=self.max_clock_offset_s).open()
            self.store.read_profiles(self.data_dir / BUNDLES)  # bundles stored before the store kept profiles
            if not self.insecure:
                self.pki = PKI(self.pki_dir).ensure(self._hosts())
                self.pki.write_crl(self.store.revoked_serials())
            self._bind()
            if self._broker_url is None:
                host, port = parse_hostport(self._mqtt_listen, "--mqtt-listen address")
                self.broker = Mosquitto(self.data_dir / BROKER_DIR, host=host, port=port, pki=self.pki)
                self.broker.set_revoked(self.store.revoked_device_ids())
                self.broker.start()
                connect_host = "127.0.0.1" if host in ("0.0.0.0", "") else host
                self._broker_url = f"{'mqtt' if self.insecure else 'mqtts'}://{connect_host}:{self.broker.port}"
            self.signer = Signer.open(self.data_dir, self.store, desired_ttl_s=self.desired_ttl_s)
            self.keys = Keys(self.store, self.signer, lambda: resign(self.link)[0])
            self.keys.ensure(self.release_keys)
            if self.allow_unsigned:
                log.warning("--allow-unsigned: bundles that no listed release key signed are taken; devices that "
                            "check signatures will refuse them. For experiments only.")
            if self.pki is not None:
                self.enrollment = Enrollment(self.store, self.pki, lambda: self.public_broker, lambda: self.public_url,
                                             cert_lifetime_s=self.cert_lifetime_s, on_revoke=self._revoked,
                                             controller_key=self.signer.pem)
            tls = self.broker_tls or (self.pki.controller_tls() if self.pki else None)
            client_id = self.client_id
            if self.worker is not None:
                client_id = f"{CLIENT_ID}-{self.worker}"
                # its own identity (fleet.pki.worker_cn), unless --cert named one; --ca alone keeps that CA
                default_cert = self.pki is not None and (
                    self.broker_tls is None or Path(self.broker_tls.cert or "") == self.pki.controller_crt)
                if default_cert:
                    own = self.pki.worker_tls(self.worker, self._hosts())
                    tls = transport.Tls(self.broker_tls.ca if self.broker_tls else own.ca, own.cert, own.key)
            self.link = Link(self._broker_url, self.store, client_id=client_id, tls=tls,
                             enrolled=self.enrollment.is_enrolled if self.enrollment else None,
                             signer=self.signer, session_expiry_s=self.session_expiry_s,
                             share=SHARE if self.worker is not None else None,
                             states=self.worker is None).start()  # a worker: only while it leads (_elected)
            self.housekeeper = Housekeeper(self.store, self.retention, self._sweep_every_s, self._compact_every_s,
                                           tasks=[("re-signing desireds", self.resign)])
            from fleet.api import create_app

            self.auth = Auth.for_controller(self.store, self.http_host, self.public_url, self.hostnames,
                                            device_identity=self.device_identity,
                                            max_bundle_bytes=self.max_bundle_bytes)
            self.new_admin_token = self.auth.ensure_admin(self.data_dir)
            self.app = create_app(self.store, self.link, self.data_dir / BUNDLES, lambda: self.public_url,
                                  self.auth, enrollment=self.enrollment, keys=self.keys,
                                  allow_unsigned=self.allow_unsigned, metrics_per_device=self.metrics_per_device)
            self.rollouts = self.app.state.rollouts = Rollouts(self.store, self.link, lambda: self.public_url)
            self.app.state.worker = self.worker
            if self.worker is None:  # the only controller: it runs them all, as always
                self._elected()
            else:  # one of several: the leader runs them (fleet/leader.py)
                self.leadership = Leadership(self.store, self.worker, self._elected, self._deposed).start()
            self.app.state.leader = self.is_leader
        except BaseException:
            self.stop()
            raise
        finally:
            if setup is not None:
                setup.close()
        return self

    def is_leader(self) -> bool:
        """Whether this controller runs the rollout driver, the sweep and retention (always, unless a worker)."""
        return self.leadership.leading if self.leadership is not None else self.store is not None

    def _elected(self) -> None:
        if self.worker is not None:
            self.link.follow_states(True)
        self.housekeeper.start()
        self.rollouts.start()

    def _deposed(self) -> None:
        if self.worker is not None and self.link is not None:
            self.link.follow_states(False)
        if self.rollouts is not None:
            self.rollouts.stop()
        if self.housekeeper is not None:
            self.housekeeper.stop()

    def _lock_data_dir(self) -> None:
        """One controller per data dir; or, with ``worker``, one per worker name (workers on one machine may share
        the dir: its CA, signing key and bundles)."""
        if not self.data_dir.exists():
            self.data_dir.mkdir(parents=True, exist_ok=True)
            os.chmod(self.data_dir, 0o700)  # the database, the bundles, the CA's key and the admin token
        name = ".lock" if self.worker is None else f".lock-worker-{self.worker}"
        f = open(self.data_dir / name, "a+")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            f.close()
            who = "another fleet controller" if self.worker is None else f"another worker {self.worker}"
            raise EdgefleetError(f"{who} is using {self.data_dir}") from None
        self._lock_file = f

    def _setup_lock(self):
        """With ``worker``: an exclusive lock on DATA/.setup.lock, held while this worker makes (or reads) what the
        dir's workers share; None for a lone controller (the data dir's lock is its own already)."""
        if self.worker is None:
            return None
        f = open(self.data_dir / ".setup.lock", "a+")
        fcntl.flock(f, fcntl.LOCK_EX)
        return f

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
        tls = {} if self.pki is None else dict(
            ssl_certfile=str(self.pki.controller_crt), ssl_keyfile=str(self.pki.controller_key),
            ssl_ca_certs=str(self.pki.ca_crt), ssl_cert_reqs=ssl.CERT_OPTIONAL,  # devices show theirs
            http=_peer_cert_protocol())
        config = uvicorn.Config(self.app, log_config=None, log_level="warning", access_log=False,
                                lifespan="off", timeout_graceful_shutdown=5, **tls)
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
        previous = {s: signal.signal(s, systemd.on_signal(stop)) for s in (signal.SIGINT, signal.SIGTERM)}
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
        if self.leadership is not None:
            self.leadership.stop()  # stops the leader's work, frees the lock for another worker
            self.leadership = None
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
            try:  # workers sharing the dir each write it: only this process's copy goes
                if json.loads((self.data_dir / CONTROLLER_JSON).read_text()).get("pid") == os.getpid():
                    (self.data_dir / CONTROLLER_JSON).unlink(missing_ok=True)
            except (OSError, ValueError):
                pass
            self._wrote_json = False
        if self._lock_file is not None:
            self._lock_file.close()  # releases the lock
            self._lock_file = None

    def _peer_device(self, scope: dict) -> str | None:
        """The enrolled, unrevoked device whose TLS client certificate this request came with, or None."""
        der = (scope.get("state") or {}).get("peer_cert")
        return self.enrollment.device_identity(der) if self.enrollment is not None and der else None

    # -- revocation --------------------------------------------------------------------------------
    def _revoked(self, device_id: str, kick: bool) -> None:
        """After a revocation: the broker denies the id everything and rereads the CRL; with ``kick`` the
        device's live connection is dropped (the CRL keeps it from coming back)."""
        if self.broker is None:
            log.warning("revoked %s: give the broker %s the new CRL %s (and deny the id in its ACL); this controller "
                        "ignores the device's messages from now on", device_id, self.broker_url,
                        self.pki.crl if self.pki else "")
            return
        self.broker.set_revoked(self.store.revoked_device_ids())
        self.broker.reload()
        if kick:
            self._kick(device_id)

    def _kick(self, device_id: str, timeout: float = 5.0) -> None:
        """Take over the device's MQTT session with a throwaway certificate for its id, then end it: the broker
        disconnects the device and forgets the session. The certificate is revoked right after."""
        cert, key = self.pki.issue_ephemeral(device_id)
        self.store.add_certificate(cert.serial_number, device_id, fingerprint(cert),
                                   cert.not_valid_before_utc.timestamp(), cert.not_valid_after_utc.timestamp(), "kick")
        try:
            with tempfile.TemporaryDirectory(dir=self.pki.root, prefix=".kick-") as tmp:
                crt_path, key_path = Path(tmp) / "kick.crt", Path(tmp) / "kick.key"
                crt_path.write_text(pem(cert))
                key_path.touch(0o600)
                key_path.write_bytes(key)
                client = transport.make_client(transport.parse_url(self.broker_url), device_id,
                                               transport.Tls(str(self.pki.ca_crt), str(crt_path), str(key_path)))
                done = threading.Event()
                client.on_connect = lambda *a: done.set()
                client.connect(*_host_port(self.broker_url), keepalive=10, clean_start=True,
                               properties=transport.connect_properties(0))
                client.loop_start()
                if not done.wait(timeout):
                    log.warning("could not take over %s's session to disconnect it", device_id)
                client.disconnect()
                client.loop_stop()
        except (OSError, EdgefleetError) as e:
            log.warning("could not disconnect %s: %s", device_id, e)
        finally:
            self.store.revoke_certificates(device_id, "session takeover", serials=[cert.serial_number])
            self.pki.write_crl(self.store.revoked_serials())
            self.broker.reload()

    def resign(self, now: float | None = None) -> int:
        """Sign again and republish the retained desireds that expire within half the TTL or carry old trust
        statements (the housekeeper does every sweep); ``now`` for tests. Returns how many went out."""
        if self.link is None:
            raise EdgefleetError("the fleet controller is not started")
        return resign(self.link, now=now)[0]

    def compact(self, now: float | None = None) -> dict[str, int]:
        """Run retention now (the housekeeper also does every minute); ``now`` for tests."""
        if self.housekeeper is None:
            raise EdgefleetError("the fleet controller is not started")
        return self.housekeeper.compact(now)

    def _write_controller_json(self) -> None:
        doc = {"http": self.http_url, "broker": self.broker_url, "pid": os.getpid(), "insecure": self.insecure,
               "worker": self.worker,
               "ca_fingerprint": self.pki.ca_fingerprint if self.pki else None}
        fd, tmp = tempfile.mkstemp(dir=self.data_dir, prefix=".controller.", suffix=".json")
        with os.fdopen(fd, "w") as f:
            json.dump(doc, f)
        os.replace(tmp, self.data_dir / CONTROLLER_JSON)
        self._wrote_json = True

    def __enter__(self) -> "Fleet":
        return self.start_background()

    def __exit__(self, *exc) -> None:
        self.stop()
