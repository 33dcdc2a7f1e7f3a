"""Rollouts in the controller: their table in the store, and the driver that advances them.

The driver is one background thread. About every second it takes each running or paused rollout, gathers
what the store knows of its devices (the phase each reported in its wave's deployment; once it is active, its
telemetry and quality windows on the new bundle since its wave was published; its p95 on the model being
replaced), calls ``fleet.rollout.step`` and carries out what it returns. Each wave is a deployment
(``<rollout>-w<N>``) and each group sent back is one (``<rollout>-rb<N>``), so device events land in
``deployment_devices`` as for any deployment, and the desired model, retained by the broker, reaches devices that
are offline when they return.

Every step is persisted (the rollout as JSON) together with the publishes it asked for, before they are
made; a publish leaves that outbox only once the broker acknowledged it. So a controller that stops or
crashes mid-rollout resumes where it was when it starts again, re-publishing (harmlessly: desired is
idempotent) what it may not have finished.
"""

from __future__ import annotations

import json
import logging
import secrets
import threading
import time
from typing import Any, Callable

from agent import protocol
from agent.errors import EdgefleetError
from fleet import health, quality
from fleet import rollout as machine
from fleet.rollout import Halt, Observation, Publish, Rollback, RolloutError
from fleet.store import Store

log = logging.getLogger("edgefleet.fleet.rollouts")

BASELINE_S = 3600.0  # the previous model's p95 is taken over the windows of the hour before the wave
BASELINE_LABELS_S = 7 * 86400.0  # and its feedback accuracy over the labels of the week before (labels are rarer)
INTERVAL_S = 1.0
# Several controller workers share one PostgreSQL store: only the leader runs the driver, but any worker's API
# creates and acts on rollouts. Each change (load, step, save, publish) holds this lock across processes, as
# ``_lock`` does across threads, so no two processes read-modify-write one rollout at once.
EXCLUSIVE = "edgefleet-rollouts"



def new_rollout_id() -> str:
    return f"ro-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}-{secrets.token_hex(3)}"


class Rollouts:
    """Create, show and act on rollouts; ``start()`` runs the driver thread. Safe to call from any thread."""

    def __init__(self, store: Store, link: Any, public_url: Callable[[], str], interval_s: float = INTERVAL_S,
                 clock: Callable[[], float] = time.time) -> None:
        self.store = store
        self.link = link
        self.public_url = public_url
        self.interval_s = interval_s
        self.clock = clock
        self._lock = threading.RLock()  # one rollout change at a time: the driver's and the API's (and EXCLUSIVE:
        # other processes')
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- lifecycle -----------------------------------------------------------------------------------
    def open(self) -> "Rollouts":
        """Nothing to make: the ``rollouts`` table is the store's (fleet/store/schema.py, schema 9)."""
        return self

    def start(self) -> "Rollouts":
        """Start advancing rollouts (resuming any left running)."""
        self.open()
        if self._thread is None:
            self._stop.clear()
            self._thread = threading.Thread(target=self._loop, name="edgefleet-rollouts", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(30)
            self._thread = None

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.tick()
            except Exception:  # a bad moment (the broker away, the database busy) must not end the driver
                log.exception("advancing rollouts failed; trying again")
            self._stop.wait(self.interval_s)

    # -- what the API does ---------------------------------------------------------------------------
    def create(self, bundle: str, targets: list[str], **opts: Any) -> dict[str, Any]:
        """Validate, plan and start a rollout (its first wave is published before this returns); the answer
        carries ``warnings`` (``fleet.health.disk_warnings``) about its targets."""
        options = machine.options(**opts)
        if not isinstance(bundle, str) or self.store.bundle(bundle) is None:
            raise RolloutError(f"unknown bundle {bundle!r}: upload it first", 404)
        devices = resolve_targets(self.store, targets)
        with self._lock, self.store.exclusive(EXCLUSIVE):
            busy = self._busy(devices)
            if busy:
                (device, rid), more = busy[0], len(busy) - 1
                raise RolloutError(f"{device}{f' (and {more} more)' if more else ''} is in rollout {rid}, which "
                                   f"is still going: pause, abort or roll it back first", 409)
            r = machine.new(new_rollout_id(), bundle, targets, devices, options, self.clock())
            self._save(r, [], created=True)
            self._advance(r.id)
            return {**self.get(r.id),
                    "warnings": health.disk_warnings(self.store, devices, self.store.bundle(bundle), self.clock())}

    def act(self, rollout_id: str, action: str) -> dict[str, Any]:
        with self._lock, self.store.exclusive(EXCLUSIVE):
            r, outbox = self._load(rollout_id)
            r, actions = machine.act(r, action, self.clock())
            log.info("rollout %s: %s", rollout_id, action)
            outbox += [a for a in actions if isinstance(a, Publish)]
            self._save(r, outbox)
            self._flush(r, outbox)
            return self.get(rollout_id)

    def get(self, rollout_id: str) -> dict[str, Any]:
        r, outbox = self._load(rollout_id)
        return self._view(r, outbox)

    def list(self) -> list[dict[str, Any]]:
        rows = self.store.rollout_rows()
        out = []
        for row in rows:
            v = self._view(machine.load(json.loads(row["doc"])), machine.load_actions(json.loads(row["outbox"])))
            phases: dict[str, int] = {}
            for w in v["waves"]:
                for d in w["devices"]:
                    phases[d["phase"]] = phases.get(d["phase"], 0) + 1
            out.append({k: v[k] for k in ("id", "status", "reason", "created", "finished", "bundle", "targets",
                                          "current_wave", "wave_count", "device_count", "unpublished")}
                       | {"phases": phases})
        return out

    # -- the driver ----------------------------------------------------------------------------------
    def tick(self) -> None:
        """Advance every running or paused rollout once."""
        with self._lock, self.store.exclusive(EXCLUSIVE):
            ids = self.store.rollouts_to_drive(machine.LIVE)
            for rid in ids:
                try:
                    self._advance(rid)
                except Exception:
                    log.exception("rollout %s: could not advance it; trying again", rid)

    def _advance(self, rid: str) -> None:
        r, outbox = self._load(rid)
        outbox = self._flush(r, outbox)  # what an earlier step asked for and the broker has not taken yet
        if r.status not in machine.LIVE:
            return
        now = self.clock()
        new, actions = machine.step(r, self._observe(r), now)
        for a in actions:
            if isinstance(a, Halt):
                log.warning("rollout %s halted: %s", rid, a.reason)
            elif isinstance(a, Rollback):
                log.warning("rollout %s: sending %s back to %s", rid, ", ".join(a.devices), a.sha256[:12])
            else:
                log.info("rollout %s: publishing %s to %s", rid, a.sha256[:12], ", ".join(a.devices))
        if new.status == machine.COMPLETED and r.status != machine.COMPLETED:
            log.info("rollout %s completed", rid)
        if new == r:
            return
        outbox += [a for a in actions if isinstance(a, Publish)]
        self._save(new, outbox)
        self._flush(new, outbox)

    def _flush(self, r: machine.Rollout, outbox: list[Publish]) -> list[Publish]:
        """Make the deployments and publish the desired models in ``outbox``; keep what failed for later."""
        if not outbox:
            return outbox
        left: list[Publish] = []
        for a in outbox:
            bundle = self.store.bundle(a.sha256)
            if bundle is None:  # cannot happen unless someone deleted it from the database
                log.error("rollout %s: bundle %s is gone; not publishing it to %s", r.id, a.sha256,
                          ", ".join(a.devices))
                continue
            if self.store.deployment(a.deployment_id) is None:
                self.store.add_deployment(a.deployment_id, a.sha256, a.devices)
            desired = protocol.Desired(
                deployment_id=a.deployment_id, name=bundle["name"], version=bundle["version"],
                url=f"{self.public_url().rstrip('/')}/bundles/{a.sha256}", sha256=a.sha256, size=bundle["size"],
                settings={}, time=self.clock(), rollback=isinstance(a, Rollback))  # signed as a rollback
            failed = []
            for device in a.devices:
                try:
                    self.link.publish_desired(device, desired)
                except EdgefleetError as e:
                    log.warning("rollout %s: %s; will try again", r.id, e)
                    failed.append(device)
            if failed:
                left.append(type(a)(a.deployment_id, a.sha256, failed))
        self._set_outbox(r.id, left)
        return left

    def _observe(self, r: machine.Rollout) -> dict[str, Observation]:
        """What the store knows of the rollout's devices, for one step."""
        devices = {d["id"]: d for d in self.store.devices()}
        phases = {}
        started = [w for w in r.waves if w.started is not None]
        if started:
            phases = {(row["deployment_id"], row["device_id"]): row
                      for row in self.store.deployment_phases([w.deployment_id for w in started])}
        known: dict[str, bool] = {}
        out = {}
        for did, dev in r.devices.items():
            row = devices.get(did) or {}
            sha = row.get("active_sha256")
            if sha and sha not in known:
                known[sha] = self.store.bundle(sha) is not None
            o = Observation(active_sha=sha, active_known=bool(sha and known[sha]), online=bool(row.get("online")))
            wave = r.waves[dev.wave]
            p = phases.get((wave.deployment_id, did))
            if wave.started is not None and p is not None and p["phase"] != machine.PENDING:
                o.phase, o.since, o.reason = p["phase"], p["updated"], p["reason"]
                if dev.active_since is not None or p["phase"] == machine.ACTIVE:
                    # its windows on the new bundle from the wave's start, not from ``active``: the window of the
                    # canary run at activation, or of the first inferences, may end before the ``active`` event is
                    # stored (and the device served nothing on the new bundle before it was active)
                    o.health = self._health(did, r.bundle, wave.started, None)
                    self._quality(o.health, did, r.bundle, wave.started, None)
            if (wave.started is not None and dev.previous and dev.baseline_p95_ms is None
                    and r.options.max_p95_regression is not None):
                o.baseline = self._health(did, dev.previous, wave.started - BASELINE_S, wave.started)
            if (wave.started is not None and dev.previous and dev.baseline_labels is None
                    and r.options.max_accuracy_drop is not None):
                o.baseline = o.baseline or machine.Health()
                self._quality(o.baseline, did, dev.previous, wave.started - BASELINE_LABELS_S, wave.started)
            out[did] = o
        return out

    def _health(self, device_id: str, sha: str, since: float, until: float | None) -> machine.Health:
        """A device's figures on one model over its windows that ended in [since, until), on the controller's
        time line (a window's ``time`` is corrected for the device's clock: fleet.clock)."""
        n, e, p95 = self.store.model_health(device_id, sha, since, until)
        return machine.Health(inferences=n, errors=e, p95_ms=None if p95 is None else round(p95, 3))

    def _quality(self, h: machine.Health, device_id: str, sha: str, since: float, until: float | None) -> None:
        """Fill ``h``'s quality figures: the device's quality windows on one model in [since, until)
        (fleet/quality.py: drift against the bundle's reference, canary, feedback accuracy)."""
        until = until if until is not None else max(time.time(), since) + 1.0
        q = quality.device(self.store, device_id, since, until, sha256=sha, fleet=False)  # the gates need no fleet
        if q is None or q["sha256"] != sha:
            return
        ref = (q["drift"] or {}).get("reference") or {}
        fb = q["feedback"] or {}
        h.served, h.drift_psi, h.drift_p = q["served"], ref.get("psi"), ref.get("p")
        h.canary_runs, h.canary_agree = q["canary"]["runs"], q["canary"]["agree"]
        h.labels = fb.get("scored") or 0
        h.correct = round(fb["accuracy"] * h.labels) if h.labels else 0

    # -- persistence ---------------------------------------------------------------------------------
    def _load(self, rid: str) -> tuple[machine.Rollout, list[Publish]]:
        row = self.store.rollout_row(rid)
        if row is None:
            raise RolloutError(f"unknown rollout {rid!r}", 404)
        return machine.load(json.loads(row["doc"])), machine.load_actions(json.loads(row["outbox"]))

    def _save(self, r: machine.Rollout, outbox: list[Publish], created: bool = False) -> None:
        doc, box = json.dumps(machine.dump(r)), json.dumps(machine.dump_actions(outbox))
        self.store.save_rollout(r.id, r.created, self.clock(), r.status, doc, box, new=created)

    def _set_outbox(self, rid: str, outbox: list[Publish]) -> None:
        self.store.set_rollout_outbox(rid, json.dumps(machine.dump_actions(outbox)))

    def _busy(self, devices: list[str]) -> list[tuple[str, str]]:
        """(device, rollout) for each of ``devices`` in a rollout still running or paused."""
        wanted, out = set(devices), []
        for row in self.store.rollout_rows(machine.LIVE):
            r = machine.load(json.loads(row["doc"]))
            out += [(d, r.id) for d in sorted(wanted & set(r.devices))]
        return out

    def _view(self, r: machine.Rollout, outbox: list[Publish]) -> dict[str, Any]:
        v = machine.view(r, self.clock())
        b = self.store.bundle(r.bundle)
        v["bundle"] = {"sha256": r.bundle, "name": b and b["name"], "version": b and b["version"]}
        back = {d.rollback_deployment for d in r.devices.values() if d.rollback_deployment}
        phases = {}
        if back:
            phases = {(row["deployment_id"], row["device_id"]): row["phase"]
                      for row in self.store.deployment_phases(sorted(back))}
        versions: dict[str, str | None] = {}
        for w in v["waves"]:
            for d in w["devices"]:
                rb = d["rollback"]
                if rb and rb["deployment_id"]:
                    rb["phase"] = phases.get((rb["deployment_id"], d["device_id"]))
                if rb and rb["sha256"]:
                    if rb["sha256"] not in versions:
                        versions[rb["sha256"]] = (self.store.bundle(rb["sha256"]) or {}).get("version")
                    rb["version"] = versions[rb["sha256"]]
        v["unpublished"] = sorted({d for a in outbox for d in a.devices})  # the broker has not taken these yet
        return v


# -- targets ---------------------------------------------------------------------------------------------------


def resolve_targets(store: Store, targets: list[str]) -> list[str]:
    """Device ids, ``tag:NAME`` or ``all`` -> registered device ids (fleet.targets, the store's tags)."""
    from fleet import targets as t

    try:
        return t.resolve(store, targets)
    except t.TargetError as e:
        raise RolloutError(str(e), e.status) from None
