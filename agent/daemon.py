"""``Agent``: the one object the CLI, the tests and the demo build to run a device."""

from __future__ import annotations

import itertools
import logging
import platform
import signal
import threading
import time
import uuid
from types import SimpleNamespace

from agent import __version__, protocol, runtimes
from agent.api import InferenceServer
from agent.config import AgentConfig
from agent.engine import Engine, Loaded
from agent.link import Link
from agent.metrics import Resources
from agent.store import ModelStore
from agent.updater import Limits, Updater, about

log = logging.getLogger("edgefleet.agent")

# CPU features that decide which bundle variant runs well here
_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8", "amx_bf16", "asimddp", "i8mm", "sve")


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
    def __init__(self, config: AgentConfig) -> None:
        self.config = config
        self.boot_id = uuid.uuid4().hex[:16]  # new every start: (boot_id, seq) names a message
        self._seq = itertools.count(1)
        self._seq_lock = threading.Lock()
        self._stop = threading.Event()
        self.store = ModelStore(config.state_dir)
        self.engine = Engine()
        self.updater = Updater(self.store, self.engine, self._emit, Limits(
            window_s=config.rollback_window_s, min_inferences=config.rollback_min_inferences,
            max_error_rate=config.rollback_max_error_rate, max_p95_ms=config.rollback_max_p95_ms))
        self._recovered: list[tuple[str, object, str]] = []  # events found owed at start, sent once linked
        self.api: InferenceServer | None = None
        self.link: Link | None = None
        self._resources: Resources | None = None
        self._telemetry = threading.Thread(target=self._telemetry_loop, name="agent-telemetry", daemon=True)

    # --- lifecycle -------------------------------------------------------------------------------
    def start(self) -> None:
        self.store.open()
        self._load_current()
        self._resources = Resources(str(self.store.root))
        self.api = InferenceServer(self.config.api, self.engine, self.status)
        self.api.start()
        self.link = Link(
            self.config.device_id, self.config.broker_host_port, keepalive=self.config.keepalive_s,
            birth=self._birth, on_desired=self.updater.reconcile, on_cmd=self._on_cmd,
        )
        try:
            self.link.start()
        except BaseException:
            self.api.stop()
            raise
        for kind, what, reason in self._recovered:
            self._emit(kind, what, reason)
            if kind == "active":  # queued on disk now: no longer owed
                self.store.record_active(what.sha256, what.deployment_id, reported=True)
        self._recovered.clear()
        self.updater.start()
        self._telemetry.start()
        log.info("agent %s running: api %s, broker %s", self.config.device_id, self.api.address, self.config.broker)

    def run(self) -> None:
        """Start, then serve until SIGTERM or SIGINT."""
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: self._stop.set())
        self.start()
        try:
            while not self._stop.wait(1.0):
                pass
        finally:
            self.stop()

    def stop(self) -> None:
        self._stop.set()
        self.updater.stop()
        if self._telemetry.is_alive():
            self._telemetry.join(timeout=5)
        if self.link:
            self.link.stop()
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
            if name == "previous":
                bad = self.store.current()
                self.store.switch(sha)
                self.store.record_active(sha, dep, reported=True)
                if bad:
                    self._recovered.append(("rolled_back", SimpleNamespace(
                        deployment_id=None, sha256=bad[0], version=None),
                        f"the current model {bad[0][:12]} no longer loads; back on {sha[:12]}"))
            elif info.get("sha256") == sha and info.get("reported") is False:
                self._recovered.append(("active", about(loaded), "switched before a restart, reported now"))
            return

    # --- messages ---------------------------------------------------------------------------------
    def _next_seq(self) -> int:
        with self._seq_lock:
            return next(self._seq)

    def _active(self) -> protocol.ActiveModel | None:
        cur = self.engine.current
        if cur is None:
            return None
        m = cur.manifest
        return protocol.ActiveModel(name=m.name, version=m.version, sha256=cur.sha, runtime=m.runtime,
                                    precision=m.precision, deployment_id=cur.deployment_id)

    def _birth(self) -> protocol.State:
        return protocol.State(
            device_id=self.config.device_id, online=True, time=protocol.now(), boot_id=self.boot_id,
            agent_version=__version__, arch=platform.machine(), cpu_flags=cpu_flags(),
            runtimes=runtimes.available(), active=self._active(),
        )

    def _emit(self, kind: str, desired: protocol.Desired, reason: str) -> None:
        event = protocol.Event(
            device_id=self.config.device_id, boot_id=self.boot_id, seq=self._next_seq(), time=protocol.now(),
            kind=kind, deployment_id=desired.deployment_id, sha256=desired.sha256, version=desired.version,
            reason=reason,
        )
        self.link.publish(protocol.EVENTS, event)
        if kind in ("active", "rolled_back"):
            self.link.publish_state()

    def _on_cmd(self, cmd: protocol.Cmd) -> None:
        if cmd.kind == "report":
            self.publish_telemetry()
        elif cmd.kind == "ping":
            self.link.publish_state()
        elif cmd.kind == "rollback":
            self.updater.request_rollback(f"rollback command {cmd.id}")

    def telemetry(self) -> protocol.Telemetry:
        count, errors, latency, hist = self.engine.window.snapshot()
        return protocol.Telemetry(
            device_id=self.config.device_id, boot_id=self.boot_id, seq=self._next_seq(), time=protocol.now(),
            interval_s=self.config.telemetry_interval_s, inferences=count, errors=errors, latency_ms=latency,
            histogram=hist, active=self._active(), **self._resources.sample(),
        )

    def publish_telemetry(self) -> None:
        self.link.publish(protocol.TELEMETRY, self.telemetry())

    def _telemetry_loop(self) -> None:
        interval = self.config.telemetry_interval_s
        next_at = time.monotonic() + interval
        while not self._stop.wait(max(0.0, next_at - time.monotonic())):
            next_at += interval
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
            "active": None if cur is None else {
                "name": cur.manifest.name, "version": cur.manifest.version, "sha256": cur.sha,
                "precision": cur.manifest.precision, "runtime": cur.manifest.runtime,
                "deployment_id": cur.deployment_id,
                "inputs": [{"name": s.name, "shape": s.shape, "dtype": s.dtype} for s in cur.manifest.inputs],
                "outputs": [{"name": s.name, "shape": s.shape, "dtype": s.dtype} for s in cur.manifest.outputs],
            },
            "inferences": self.engine.window.total,
        }
