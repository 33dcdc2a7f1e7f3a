"""One leader among the controller's workers: the one that runs the fleet's singletons.

Several workers (``fleet serve --worker NAME``) share one PostgreSQL store and split the devices' traffic between
them, but some work must run exactly once: the rollout driver, the offline sweep, retention, the re-signing of
desireds, and recording the devices' states (fleet/link.py ``follow_states``: one worker records them in the
broker's order). The store elects: a PostgreSQL advisory lock held on a connection of its own (``store.try_leader()``), so
the lock goes with its holder when that process dies or loses the database (PostgreSQL ends the session), and
another worker, trying every ``every_s``, takes it over within seconds. Every round calls
``store.try_leader``, which for the holder checks that its lock's session still answers, so a holder that lost
the database stops its singletons at once (the server, through TCP keepalives, ends such a session within
seconds and frees the lock). On SQLite there is one
controller (the data directory's lock says so), and it is always the leader.

What the leader runs keeps its state in the store (a rollout is persisted at every step with the publishes it asked
for), so the next leader carries on from there.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

log = logging.getLogger("edgefleet.fleet.leader")

EVERY_S = 1.0
LOCK = "edgefleet-leader"  # the advisory lock's name: one leader per database, whatever the workers are called


class Leadership:
    """Try for the store's leader lock every ``every_s``; ``on_elected()`` when taken, ``on_deposed()`` when lost
    (and at ``stop()`` while leading). Both run on this class's thread, one at a time."""

    def __init__(self, store, name: str, on_elected: Callable[[], None], on_deposed: Callable[[], None],
                 every_s: float = EVERY_S) -> None:
        self.store = store
        self.name = name
        self.on_elected = on_elected
        self.on_deposed = on_deposed
        self.every_s = every_s
        self.leading = False
        self.terms = 0  # how many times this worker became the leader
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._failing = False

    def start(self) -> "Leadership":
        if self._thread is None:
            self._stop.clear()
            self._round()  # a lone controller leads from its first moment (its start waits for this)
            self._thread = threading.Thread(target=self._run, name="edgefleet-leader", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(30)
            self._thread = None
        if self.leading:
            self._depose("stopping")
        try:
            self.store.release_leader()
        except Exception:  # the store may be gone already; its session's end releases the lock anyway
            pass

    def _run(self) -> None:
        while not self._stop.wait(self.every_s):
            self._round()

    def _round(self) -> None:
        try:
            if self.leading:
                if not self.store.try_leader(LOCK):
                    self._depose("lost the leader lock (the store's session ended)")
                self._failing = False
                return
            if self.store.try_leader(LOCK):
                self.leading = True
                self.terms += 1
                log.info("worker %s is the leader: it runs rollouts, the offline sweep and retention", self.name)
                self.on_elected()
            self._failing = False
        except Exception as e:  # the store unreachable: not the leader until it answers again
            if self.leading:
                self._depose(f"the store failed: {type(e).__name__}: {e}")
            if not self._failing:
                log.error("leader election: %s: %s (logged once until it succeeds)", type(e).__name__, e)
                self._failing = True

    def _depose(self, why: str) -> None:
        self.leading = False
        log.warning("worker %s is no longer the leader: %s", self.name, why)
        try:
            self.on_deposed()
        except Exception as e:
            log.error("stopping the leader's work failed: %s: %s", type(e).__name__, e)
