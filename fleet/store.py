"""The registry: one SQLite file (WAL) holding devices, telemetry, events, bundles and deployments.

Paho's network thread writes what devices report while uvicorn's threads read and write for the API,
so every call goes through one connection guarded by a lock. A QoS 1 message may arrive twice: telemetry
and events are keyed by (device_id, boot_id, seq) and a repeat changes nothing but the device's
``duplicates`` count.

seq is per device and persistent across the agent's restarts (its outbox keeps it; telemetry and events
share it), so what never arrived shows as gaps: ``seq_gaps`` = the highest seq received from the device
minus the number of distinct seqs received (any boot_id; seqs >= 1). A seq that arrives late closes its
gap. The counters live on the device row, kept as messages are stored, so health never scans telemetry.
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from agent import protocol
from agent.errors import EdgefleetError

SCHEMA_VERSION = 2
DEFAULT_INTERVAL_S = 10.0
OFFLINE_AFTER_INTERVALS = 3
PHASES = {"downloading", "verifying", "activating", "active", "failed", "rolled_back"}

_SCHEMA = """
CREATE TABLE schema_version (version INTEGER NOT NULL);
CREATE TABLE devices (
    id TEXT PRIMARY KEY,
    first_seen REAL NOT NULL,
    last_seen REAL NOT NULL,
    online INTEGER NOT NULL DEFAULT 1,
    state_time REAL,
    boot_id TEXT NOT NULL DEFAULT '',
    agent_version TEXT NOT NULL DEFAULT '',
    arch TEXT NOT NULL DEFAULT '',
    cpu_flags TEXT NOT NULL DEFAULT '[]',
    runtimes TEXT NOT NULL DEFAULT '[]',
    active_name TEXT, active_version TEXT, active_sha256 TEXT,
    active_runtime TEXT, active_precision TEXT, active_deployment_id TEXT,
    interval_s REAL,
    inferences INTEGER NOT NULL DEFAULT 0,
    errors INTEGER NOT NULL DEFAULT 0,
    seq_max INTEGER NOT NULL DEFAULT 0,
    seq_count INTEGER NOT NULL DEFAULT 0,
    duplicates INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE telemetry (
    id INTEGER PRIMARY KEY,
    device_id TEXT NOT NULL REFERENCES devices(id),
    boot_id TEXT NOT NULL,
    seq INTEGER NOT NULL,
    time REAL NOT NULL,
    received REAL NOT NULL,
    interval_s REAL NOT NULL,
    inferences INTEGER NOT NULL,
    errors INTEGER NOT NULL,
    p50 REAL, p95 REAL, p99 REAL,
    cpu_percent REAL, rss_bytes INTEGER, memory_percent REAL, temperature_c REAL,
    payload TEXT NOT NULL,
    UNIQUE (device_id, boot_id, seq)
);
CREATE INDEX telemetry_device_time ON telemetry (device_id, time);
CREATE INDEX telemetry_device_seq ON telemetry (device_id, seq);
CREATE TABLE events (
    id INTEGER PRIMARY KEY,
    device_id TEXT NOT NULL REFERENCES devices(id),
    boot_id TEXT NOT NULL,
    seq INTEGER NOT NULL,
    time REAL NOT NULL,
    received REAL NOT NULL,
    kind TEXT NOT NULL,
    deployment_id TEXT,
    sha256 TEXT,
    version TEXT,
    reason TEXT NOT NULL DEFAULT '',
    UNIQUE (device_id, boot_id, seq)
);
CREATE INDEX events_device_time ON events (device_id, time);
CREATE INDEX events_device_seq ON events (device_id, seq);
CREATE TABLE bundles (
    sha256 TEXT PRIMARY KEY,
    size INTEGER NOT NULL,
    name TEXT NOT NULL,
    version TEXT NOT NULL,
    target TEXT NOT NULL,
    runtime TEXT NOT NULL,
    precision TEXT NOT NULL,
    manifest TEXT NOT NULL,
    uploaded REAL NOT NULL
);
CREATE TABLE deployments (
    id TEXT PRIMARY KEY,
    bundle_sha256 TEXT NOT NULL REFERENCES bundles(sha256),
    created REAL NOT NULL,
    targets TEXT NOT NULL
);
CREATE TABLE deployment_devices (
    deployment_id TEXT NOT NULL REFERENCES deployments(id),
    device_id TEXT NOT NULL,
    phase TEXT NOT NULL,
    reason TEXT NOT NULL DEFAULT '',
    updated REAL NOT NULL,
    event_time REAL,
    PRIMARY KEY (deployment_id, device_id)
);
"""
_V1_TO_V2 = """
ALTER TABLE devices ADD COLUMN seq_max INTEGER NOT NULL DEFAULT 0;
ALTER TABLE devices ADD COLUMN seq_count INTEGER NOT NULL DEFAULT 0;
ALTER TABLE devices ADD COLUMN duplicates INTEGER NOT NULL DEFAULT 0;
CREATE INDEX telemetry_device_seq ON telemetry (device_id, seq);
CREATE INDEX events_device_seq ON events (device_id, seq);
UPDATE devices SET
    seq_max = coalesce((SELECT max(seq) FROM (SELECT seq FROM telemetry WHERE device_id = devices.id
                        UNION SELECT seq FROM events WHERE device_id = devices.id)), 0),
    seq_count = (SELECT count(*) FROM (SELECT seq FROM telemetry WHERE device_id = devices.id AND seq > 0
                 UNION SELECT seq FROM events WHERE device_id = devices.id AND seq > 0));
UPDATE schema_version SET version = 2
"""


class Store:
    """The controller's SQLite registry at ``path``; safe to call from any thread."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._lock = threading.RLock()
        self._db: sqlite3.Connection | None = None

    # -- lifecycle -----------------------------------------------------------------------------
    def open(self) -> "Store":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None, timeout=30)
            db.row_factory = sqlite3.Row
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
            db.execute("PRAGMA foreign_keys=ON")
            self._db = db
            self._migrate()
        except BaseException as e:
            self.close()
            if isinstance(e, sqlite3.DatabaseError):
                raise EdgefleetError(f"cannot open the fleet database {self.path}: {e}") from None
            raise
        return self

    def close(self) -> None:
        with self._lock:
            if self._db is not None:
                self._db.close()
                self._db = None

    def _migrate(self) -> None:
        with self._tx() as db:
            has = db.execute("SELECT 1 FROM sqlite_master WHERE name = 'schema_version'").fetchone()
            if not has:
                for stmt in filter(str.strip, _SCHEMA.split(";")):
                    db.execute(stmt)
                db.execute("INSERT INTO schema_version VALUES (?)", (SCHEMA_VERSION,))
                return
            version = db.execute("SELECT version FROM schema_version").fetchone()[0]
            if version == 1:  # v2: per-device seq accounting
                for stmt in filter(str.strip, _V1_TO_V2.split(";")):
                    db.execute(stmt)
                version = SCHEMA_VERSION
            if version != SCHEMA_VERSION:
                raise EdgefleetError(f"{self.path} has schema version {version}; this edgefleet "
                                     f"understands {SCHEMA_VERSION}")

    def _conn(self) -> sqlite3.Connection:
        if self._db is None:
            raise EdgefleetError("the fleet database is closed")
        return self._db

    @contextlib.contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        """One write transaction, under the lock."""
        with self._lock:
            db = self._conn()
            db.execute("BEGIN IMMEDIATE")
            try:
                yield db
            except BaseException:
                db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")

    def _query(self, sql: str, args: tuple = ()) -> list[sqlite3.Row]:
        with self._lock:
            return self._conn().execute(sql, args).fetchall()

    # -- what devices report --------------------------------------------------------------------
    def _touch(self, db: sqlite3.Connection, device_id: str, seen: float) -> None:
        """Register a device on the first message of any kind; move last_seen forward."""
        db.execute("INSERT INTO devices (id, first_seen, last_seen) VALUES (?, ?, ?) "
                   "ON CONFLICT (id) DO UPDATE SET last_seen = max(last_seen, excluded.last_seen)",
                   (device_id, seen, seen))

    @staticmethod
    def _seen(received: float, sent: float, retained: bool) -> float:
        # A retained message replayed on subscribe is old news: it shows the device no later than it was sent.
        return min(received, sent) if retained else received

    def record_state(self, msg: protocol.State, received: float, retained: bool = False) -> None:
        a = msg.active
        with self._tx() as db:
            self._touch(db, msg.device_id, self._seen(received, msg.time, retained))
            db.execute(
                "UPDATE devices SET online = ?, state_time = ?, boot_id = ?, agent_version = ?, arch = ?, "
                "cpu_flags = ?, runtimes = ?, active_name = ?, active_version = ?, active_sha256 = ?, "
                "active_runtime = ?, active_precision = ?, active_deployment_id = ? WHERE id = ?",
                (int(msg.online), msg.time, msg.boot_id, msg.agent_version, msg.arch,
                 json.dumps(msg.cpu_flags), json.dumps(msg.runtimes),
                 a and a.name, a and a.version, a and a.sha256, a and a.runtime, a and a.precision,
                 a and a.deployment_id, msg.device_id))

    @staticmethod
    def _count_seq(db: sqlite3.Connection, device_id: str, seq: int, stored: bool) -> bool:
        """Keep the device's seq accounting after one telemetry/event insert; returns ``stored``."""
        if not stored:  # the same (boot_id, seq) again: a redelivery
            db.execute("UPDATE devices SET duplicates = duplicates + 1 WHERE id = ?", (device_id,))
            return False
        if seq > 0:
            # The row just stored counts once; more than one means this seq came before under another boot_id
            # (only after a device lost its outbox and started seq again): not a new seq, not a duplicate.
            n = db.execute("SELECT (SELECT count(*) FROM telemetry WHERE device_id = ?1 AND seq = ?2) + "
                           "(SELECT count(*) FROM events WHERE device_id = ?1 AND seq = ?2)",
                           (device_id, seq)).fetchone()[0]
            db.execute("UPDATE devices SET seq_max = max(seq_max, ?), seq_count = seq_count + ? WHERE id = ?",
                       (seq, int(n == 1), device_id))
        return True

    def record_telemetry(self, msg: protocol.Telemetry, received: float, retained: bool = False) -> bool:
        """Store one window; False when it was already stored (a redelivery)."""
        lat = msg.latency_ms
        errors = sum(msg.errors.values())
        with self._tx() as db:
            self._touch(db, msg.device_id, self._seen(received, msg.time, retained))
            cur = db.execute(
                "INSERT OR IGNORE INTO telemetry (device_id, boot_id, seq, time, received, interval_s, "
                "inferences, errors, p50, p95, p99, cpu_percent, rss_bytes, memory_percent, temperature_c, "
                "payload) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (msg.device_id, msg.boot_id, msg.seq, msg.time, received, msg.interval_s, msg.inferences,
                 errors, lat and lat.p50, lat and lat.p95, lat and lat.p99, msg.cpu_percent, msg.rss_bytes,
                 msg.memory_percent, msg.temperature_c, protocol.encode(msg).decode()))
            if not self._count_seq(db, msg.device_id, msg.seq, cur.rowcount == 1):
                return False
            db.execute("UPDATE devices SET inferences = inferences + ?, errors = errors + ?, interval_s = ? "
                       "WHERE id = ?", (msg.inferences, errors, msg.interval_s, msg.device_id))
            return True

    def record_event(self, msg: protocol.Event, received: float, retained: bool = False) -> bool:
        """Store one event and move the device's phase in its deployment; False for a redelivery."""
        with self._tx() as db:
            self._touch(db, msg.device_id, self._seen(received, msg.time, retained))
            cur = db.execute(
                "INSERT OR IGNORE INTO events (device_id, boot_id, seq, time, received, kind, deployment_id, "
                "sha256, version, reason) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (msg.device_id, msg.boot_id, msg.seq, msg.time, received, msg.kind, msg.deployment_id,
                 msg.sha256, msg.version, msg.reason))
            if not self._count_seq(db, msg.device_id, msg.seq, cur.rowcount == 1):
                return False
            if msg.kind in PHASES and msg.deployment_id:
                # Only a deployment this controller made; an older event never overwrites a newer phase.
                db.execute(
                    "INSERT INTO deployment_devices (deployment_id, device_id, phase, reason, updated, event_time) "
                    "SELECT ?, ?, ?, ?, ?, ? WHERE EXISTS (SELECT 1 FROM deployments WHERE id = ?) "
                    "ON CONFLICT (deployment_id, device_id) DO UPDATE SET phase = excluded.phase, "
                    "reason = excluded.reason, updated = excluded.updated, event_time = excluded.event_time "
                    "WHERE deployment_devices.event_time IS NULL "
                    "OR deployment_devices.event_time <= excluded.event_time",
                    (msg.deployment_id, msg.device_id, msg.kind, msg.reason, received, msg.time,
                     msg.deployment_id))
            return True

    # -- bundles and deployments ----------------------------------------------------------------
    def add_bundle(self, sha256: str, size: int, manifest: dict[str, Any]) -> None:
        with self._tx() as db:
            db.execute("INSERT OR IGNORE INTO bundles VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                       (sha256, size, manifest["name"], manifest["version"], manifest["target"],
                        manifest["runtime"], manifest["precision"], json.dumps(manifest), time.time()))

    def bundle(self, sha256: str) -> dict[str, Any] | None:
        rows = self._query("SELECT * FROM bundles WHERE sha256 = ?", (sha256,))
        if not rows:
            return None
        b = dict(rows[0])
        b["manifest"] = json.loads(b["manifest"])
        return b

    def add_deployment(self, deployment_id: str, sha256: str, devices: list[str]) -> None:
        now = time.time()
        with self._tx() as db:
            db.execute("INSERT INTO deployments VALUES (?, ?, ?, ?)",
                       (deployment_id, sha256, now, json.dumps(devices)))
            db.executemany("INSERT INTO deployment_devices (deployment_id, device_id, phase, updated) "
                           "VALUES (?, ?, 'pending', ?)", [(deployment_id, d, now) for d in devices])

    def set_phase(self, deployment_id: str, device_id: str, phase: str, reason: str = "") -> None:
        with self._tx() as db:
            db.execute("UPDATE deployment_devices SET phase = ?, reason = ?, updated = ? "
                       "WHERE deployment_id = ? AND device_id = ?",
                       (phase, reason, time.time(), deployment_id, device_id))

    def deployment(self, deployment_id: str) -> dict[str, Any] | None:
        rows = self._query("SELECT * FROM deployments WHERE id = ?", (deployment_id,))
        if not rows:
            return None
        d = dict(rows[0])
        d["targets"] = json.loads(d["targets"])
        d["devices"] = [dict(r) for r in self._query(
            "SELECT device_id, phase, reason, updated FROM deployment_devices WHERE deployment_id = ? "
            "ORDER BY device_id", (deployment_id,))]
        return d

    # -- what the API shows ---------------------------------------------------------------------
    def device_count(self) -> int:
        return self._query("SELECT count(*) FROM devices")[0][0]

    def devices(self) -> list[dict[str, Any]]:
        out = []
        for r in self._query("SELECT * FROM devices ORDER BY id"):
            d = dict(r)
            d["cpu_flags"], d["runtimes"] = json.loads(d["cpu_flags"]), json.loads(d["runtimes"])
            d["online"] = _online(r, time.time())
            out.append(d)
        return out

    def health(self, device_id: str | None = None, now: float | None = None) -> list[dict[str, Any]]:
        now = time.time() if now is None else now
        where, args = ("WHERE id = ?", (device_id,)) if device_id is not None else ("", ())
        return [self._health(r, now) for r in self._query(f"SELECT * FROM devices {where} ORDER BY id", args)]

    def _health(self, d: sqlite3.Row, now: float) -> dict[str, Any]:
        last = self._query("SELECT cpu_percent, rss_bytes, memory_percent, temperature_c, payload FROM telemetry "
                           "WHERE device_id = ? ORDER BY time DESC, id DESC LIMIT 1", (d["id"],))
        lat = self._query("SELECT p50, p95, p99 FROM telemetry WHERE device_id = ? AND inferences > 0 "
                          "ORDER BY time DESC, id DESC LIMIT 1", (d["id"],))
        dep = self._query("SELECT dd.deployment_id, dd.phase, dd.reason FROM deployment_devices dd "
                          "JOIN deployments p ON p.id = dd.deployment_id WHERE dd.device_id = ? "
                          "ORDER BY p.created DESC LIMIT 1", (d["id"],))
        t = last[0] if last else None
        outbox = json.loads(t["payload"]) if t else {}
        return {
            "device_id": d["id"],
            "online": _online(d, now),
            "model": {k: d[f"active_{k}"] for k in ("name", "version", "precision", "runtime", "sha256")}
            if d["active_name"] is not None else None,
            "inferences": d["inferences"],
            "errors": d["errors"],
            "latency_ms": dict(lat[0]) if lat else None,
            "cpu_percent": t and t["cpu_percent"],
            "rss_bytes": t and t["rss_bytes"],
            "memory_percent": t and t["memory_percent"],
            "temperature_c": t and t["temperature_c"],
            "last_seen": d["last_seen"],
            "last_seen_ago_s": round(max(0.0, now - d["last_seen"]), 3),
            "deployment": dict(dep[0]) if dep else None,
            # seq accounting (see the module docstring) and the device's own outbox, from its latest telemetry
            "seq_gaps": d["seq_max"] - d["seq_count"],
            "duplicates": d["duplicates"],
            "outbox_dropped": outbox.get("outbox_dropped", 0) if t else None,
            "outbox_pending": outbox.get("outbox_pending", 0) if t else None,
        }

    def device_detail(self, device_id: str, events: int = 20) -> dict[str, Any] | None:
        health = self.health(device_id)
        if not health:
            return None
        h = health[0]
        h["events"] = [dict(r) for r in self._query(
            "SELECT boot_id, seq, time, kind, deployment_id, sha256, version, reason FROM events "
            "WHERE device_id = ? ORDER BY time DESC, id DESC LIMIT ?", (device_id, events))]
        h["deployments"] = [dict(r) for r in self._query(
            "SELECT dd.deployment_id, p.bundle_sha256, p.created, dd.phase, dd.reason, dd.updated "
            "FROM deployment_devices dd JOIN deployments p ON p.id = dd.deployment_id "
            "WHERE dd.device_id = ? ORDER BY p.created DESC", (device_id,))]
        return h


def _online(d: sqlite3.Row, now: float) -> bool:
    """Online unless the last state said offline (the last will) or nothing came for 3 intervals."""
    interval = d["interval_s"] or DEFAULT_INTERVAL_S
    return bool(d["online"]) and now - d["last_seen"] <= OFFLINE_AFTER_INTERVALS * interval
