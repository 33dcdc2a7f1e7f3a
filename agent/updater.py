"""Reconcile toward the desired model: download, verify, unpack, load, smoke-test, switch, report; then
watch the new model on real traffic for a while and roll back by itself if it misbehaves.

Runs on its own thread and always works on the newest desired state, so a repeated or superseded
message is harmless. Any failure leaves the previous model serving and reports why. Every step is a
named fault point (agent/faults.py), where the crash tests kill the process.

Before anything is read or written for a desired model, ``check_desired`` holds it to the wire contract
(again: a Desired built in-process was never decoded) and to this device's ``Policy``: a size of at most
``max_bundle_bytes``, and a URL that is http(s) on the controller's origin or one of ``bundle_origins``
(redirects included). A refusal is a ``failed`` event naming the field.

Trust (issue 10): the daemon acts on a desired only once ``check_signed`` passed (the controller's signature,
this device, unexpired, a counter not older than the last accepted); ``apply`` then checks the downloaded tar's
sha256, its ``manifest.sig`` against the trust store (agent/trust.py), the serial against the ledger
(agent/ledger.py: no downgrade unless a signed rollback to a bundle run before) and every file against the
manifest, before anything is unpacked.

The state dir is kept to what the two models and the outbox need: before anything else a desired model
garbage-collects every other bundle's download and unpack (``ModelStore.collect``), an update that would not fit
the free space with ``min_free_bytes`` to spare is refused before a byte of it is written, a state dir that fills
or turns read-only during one fails it (one ``failed`` event, what it wrote removed, not retried), and after each
update only ``current`` and ``previous`` stay. A write the state dir refuses never stops this thread: the loaded
model keeps serving.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from types import SimpleNamespace

from agent import faults, protocol, signing, storage
from agent.bundle import read_signed
from agent.config import AgentConfig, ConfigError, min_free_bytes, parse_origin
from agent.engine import Engine, Loaded
from agent.errors import EdgefleetError
from agent.ledger import Ledger
from agent.store import DownloadError, ModelStore, StorageError
from agent.trust import TrustStore, Untrusted

log = logging.getLogger("edgefleet.agent.updater")

# emit(kind, desired-like (deployment_id, sha256, version), reason)
Emit = Callable[[str, object, str], None]


@dataclass
class Limits:
    """When a newly activated model is rolled back (AgentConfig's rollback_* fields)."""

    window_s: float = 300.0
    min_inferences: int = 20
    max_error_rate: float = 0.05
    max_p95_ms: float | None = None  # None: the bundle's latency budget


def check_signed(msg: protocol.Desired | protocol.Cmd, key: signing.PublicKey | None, device_id: str,
                 last_counter: int, now: float, clock_synced: bool | None, known: float = 0.0) -> str:
    """Why a desired or cmd must be refused ('' if it may be acted on): it must be signed with the
    controller's key, for this device, unexpired, and its counter not lower than the last one accepted
    (equal: the same message again, e.g. a retained desired redelivered).

    Expiry is judged against the later of this device's clock and ``known``, the latest time the controller
    signed a message this device accepted (a lower bound on the real time whatever the local clock says).
    When the OS says the clock is not synchronised (agent/clock.py), against ``known`` alone: a clock that is
    ahead cannot expire everything, and the counter still refuses any replay."""
    kind = "desired" if isinstance(msg, protocol.Desired) else "cmd"
    if key is None:
        return f"{kind} cannot be verified: this device has no controller key (enroll it)"
    if not msg.sig:
        return f"{kind} is not signed by the controller"
    if msg.keyid != key.keyid:
        return f"{kind} is signed by key {msg.keyid or '(none)'}, not the controller's ({key.keyid})"
    if not key.verify(msg.sig, signing.message_bytes(msg)):
        return f"{kind} signature does not verify with the controller's key {key.keyid}"
    if msg.device_id != device_id:
        return f"{kind} is for device {msg.device_id}, not this one ({device_id})"
    if not msg.expires:
        return f"{kind} has no expiry"
    ref, said = (known, "the controller's latest signed time") if clock_synced is False else (
        (now, "this device's clock") if now >= known else (known, "the controller's latest signed time"))
    if msg.expires < ref:
        return (f"{kind} expired at {_utc(msg.expires)} ({said} is {_utc(ref)}); the controller re-signs what "
                f"it still wants")
    if msg.counter < last_counter:
        return (f"{kind} counter {msg.counter} is lower than the last one this device accepted "
                f"({last_counter}): an old message replayed")
    return ""


def _utc(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


class Refused(EdgefleetError):
    """A desired model this device will not fetch; the message names the field."""


@dataclass(frozen=True)
class Policy:
    """What a desired model may ask of this device (AgentConfig's controller, bundle_origins,
    max_bundle_bytes and min_free_bytes)."""

    origins: tuple[str, ...]  # normalised scheme://host:port (config.parse_origin); the controller's first
    max_bundle_bytes: int = 2 << 30
    min_free_bytes: int = 0  # left free in the state dir after the download and the unpack

    @classmethod
    def from_config(cls, cfg: AgentConfig) -> "Policy":
        # the controller comes from the enrollment when the config has none: Agent.start() makes the policy again
        origins = [parse_origin(cfg.controller, "controller", path_ok=True)] if cfg.controller else []
        origins += [parse_origin(o, "bundle_origins:") for o in cfg.bundle_origins]
        return cls(origins=tuple(dict.fromkeys(origins)), max_bundle_bytes=cfg.max_bundle_bytes,
                   min_free_bytes=min_free_bytes(cfg))

    def check_url(self, url: str, what: str = "desired.url:") -> None:
        """Raise Refused unless ``url`` is http(s) on one of the allowed origins; the message starts with
        ``what``."""
        shown = protocol.clip(url, 200)
        if not _URL_CHARS.fullmatch(url):
            raise Refused(f"{what} {shown!r} is not a plain http(s) URL")
        try:
            origin = parse_origin(url, what, path_ok=True)
        except ConfigError as e:
            raise Refused(str(e)) from None
        if origin not in self.origins:
            if not self.origins:
                raise Refused(f"{what} {shown}: no origin is allowed")
            if len(self.origins) == 1:
                raise Refused(f"{what} {shown} is not on the controller's origin {self.origins[0]}")
            raise Refused(f"{what} {shown} is not on the controller's origin {self.origins[0]} nor on "
                          f"bundle_origins {', '.join(self.origins[1:])}")


# RFC 3986's characters: no spaces, control characters or backslashes (which parsers disagree on)
_URL_CHARS = re.compile(r"[A-Za-z0-9\-._~:/?#\[\]@!$&'()*+,;=%]+")


def check_desired(desired: protocol.Desired, policy: Policy) -> None:
    """Raise Refused (naming the field) unless ``desired`` may be acted on: pure, reads and writes nothing."""
    try:
        protocol.check(desired)
    except protocol.ProtocolError as e:
        raise Refused(str(e)) from None
    if desired.size > policy.max_bundle_bytes:
        raise Refused(f"desired.size: {desired.size} bytes is more than max_bundle_bytes "
                      f"({policy.max_bundle_bytes})")
    policy.check_url(desired.url)


@dataclass
class _Probation:
    model: Loaded
    desired: object
    until: float  # time.monotonic()


def about(model: Loaded) -> SimpleNamespace:
    """The (deployment_id, sha256, version) an event names, for a loaded model."""
    return SimpleNamespace(deployment_id=model.deployment_id, sha256=model.sha, version=model.manifest.version)


class Updater:
    def __init__(self, store: ModelStore, engine: Engine, emit: Emit, limits: Limits | None = None,
                 retry_s: tuple[float, float] = (2.0, 300.0), *, policy: Policy, trust: TrustStore,
                 ledger: Ledger):
        self.store = store
        self.engine = engine
        self.trust = trust
        self.ledger = ledger
        self.emit = emit
        self.limits = limits or Limits()
        self.policy = policy
        self._retry_min, self._retry_max = retry_s
        self._want: protocol.Desired | None = None
        self._done: set[tuple[str, str]] = set()  # (deployment_id, sha) already applied, failed or rolled back
        self._probation: _Probation | None = None
        self._rollback_requested: str | None = None
        self._wake = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name="agent-updater", daemon=True)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        with self._wake:
            self._stopping = True
            self._wake.notify()
        if self._thread.is_alive():
            self._thread.join(timeout=10)

    def reconcile(self, desired: protocol.Desired) -> None:
        with self._wake:
            self._want = desired
            self._wake.notify()

    def request_rollback(self, reason: str) -> None:
        """Roll back to the previous model (the `rollback` command); done on the updater's thread."""
        with self._wake:
            self._rollback_requested = reason
            self._wake.notify()

    def _pending(self) -> bool:
        return self._want is not None and (self._want.deployment_id, self._want.sha256) not in self._done

    def _loop(self) -> None:
        delay = self._retry_min
        while True:
            with self._wake:
                while not (self._stopping or self._pending() or self._rollback_requested):
                    if self._probation is not None:
                        self._wake.wait(timeout=0.5)
                        break
                    self._wake.wait()
                if self._stopping:
                    return
                desired = self._want if self._pending() else None
                requested, self._rollback_requested = self._rollback_requested, None
            if requested:
                self._roll_back(requested, self.engine.current and about(self.engine.current))
            self._watch()
            if desired is None:
                continue
            try:
                self.apply(desired)
                self._done.add((desired.deployment_id, desired.sha256))
                delay = self._retry_min
            except DownloadError as e:  # the network: try again later, unless something newer came
                log.warning("%s; retrying in %.0f s", e, delay)
                with self._wake:
                    self._wake.wait_for(lambda: self._stopping or self._want is not desired, timeout=delay)
                delay = min(delay * 2, self._retry_max)
            except Exception as e:  # a bug, or a write refused where none was expected: never the thread's end
                log.exception("update to %s failed", desired.sha256[:12])
                self._done.add((desired.deployment_id, desired.sha256))
                try:
                    self.emit("failed", desired, f"{type(e).__name__}: {e}")
                except Exception:
                    log.exception("reporting the failure failed")

    # --- one update -------------------------------------------------------------------------------
    def apply(self, desired: protocol.Desired) -> None:
        try:
            check_desired(desired, self.policy)
        except Refused as e:
            log.error("refused a desired model: %s", e)
            self.emit("failed", protocol.named(desired), str(e))
            return
        self._collect(keep=desired.sha256)  # another bundle's partial download or unpack: not wanted any more
        current = self.engine.current
        if current is not None and current.sha == desired.sha256:
            if current.deployment_id != desired.deployment_id:
                self._record(desired.sha256, desired.deployment_id, reported=False)
                current.deployment_id = desired.deployment_id
                self.emit("active", desired, "already running this bundle")
                self._record(desired.sha256, desired.deployment_id, reported=True)
            return
        try:
            self.store.check_room(desired.sha256, desired.size, self.policy.min_free_bytes)
        except StorageError as e:
            log.error("refused %s: %s", desired.sha256[:12], e)
            self.store.discard(desired.sha256)  # a partial download of it, that it counted, goes too
            self.emit("failed", desired, f"refused: {e}")
            return
        root = self.store.root
        loaded = None
        try:
            self.emit("downloading", desired, "")
            self.store.download(desired.url, desired.sha256, desired.size,
                                on_block=lambda n: faults.point("downloading", root),
                                check_redirect=lambda url: self.policy.check_url(url, "desired.url redirects to"))
            faults.point("verifying", root)
            self.emit("verifying", desired, "")
            bundle = self.store.verify_download(desired.sha256, desired.size)
            self._check_bundle(bundle, desired)  # signed by a trusted key, no downgrade, every file matches
            self.store.check_room(desired.sha256, desired.size, self.policy.min_free_bytes)  # still, for the unpack
            model_dir = self.store.unpack(desired.sha256, bundle, on_member=lambda n: faults.point("unpacking", root))
            faults.point("loading", root)
            self.emit("activating", desired, "")
            manifest = self.store.manifest(model_dir)
            loaded = Loaded(desired.sha256, model_dir, manifest, desired.deployment_id)
            ms = loaded.smoke_test()
        except DownloadError as e:
            self.emit("failed", desired, str(e))
            raise
        except Exception as e:
            self._fail(desired, loaded, e)
            return
        try:
            self.store.switch(desired.sha256)
        except OSError as e:  # the state dir took no new link: the old model stays current and serving
            self._fail(desired, loaded, e, "switching")
            return
        faults.point("switching", root)
        self._record(desired.sha256, desired.deployment_id, reported=False)
        self.ledger.record_run(manifest.name, manifest.serial, desired.sha256)
        self.engine.swap(loaded)
        faults.point("reporting", root)
        log.info("active: %s %s (%s), smoke test %.1f ms", manifest.name, manifest.version, manifest.precision, ms)
        self.emit("active", desired, f"smoke test {ms:.1f} ms")
        self._record(desired.sha256, desired.deployment_id, reported=True)
        if self.limits.window_s > 0 and self.engine.previous is not None:
            self._probation = _Probation(loaded, desired, time.monotonic() + self.limits.window_s)
        self._collect()

    def _fail(self, desired: protocol.Desired, loaded: Loaded | None, e: Exception, doing: str = "") -> None:
        """An update that failed: nothing of it stays on disk, the controller hears why, the old model serves."""
        if isinstance(e, OSError) and storage.kind_of(e):
            reason = self.store.describe(e, doing or "updating")
        else:
            reason = str(e) if isinstance(e, EdgefleetError) else f"{type(e).__name__}: {e}"
        log.error("update to %s failed: %s", desired.sha256[:12], reason)
        if loaded is not None:
            loaded.close()
        self.store.discard(desired.sha256)
        self._collect()
        self.emit("failed", desired, reason)

    def _collect(self, keep: str | None = None) -> None:
        removed = self.store.collect(keep=keep)
        if removed:
            log.info("removed from the state dir: %s", ", ".join(removed))

    def _record(self, sha: str, deployment_id: str | None, reported: bool) -> None:
        """active.json; a state dir that refuses it costs only the deployment id after a restart."""
        try:
            self.store.record_active(sha, deployment_id, reported)
        except OSError as e:
            log.warning("cannot record the active deployment in %s: %s", self.store.root, e)

    def _check_bundle(self, bundle, desired: protocol.Desired) -> None:
        """After the tar's sha256: its manifest signed by a trusted release key, not a downgrade, then every
        file against the manifest, before anything is unpacked. Raises Untrusted naming why."""
        parsed = read_signed(bundle)
        key = self.trust.verify_manifest(parsed.manifest_bytes, parsed.sig)
        m = parsed.manifest
        why = self.ledger.downgrade(m.name, m.serial, desired.sha256, desired.rollback)
        if why:
            raise Untrusted(why)
        read_signed(bundle, check_files=True)
        log.info("bundle %s: %s %s serial %d, signed by release key %s (%s)", desired.sha256[:12], m.name,
                 m.version, m.serial, key.name, key.keyid)

    # --- probation ----------------------------------------------------------------------------------
    def _watch(self) -> None:
        """Judge the model on probation by what it has served; roll it back when it crosses a limit."""
        p = self._probation
        if p is None:
            return
        if p.model is not self.engine.current:
            self._probation = None
            return
        stats, lim = p.model.stats, self.limits
        total = stats.served + stats.errors
        if total >= lim.min_inferences:
            rate = stats.errors / total
            p95 = stats.p95()
            max_p95 = lim.max_p95_ms if lim.max_p95_ms is not None else p.model.manifest.latency_budget_ms
            why = None
            if rate > lim.max_error_rate:
                why = f"error rate {rate:.1%} > {lim.max_error_rate:.1%} over {total} inferences"
            elif max_p95 is not None and p95 is not None and p95 > max_p95:
                why = f"p95 latency {p95:.1f} ms > {max_p95:.1f} ms over {stats.served} inferences"
            if why:
                self._roll_back(f"{why} in its first {time.monotonic() - stats.since:.0f} s", p.desired)
                return
        if time.monotonic() > p.until:
            log.info("model %s passed its probation (%d inferences)", p.model.sha[:12], total)
            self._probation = None

    def _roll_back(self, reason: str, bad) -> None:
        previous = self.engine.previous
        if previous is None or bad is None:
            log.error("cannot roll back (%s): no previous model is loaded", reason)
            return
        try:
            self.store.switch(previous.sha)
        except OSError as e:  # served from memory all the same; the restart after would load the bad one again
            log.error("rolling back: the state dir took no new link (%s); back on the previous model until the "
                      "agent restarts", e)
            reason += f"; the state dir did not take the switch ({e.strerror or e})"
        self._record(previous.sha, previous.deployment_id, reported=True)
        self.engine.rollback()
        self._probation = None
        if getattr(bad, "deployment_id", None):
            self._done.add((bad.deployment_id, bad.sha256))  # do not re-apply what was rolled back
        log.warning("rolled back to %s: %s", previous.sha[:12], reason)
        self.emit("rolled_back", bad, f"{reason}; back on {previous.manifest.version} ({previous.sha[:12]})")
