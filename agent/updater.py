"""Reconcile toward the desired model: download, verify, unpack, load, smoke-test, switch, report.

Runs on its own thread and always works on the newest desired state, so a repeated or superseded
message is harmless. Any failure leaves the previous model serving and reports why.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from agent import protocol
from agent.engine import Engine, Loaded
from agent.errors import EdgefleetError
from agent.store import DownloadError, ModelStore

log = logging.getLogger("edgefleet.agent.updater")

# emit(kind, desired, reason)
Emit = Callable[[str, protocol.Desired, str], None]


class Updater:
    def __init__(self, store: ModelStore, engine: Engine, emit: Emit, retry_s: tuple[float, float] = (2.0, 300.0)):
        self.store = store
        self.engine = engine
        self.emit = emit
        self._retry_min, self._retry_max = retry_s
        self._want: protocol.Desired | None = None
        self._done: set[tuple[str, str]] = set()  # (deployment_id, sha) already applied or failed
        self._wake = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name="agent-updater", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        with self._wake:
            self._stopping = True
            self._wake.notify()
        self._thread.join(timeout=10)

    def reconcile(self, desired: protocol.Desired) -> None:
        with self._wake:
            self._want = desired
            self._wake.notify()

    def _loop(self) -> None:
        delay = self._retry_min
        while True:
            with self._wake:
                while not self._stopping and (
                    self._want is None or (self._want.deployment_id, self._want.sha256) in self._done
                ):
                    self._wake.wait()
                if self._stopping:
                    return
                desired = self._want
            try:
                self.apply(desired)
                self._done.add((desired.deployment_id, desired.sha256))
                delay = self._retry_min
            except DownloadError as e:  # the network: try again later, unless something newer came
                log.warning("%s; retrying in %.0f s", e, delay)
                with self._wake:
                    self._wake.wait_for(lambda: self._stopping or self._want is not desired, timeout=delay)
                delay = min(delay * 2, self._retry_max)

    def apply(self, desired: protocol.Desired) -> None:
        current = self.engine.current
        if current is not None and current.sha == desired.sha256:
            if current.deployment_id != desired.deployment_id:
                self.store.activate(desired.sha256, desired.deployment_id)
                current.deployment_id = desired.deployment_id
                self.emit("active", desired, "already running this bundle")
            return
        loaded = None
        try:
            self.emit("downloading", desired, "")
            bundle = self.store.download(desired.url, desired.sha256, desired.size)
            self.emit("verifying", desired, "")
            model_dir = self.store.unpack(desired.sha256, bundle)
            self.emit("activating", desired, "")
            manifest = self.store.manifest(model_dir)
            loaded = Loaded(desired.sha256, model_dir, manifest, desired.deployment_id)
            ms = loaded.smoke_test()
            self.store.activate(desired.sha256, desired.deployment_id)
            self.engine.swap(loaded)
            self.store.prune()
        except DownloadError as e:
            self.emit("failed", desired, str(e))
            raise
        except Exception as e:
            reason = str(e) if isinstance(e, EdgefleetError) else f"{type(e).__name__}: {e}"
            log.error("update to %s failed: %s", desired.sha256[:12], reason)
            if loaded is not None:
                loaded.close()
            self.store.discard(desired.sha256)
            self.emit("failed", desired, reason)
            return
        log.info("active: %s %s (%s), smoke test %.1f ms", manifest.name, manifest.version, manifest.precision, ms)
        self.emit("active", desired, f"smoke test {ms:.1f} ms")
