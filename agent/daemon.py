"""``Agent``: the one object the CLI, the tests and the demo build to run a device."""

from __future__ import annotations

import hashlib
import logging
import platform
import signal
import threading
import time
import uuid
from collections import OrderedDict
from pathlib import Path
from types import SimpleNamespace

import msgspec

from agent import __version__, accel, clock, identity, protocol, runtimes, signing, storage, systemd, transport, trust
from agent.api import InferenceServer
from agent.config import AgentConfig, ConfigError, validate
from agent.errors import EdgefleetError
from agent.feedback import FeedbackBook
from agent.config import load as load_config
from agent.engine import Engine, Loaded
from agent.ledger import Ledger
from agent.link import Link
from agent.metrics import Resources
from agent.outbox import FILE as OUTBOX_FILE, Outbox
from agent.store import ModelStore
from agent.updater import Limits, Policy, Updater, about, check_signed

log = logging.getLogger("edgefleet.agent")

# CPU features that decide which bundle variant runs well here
_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8", "amx_bf16", "asimddp", "i8mm", "sve")


def _short(name: str) -> str:
    """A runtime's name for a device or provider, cut to the contract's 1-32 characters of [A-Za-z0-9._+-]."""
    clean = "".join(c if c.isascii() and (c.isalnum() or c in "._+-") else "-" for c in name)[:32]
    return clean or "unknown"


def cpu_flags() -> list[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    have = set(line.split(":", 1)[1].split())
                    return [x for x in _FLAGS if x in have]
    except OSError:
        pass
    return []


class Agent:
    RENEW_CHECK_S = 3600.0  # how often the identity thread asks whether the certificate is due for renewal
    PROVISION_RETRY_S = (5.0, 300.0)  # first-boot enrollment: the first wait between tries, and the longest

    def __init__(self, config: AgentConfig) -> None:
        self.file_config = config  # what the config file says; reload() compares a new file with this
        self.config = config  # the same, with device_id, broker and controller filled in from the enrollment by start()
        self.identity: identity.Identity | None = None
        self.tls: transport.Tls | None = None
        self.enrollment_error: str | None = None  # why the first-boot enrollment has not happened yet
        self._provisioner: threading.Thread | None = None
        self._deferred_errors: list[str] = []  # error events found before the device knows its id
        # New every start (never persisted). seq is per device and persistent (agent/outbox.py); a message queued
        # before a restart is replayed byte for byte, with the boot_id it was built under, so (device, boot_id,
        # seq) stays the controller's dedupe key, and stays unique even if the state dir is wiped and seq restarts.
        self.boot_id = uuid.uuid4().hex[:16]
        self.outbox = Outbox(Path(config.state_dir) / OUTBOX_FILE, config.outbox_max_bytes, config.outbox_max_age_s)
        self._stop = threading.Event()
        self.store = ModelStore(config.state_dir)
        self.engine = Engine(feedback=FeedbackBook(config.feedback_buffer, config.feedback_ttl_s,
                                                   config.feedback_max_per_window), quality=config.quality)
        self.engine.on_fallback = self._fell_back
        self._devices: dict[str, list[str]] = {}  # what each runtime can use here (listed once, in a child)
        self.trust = trust.for_config(config)
        self.ledger = Ledger(config.state_dir)
        self.updater = Updater(self.store, self.engine, self._emit, Limits(
            window_s=config.rollback_window_s, min_inferences=config.rollback_min_inferences,
            max_error_rate=config.rollback_max_error_rate, max_p95_ms=config.rollback_max_p95_ms),
            policy=Policy.from_config(config), trust=self.trust, ledger=self.ledger)
        self._unsigned_warned = False
        self._refused: OrderedDict[bytes, None] = OrderedDict()  # digests of desired payloads already refused
        self._recovered: list[tuple[str, object, str]] = []  # events found owed at start, sent once linked
        self.api: InferenceServer | None = None
        self.link: Link | None = None
        self._resources: Resources | None = None
        self._accelerators = accel.Sampler()  # reads /sys (and NVML) at each window, not before
        self._telemetry = threading.Thread(target=self._telemetry_loop, name="agent-telemetry", daemon=True)
        self._telemetry_tick: float | None = None  # when the telemetry loop last woke (run()'s watchdog)
        self._renewer = threading.Thread(target=self._renew_loop, name="agent-identity", daemon=True)
        # what the outbox last said of the state dir (ok, full, read_only); since when, and its counts then
        self._storage = "ok"
        self._storage_since = 0.0
        self._storage_counts = (0, 0)
        self._storage_lock = threading.Lock()

    # --- who we are --------------------------------------------------------------------------------
    def _resolve_identity(self) -> bool:
        """Fill in device_id, broker, controller and the TLS files from the enrollment in the state dir, unless
        the config says them itself. Returns True when a first-boot enrollment (a provisioning token) is still
        to do: start() then serves at once and enrolls in the background (``_provision_loop``)."""
        cfg = self.config
        ident = None
        if not cfg.insecure:
            try:
                ident = identity.Identity.load(cfg.state_dir)
            except identity.IdentityError as e:
                raise ConfigError(str(e)) from None
            if ident is None and cfg.provision_token_file:
                self._read_provision_token()  # a missing token file is a config error, now
                return True
        self._use_identity(ident)
        return False

    def _use_identity(self, ident: identity.Identity | None) -> None:
        cfg = self.config
        if ident is None and not cfg.insecure and cfg.tls_cert is None:
            raise ConfigError(f"this device is not enrolled (no {Path(cfg.state_dir) / identity.DIR}): run `edgefleet "
                              f"agent enroll --controller https://HOST:PORT --token TOKEN --ca-fingerprint SHA256 "
                              f"--config FILE` with a token from `edgefleet fleet enroll`")
        if ident is not None:
            if cfg.device_id and not identity.is_template(cfg.device_id) and cfg.device_id != ident.device_id:
                raise ConfigError(f"device_id {cfg.device_id!r} in the config, but this state dir is enrolled as "
                                  f"{ident.device_id!r}")
            tls = ident.tls
            self.tls = transport.Tls(cfg.tls_ca or tls.ca, cfg.tls_cert or tls.cert, cfg.tls_key or tls.key)
            self.config = msgspec.structs.replace(cfg, device_id=ident.device_id, broker=cfg.broker or ident.broker,
                                                  controller=cfg.controller or ident.controller)
        elif cfg.tls_ca is not None:
            self.tls = transport.Tls(cfg.tls_ca, cfg.tls_cert, cfg.tls_key)
        missing = [k for k in ("device_id", "broker", "controller") if getattr(self.config, k) is None]
        if missing:
            raise ConfigError(f"{', '.join(missing)}: not in the config and not from an enrollment")
        if identity.is_template(self.config.device_id):
            raise ConfigError(f"device_id {self.config.device_id!r} is a template: only first-boot provisioning "
                              f"(provision_token_file) fills one in")
        self.identity = ident
        self.updater.policy = Policy.from_config(self.config)  # bundles come from the controller now known
        if self.tls is not None:
            self.tls.check()
            self.store.http_context = self._http_context

    def _http_context(self):
        return self.tls.context() if self.tls is not None else None

    def _read_provision_token(self) -> str:
        path = self.config.provision_token_file
        try:
            return Path(path).read_text().strip()
        except OSError as e:
            raise ConfigError(f"provision_token_file {path}: {e.strerror or e}") from None

    def _provision_loop(self) -> None:
        """First boot from an image: enroll with the fleet's provisioning token, under an id made here, retrying
        with a backoff while the controller cannot be reached or refuses (the token file is read again each
        time: an administrator may put a new one); then connect. Serving does not wait for it."""
        cfg, wait = self.config, self.PROVISION_RETRY_S[0]
        while not self._stop.is_set():
            try:
                ident = identity.enroll(cfg.state_dir, cfg.controller, self._read_provision_token(), cfg.ca_fingerprint,
                                        cfg.device_id)
            except (identity.IdentityError, ConfigError, OSError) as e:
                if str(e) != self.enrollment_error:
                    log.warning("first-boot enrollment failed: %s; trying again (every %.0f s at most)", e,
                                self.PROVISION_RETRY_S[1])
                self.enrollment_error = str(e)
                self._stop.wait(wait)
                wait = min(wait * 2, self.PROVISION_RETRY_S[1])
                continue
            log.info("enrolled as %s at first boot (certificate until %s)", ident.device_id,
                     identity.utc(ident.not_after))
            try:
                self._use_identity(ident)
            except (ConfigError, EdgefleetError) as e:
                self.enrollment_error = str(e)
                log.error("the enrollment cannot be used: %s", e)
                return
            self.enrollment_error = None
            self._go_online()
            return

    def _renew_loop(self) -> None:
        wait = 0.0
        while not self._stop.wait(wait):
            wait = self.RENEW_CHECK_S
            ident = self.identity
            if ident is None or not ident.renewal_due(time.time()):
                continue
            try:
                new = identity.renew(ident)
            except (identity.IdentityError, transport.TransportError, OSError) as e:
                log.warning("renewing the certificate (it expires in %s) failed: %s; trying again later",
                            identity.expires_in(ident, time.time()), e)
                wait = min(self.RENEW_CHECK_S, 300.0)
                continue
            self.identity, self.tls = new, new.tls
            if self.link is not None:
                self.link.use_identity(new.tls)
            log.info("renewed the certificate: valid until %s", identity.utc(new.not_after))

    # --- lifecycle -------------------------------------------------------------------------------
    def start(self) -> None:
        """Load the current model from disk and serve it, whatever the network does: a bad config fails here,
        at once; an unreachable broker or controller does not (the link connects, and a first-boot enrollment
        happens, in the background, while telemetry and events wait in the outbox)."""
        self.store.open()
        self.ledger.open()
        provisioning = self._resolve_identity()
        broken = self.outbox.open()
        if broken:  # moved aside and replaced: say so (queued, sent once the link is up)
            self._deferred_errors.append(broken)
        self._load_current()
        removed = self.store.collect(downloads=False)  # models but current and previous; a partial download waits
        if removed:
            log.info("removed from the state dir: %s", ", ".join(removed))
        self._resources = Resources(str(self.store.root))
        self.api = InferenceServer.from_config(self.config, self.engine, self.status)
        self.api.start()
        if provisioning:
            self._provisioner = threading.Thread(target=self._provision_loop, name="agent-provision", daemon=True)
            self._provisioner.start()
        else:
            self._go_online()
        self.updater.start()
        self._telemetry.start()
        self._renewer.start()
        threading.Thread(target=self._list_devices, name="agent-devices", daemon=True).start()
        log.info("agent %s serving on %s%s", self.config.device_id, self.api.address,
                 "; enrolling at first boot in the background" if provisioning else "")

    def _go_online(self) -> None:
        """The device knows who it is: queue what it owes the controller and connect (in the background)."""
        self.link = Link(
            self.config.device_id, transport.parse_url(self.config.broker, allow_plaintext=self.config.insecure),
            tls=self.tls, keepalive=self.config.keepalive_s,
            birth=self._birth, on_desired=self._on_desired, on_cmd=self._on_cmd, outbox=self.outbox,
            on_invalid_desired=self.refuse_desired,
        )
        for reason in self._deferred_errors:
            self._queue_error(reason)
        self._deferred_errors.clear()
        for kind, what, reason in self._recovered:
            self._emit(kind, what, reason)
            if kind == "active":  # queued now: no longer owed
                self._record_active(what.sha256, what.deployment_id)
        self._recovered.clear()
        self.link.start()

    # what a reload applies to the running agent; any other changed field waits for a restart
    LIVE_FIELDS = ("telemetry_interval_s",)

    def run(self, config_path: str | Path | None = None) -> None:
        """Start, then serve until SIGTERM or SIGINT; SIGHUP re-reads ``config_path`` (see ``reload``).

        Under systemd (Type=notify): READY=1 once ``start()`` returns (config loaded, broker link up, the
        current model warmed up); WATCHDOG=1 from this loop, and only while ``_wedged()`` finds nothing
        stuck; RELOADING=1 ... READY=1 around a reload; STOPPING=1 on the way out. The signal handlers
        only set flags: this loop does the work.
        """
        hup = threading.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, systemd.on_signal(self._stop))
        signal.signal(signal.SIGHUP, systemd.on_signal(hup))
        systemd.status("starting: loading the current model and warming it up")
        self.start()
        watchdog = systemd.Watchdog.from_env()
        tick = min(1.0, watchdog.period_s / 4) if watchdog.enabled else 1.0
        shown = self._status_line()
        systemd.ready(shown)
        stuck = None
        try:
            while not self._stop.wait(tick):
                if (line := self._status_line()) != shown:  # connected, lost the broker, enrolled: say so
                    systemd.status(line)
                    shown = line
                if hup.is_set():
                    hup.clear()
                    if config_path is None:
                        log.warning("SIGHUP: there is no config file to re-read")
                    else:
                        self.reload(config_path)
                now_stuck = self._wedged()
                if now_stuck is None:
                    watchdog.kick()
                elif now_stuck != stuck:
                    log.error("not making progress: %s%s", now_stuck,
                              "; no more WATCHDOG=1, so systemd restarts the agent" if watchdog.enabled else "")
                    systemd.status(f"stuck: {now_stuck}")
                stuck = now_stuck
        finally:
            systemd.stopping("stopping")
            self.stop()

    def reload(self, new: AgentConfig | str | Path) -> bool:
        """Apply a new config: an AgentConfig, or the TOML file to re-read (what SIGHUP does).

        Only ``telemetry_interval_s`` applies live (the telemetry loop reads it every period). Any other
        changed field (device_id, broker, controller, api, state_dir, keepalive_s, rollback_*) is named in
        one warning and takes effect at the next restart (`systemctl restart edgefleet-agent`); until then
        the agent keeps its old value, so ``self.config`` always says what is running. An invalid config:
        one error line naming the field, and the agent runs on as it was. Returns whether it was valid.
        """
        systemd.reloading()
        try:
            cfg = load_config(new) if isinstance(new, (str, Path)) else validate(new)
        except ConfigError as e:
            log.error("reload refused, still running on the previous config: %s", e)
            systemd.ready(f"reload refused: {e}")
            return False
        changed = [f for f in cfg.__struct_fields__ if getattr(cfg, f) != getattr(self.file_config, f)]
        live = {f: getattr(cfg, f) for f in changed if f in self.LIVE_FIELDS}
        for f, value in live.items():
            log.info("reload: %s %s -> %s", f, getattr(self.config, f), value)
        self.config = msgspec.structs.replace(self.config, **live)
        self.file_config = msgspec.structs.replace(self.file_config, **live)
        later = [f for f in changed if f not in live]
        if later:
            log.warning("reload: %s changed; takes effect at the next restart (systemctl restart edgefleet-agent)",
                        ", ".join(later))
        elif not changed:
            log.info("reload: the config is unchanged")
        systemd.ready(self._status_line())
        return True

    def _wedged(self) -> str | None:
        """What stops the agent from making progress, or None. Progress is: the telemetry thread is alive
        and has woken within two periods + 30 s; the updater thread is alive (a download on a slow link
        may take hours, so no more than that); the MQTT network thread is alive, connected or not (a
        broker outage is waited out with the outbox, never a reason to restart)."""
        if not self._telemetry.is_alive():
            return "the telemetry thread has died"
        tick = self._telemetry_tick
        if tick is not None and time.monotonic() - tick > 2 * self.config.telemetry_interval_s + 30:
            return f"the telemetry thread has not woken for {time.monotonic() - tick:.0f} s"
        if not self.updater.alive:
            return "the updater thread has died"
        if self.link is None:  # enrolling at first boot: no link yet
            if self._provisioner is not None and not self._provisioner.is_alive() and self.enrollment_error:
                return f"the first-boot enrollment gave up: {self.enrollment_error}"
            return None
        # paho has no public handle on loop_start()'s thread; it sets _thread to None when the loop ends
        net = getattr(getattr(self.link, "_c", None), "_thread", None)
        if net is None or not net.is_alive():
            return "the MQTT network thread has died"
        return None

    def _status_line(self) -> str:
        cur = self.engine.current
        model = f"{cur.manifest.name} {cur.manifest.version}" if cur else "no model yet"
        if self.link is None:
            return f"serving {model}; enrolling at first boot" + (f" ({self.enrollment_error})"
                                                                   if self.enrollment_error else "")
        if self.link.connected:
            return f"serving {model}; connected to {self.config.broker}"
        return f"serving {model}; waiting for {self.config.broker}" + (f" ({self.link.error})" if self.link.error
                                                                      else "")

    def stop(self) -> None:
        self._stop.set()
        self.updater.stop()
        if self._telemetry.is_alive():
            self._telemetry.join(timeout=5)
        if self._renewer.is_alive():
            self._renewer.join(timeout=5)
        if self._provisioner is not None and self._provisioner.is_alive():
            self._provisioner.join(timeout=5)
        if self.link:
            self.link.stop()
        self.outbox.close()  # what was not acknowledged stays on disk for the next start
        if self.api:
            self.api.stop()

    def _load_current(self) -> None:
        """Serve the model that was current before a restart or power cut, or else the previous one.

        Whatever a crash left: `current` always names a verified, unpacked model (the switch is one
        rename). If its `active` event was not queued before the crash, it is owed and sent once the
        link is up. If it does not load any more, the previous model takes its place and that is
        reported as a rollback."""
        info = self.store.active_info()
        for name in ("current", "previous"):
            found = self.store.current() if name == "current" else self.store.previous()
            if found is None:
                continue
            sha, model_dir = found
            dep = info.get("deployment_id") if info.get("sha256") == sha else None
            try:
                loaded = Loaded(sha, model_dir, self.store.manifest(model_dir), dep)
                loaded.smoke_test()  # the warm-up run
            except Exception as e:
                log.error("the %s model %s does not load (%s)", name, sha[:12], e)
                continue
            self.engine.swap(loaded)
            self.ledger.record_run(loaded.manifest.name, loaded.manifest.serial, sha)  # (an agent upgraded)
            if name == "previous":
                bad = self.store.current()
                try:
                    self.store.switch(sha)
                except OSError as e:  # serve it all the same
                    log.error("cannot switch the current link back to %s: %s", sha[:12], e)
                self._record_active(sha, dep)
                if bad:
                    self._recovered.append(("rolled_back", SimpleNamespace(
                        deployment_id=None, sha256=bad[0], version=None),
                        f"the current model {bad[0][:12]} no longer loads; back on {sha[:12]}"))
            elif info.get("sha256") == sha and info.get("reported") is False:
                self._recovered.append(("active", about(loaded), "switched before a restart, reported now"))
            return

    def _record_active(self, sha: str, deployment_id: str | None) -> None:
        try:
            self.store.record_active(sha, deployment_id, reported=True)
        except OSError as e:  # a full or read-only state dir: the event may be owed again after a restart
            log.warning("cannot record the active deployment in %s: %s", self.store.root, e)

    # --- messages ---------------------------------------------------------------------------------
    def _queue(self, kind: str, msg: protocol.Telemetry | protocol.Event | protocol.Quality) -> int:
        """Put a message in the outbox under the next seq (it leaves after the broker's PUBACK); return the seq.

        While the state dir takes no writes (full, read-only) the outbox holds it in memory instead. Raises only
        when the outbox itself is unusable: the caller must not assume it was sent."""
        def build(seq: int) -> bytes:  # inside the outbox's transaction
            msg.seq = seq
            if isinstance(msg, protocol.Telemetry):
                msg.outbox_pending, msg.outbox_dropped = self.outbox.pending_count, self.outbox.dropped
            return protocol.encode(msg)

        seq = self.outbox.put(kind, build)
        if self.link:
            self.link.notify()
        return seq

    def _queue_error(self, reason: str) -> None:
        self._queue(protocol.EVENTS, protocol.Event(
            device_id=self.config.device_id, boot_id=self.boot_id, seq=0, time=protocol.now(), kind="error",
            reason=protocol.clip(reason)))

    def _active(self) -> protocol.ActiveModel | None:
        cur = self.engine.current
        if cur is None:
            return None
        m, p = cur.manifest, cur.placement
        return protocol.ActiveModel(name=m.name, version=m.version, sha256=cur.sha, runtime=m.runtime,
                                    precision=m.precision, deployment_id=cur.deployment_id,
                                    signed_by=cur.signed_by, serial=m.serial or None,
                                    serving=protocol.Serving(device=_short(p.device), provider=_short(p.provider),
                                                             fallback=protocol.clip(p.fallback)))

    def _list_devices(self) -> None:
        """What each installed runtime can use here, listed once in a child process (``python -m agent.runtimes``):
        importing every runtime into the agent would cost it their memory for good. Then a fresh state message."""
        self._devices = runtimes.devices_in_child()
        if self._devices and self.link is not None:
            self.link.publish_state()

    def _fell_back(self, loaded: Loaded, reason: str) -> None:
        """The engine moved a model off its accelerator (it failed at run time): an event, and a state message that
        names the CPU as what serves now."""
        self._queue_error(f"model {loaded.manifest.name} {loaded.manifest.version} ({loaded.sha[:12]}) falls back "
                          f"to the CPU: {reason}")
        if self.link is not None:
            self.link.publish_state()

    def _birth(self) -> protocol.State:
        return protocol.State(
            device_id=self.config.device_id, online=True, time=protocol.now(), boot_id=self.boot_id,
            agent_version=__version__, arch=platform.machine(), cpu_flags=cpu_flags(),
            runtimes=runtimes.available(), active=self._active(), storage=self.outbox.storage,
            clock_synced=clock.synced(), devices={_short(k): [_short(d) for d in v[:16]]
                                                  for k, v in list(self._devices.items())[:16]},
        )

    def _emit(self, kind: str, desired: object, reason: str) -> None:
        """Queue an event about ``desired`` (anything with deployment_id, sha256, version). What is not valid
        in it is left out and the reason cut to the contract's bound: the agent never sends a message its
        own contract refuses."""
        named = protocol.named(desired)
        event = protocol.Event(
            device_id=self.config.device_id, boot_id=self.boot_id, seq=0, time=protocol.now(),
            kind=kind, deployment_id=named.deployment_id, sha256=named.sha256, version=named.version,
            reason=protocol.clip(reason),
        )
        self._queue(protocol.EVENTS, event)  # queued when this returns (raises if it cannot be)
        if kind in ("active", "rolled_back") and self.link:
            self.link.publish_state()

    def refuse_desired(self, payload: bytes, reason: str) -> bool:
        """A desired message that does not decode: tell the controller with a ``failed`` event naming the
        field (and the deployment and sha256 if they are valid), once per distinct payload, since a retained
        one comes back on every reconnect. Reads and writes nothing but the outbox. Returns whether it
        queued an event (False: this payload was refused already)."""
        digest = hashlib.sha256(payload).digest()
        if digest in self._refused:
            return False
        log.error("refused a desired model: %s", reason)
        self._emit("failed", protocol.named(payload), f"refused: {reason}")  # raises if it cannot be queued
        self._refused[digest] = None
        while len(self._refused) > 64:
            self._refused.popitem(last=False)
        return True

    # --- what the controller sends, verified (agent/signing.py) -----------------------------------------
    def controller_key(self) -> signing.PublicKey | None:
        """The controller's public key: the config's ``controller_key``, else the one the enrollment gave."""
        return trust.controller_key(self.config)

    def _unverified(self, kind: str) -> bool:
        """An insecure device without a controller key takes unsigned messages (local experiments only)."""
        if not self.config.insecure:
            return False
        if not self._unsigned_warned:
            log.warning("insecure: no controller key, so %s messages are not verified; anyone who can publish "
                        "to the broker can move this device (to bundles its trust store accepts)", kind)
            self._unsigned_warned = True
        return True

    def _on_desired(self, desired: protocol.Desired) -> None:
        key = self.controller_key()
        if key is None and self._unverified("desired"):
            self.updater.reconcile(desired)
            return
        why = check_signed(desired, key, self.config.device_id, self.ledger.desired_counter, time.time(),
                           clock.synced(), self.ledger.issued)
        if why:
            cur = self.engine.current
            if why.startswith("desired expired") and cur is not None and cur.sha == desired.sha256:
                log.info("the retained desired model expired; it names the running bundle, so nothing changes")
                return
            self.refuse_desired(protocol.encode(desired), why)
            return
        for change in self.trust.update(desired.trust):
            log.warning("trust store: %s", change)
        self.ledger.accept("desired", desired.counter, desired.time)
        self.updater.reconcile(desired)

    def _on_cmd(self, cmd: protocol.Cmd) -> None:
        key = self.controller_key()
        if not (key is None and self._unverified("cmd")):
            why = check_signed(cmd, key, self.config.device_id, self.ledger.cmd_counter, time.time(), clock.synced(),
                               self.ledger.issued)
            if not why and cmd.counter == self.ledger.cmd_counter:
                return  # the same command again (a redelivery): done once
            if why:
                digest = hashlib.sha256(protocol.encode(cmd)).digest()
                if digest not in self._refused:
                    self._refused[digest] = None
                    log.error("refused a %s command: %s", cmd.kind, why)
                    self._queue_error(f"refused a {cmd.kind} command: {why}")
                return
            self.ledger.accept("cmd", cmd.counter, cmd.time)
        if cmd.kind == "report":
            self.publish_telemetry()
        elif cmd.kind == "ping":
            self.link.publish_state()
        elif cmd.kind == "rollback":
            self.updater.request_rollback(f"rollback command {cmd.id}")

    def telemetry(self) -> protocol.Telemetry:
        """This window's summary; seq and the outbox figures are filled in when it is queued."""
        count, errors, latency, hist = self.engine.window.snapshot()
        return protocol.Telemetry(
            device_id=self.config.device_id, boot_id=self.boot_id, seq=0, time=protocol.now(),
            interval_s=self.config.telemetry_interval_s, inferences=count, errors=errors, latency_ms=latency,
            histogram=hist, active=self._active(), storage=self.outbox.storage, clock_synced=clock.synced(),
            accelerators=self._accelerators.sample(), **self._resources.sample(),
        )

    def publish_telemetry(self) -> None:
        if self.link is None:  # enrolling at first boot: the device has no id to report under yet
            return
        for reason in self.outbox.take_reports():  # a broken outbox file found (and replaced) since
            self._queue_error(reason)
        self.outbox.refresh()
        self._watch_storage()
        self._queue(protocol.TELEMETRY, self.telemetry())
        self.publish_quality()

    def publish_quality(self) -> None:
        """After the telemetry of a window: the canary when it is due, then one ``quality`` message per bundle with
        something to say (agent/engine.py ``take_quality``), through the outbox like telemetry (durable, a seq
        of the device's one counter). Nothing with ``quality = false``."""
        if not self.config.quality:
            return
        every, cur = self.config.canary_interval_s, self.engine.current
        if every > 0 and cur is not None and cur.quality is not None:
            last = cur.quality.canary_at
            if last is None or time.monotonic() - last >= every:
                self.engine.canary(cur)
        for msg in self.engine.take_quality(self.config.device_id, self.boot_id, self.config.telemetry_interval_s):
            self._queue(protocol.QUALITY, msg)

    def _watch_storage(self) -> None:
        """One error event (and one log line) when the state dir stops taking writes (full, read-only), one when
        it takes them again; the retained state says it at once. Inference is not touched either way."""
        with self._storage_lock:
            now, was = self.outbox.storage, self._storage
            if now == was:
                return
            self._storage = now
            box, root = self.outbox, self.store.root
            if now == "ok":
                held, dropped = box.held_total - self._storage_counts[0], box.dropped - self._storage_counts[1]
                reason = (f"storage ok: the state dir {root} takes writes again after "
                          f"{time.monotonic() - self._storage_since:.0f} s {was}; {held} messages waited in memory "
                          f"meanwhile, {dropped} dropped")
                log.warning("%s", reason)
            else:
                if was == "ok":
                    self._storage_since, self._storage_counts = time.monotonic(), (box.held_total, box.dropped)
                detail = box.storage_reason
                if not detail.endswith(" free"):
                    try:
                        detail += f"; {storage.human(storage.free_bytes(root))} free"
                    except OSError:
                        pass
                reason = (f"storage {now}: the state dir {root} takes no writes ({detail}); "
                          f"messages wait in memory (up to {storage.human(box.memory_max)}) and are sent from there, "
                          f"updates are refused, inference goes on")
                log.error("%s", reason)
        self._queue_error(reason)
        if self.link:
            self.link.publish_state()

    def _telemetry_loop(self) -> None:
        self._telemetry_tick = time.monotonic()
        next_at = time.monotonic() + self.config.telemetry_interval_s
        while not self._stop.wait(max(0.0, next_at - time.monotonic())):
            self._telemetry_tick = time.monotonic()
            next_at += self.config.telemetry_interval_s  # read every period: a reload may change it
            try:
                self.publish_telemetry()
            except Exception:
                log.exception("telemetry failed")

    def status(self) -> dict:
        cur = self.engine.current
        return {
            "device_id": self.config.device_id,
            "boot_id": self.boot_id,
            "broker_connected": bool(self.link and self.link.connected),
            # why the broker cannot be reached (or the first-boot enrollment has not happened), meanwhile
            "broker_error": self.link.error if self.link is not None else None,
            "enrollment": ("enrolled" if self.identity is not None else "pending" if self._provisioner is not None
                           else "none"),
            "enrollment_error": self.enrollment_error,
            "active": None if cur is None else {
                "name": cur.manifest.name, "version": cur.manifest.version, "sha256": cur.sha,
                "precision": cur.manifest.precision, "runtime": cur.manifest.runtime,
                "deployment_id": cur.deployment_id, "signed_by": cur.signed_by, "serial": cur.manifest.serial,
                "inputs": [{"name": s.name, "shape": s.shape, "dtype": s.dtype} for s in cur.manifest.inputs],
                "outputs": [{"name": s.name, "shape": s.shape, "dtype": s.dtype} for s in cur.manifest.outputs],
                # what really runs it (agent/runtimes: the bundle's accelerators setting, and the fallbacks)
                "serving": {"device": cur.placement.device, "provider": cur.placement.provider,
                            "fallback": cur.placement.fallback},
            },
            "devices": self._devices,
            "inferences": self.engine.window.total,
            # the active bundle's quality window so far (None: no profile.json, or quality = false)
            "quality": (cur.quality.status() if cur is not None and cur.quality is not None and self.config.quality
                        else None),
            "storage": self.outbox.storage,  # ok | full | read_only: whether the state dir takes writes
            "outbox": {"last_seq": self.outbox.last_seq, "pending": self.outbox.pending_count,
                       "dropped": self.outbox.dropped, "in_memory": self.outbox.degraded},
        }
