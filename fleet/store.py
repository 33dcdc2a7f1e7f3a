"""The registry: one SQLite file (WAL) holding devices, telemetry, events, bundles and deployments.

Paho's network thread writes what devices report while uvicorn's threads read and write for the API,
so every call goes through one connection guarded by a lock. A QoS 1 message may arrive twice: telemetry
and events are keyed by (device_id, boot_id, seq) and a repeat changes nothing but the device's
``duplicates`` count.

seq is per device and persistent across the agent's restarts (its outbox keeps it; telemetry, events and
quality messages share it), so what never arrived shows as gaps: ``seq_gaps`` = the highest seq received from the device
minus the number of distinct seqs received (any boot_id; seqs >= 1). A seq that arrives late closes its
gap. The counters live on the device row, kept as messages are stored, so health never scans telemetry;
so do the running totals of inferences and errors (and errors by kind, in ``device_errors``), which stay
right after retention (``fleet.retention``) has folded old raw rows into rollups and deleted them.

Online or offline: a device is online unless its last state said offline (its last will, or the offline
state it sends when it stops) or it has been silent for ``offline_after`` telemetry intervals. Each change
is recorded in ``transitions`` (time, online, reason) when a message changes it, or by ``sweep()``, which
the controller runs every second so a silent device's timeout is recorded even when nobody asks.
"""

from __future__ import annotations

import contextlib
import json
import logging
import sqlite3
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from agent import protocol
from agent.errors import EdgefleetError
from fleet import clock as clocks
from fleet import health, quality, retention, targets

if TYPE_CHECKING:
    from agent import quality as quality_

log = logging.getLogger("edgefleet.fleet.store")

SCHEMA_VERSION = 8
DEFAULT_INTERVAL_S = 10.0
OFFLINE_AFTER_INTERVALS = 3
CLONE_BOOTS = 8  # the boot ids remembered per device for clone detection
_INTERNAL = {"boots", "conflicts", "conflict_first", "conflict_last",  # health reports the identity conflict
             "storage_time", "disk_time"}  # bookkeeping: the (corrected) time of the report each figure came from
MAX_CLOCK_OFFSET_S = 300.0  # a device whose clock is further off than this is flagged (fleet serve --max-clock-offset)
CLOCK_CACHE = 100_000  # boots whose clock estimate is kept in memory too (the table is the truth)
PHASES = {"downloading", "verifying", "activating", "active", "failed", "rolled_back"}

_SCHEMA_V2 = """
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


_V2_TO_V3 = """
ALTER TABLE devices ADD COLUMN status_online INTEGER;
ALTER TABLE devices ADD COLUMN status_time REAL;
UPDATE devices SET status_online = online, status_time = last_seen;
ALTER TABLE telemetry ADD COLUMN mean_ms REAL;
ALTER TABLE telemetry ADD COLUMN max_ms REAL;
ALTER TABLE telemetry ADD COLUMN histogram TEXT;
UPDATE telemetry SET mean_ms = json_extract(payload, '$.latency_ms.mean'),
    max_ms = json_extract(payload, '$.latency_ms.max'),
    histogram = CASE WHEN json_array_length(payload, '$.histogram') > 0
                THEN json_extract(payload, '$.histogram') END;
CREATE INDEX telemetry_time ON telemetry (time);
CREATE TABLE device_tags (
    device_id TEXT NOT NULL REFERENCES devices(id),
    tag TEXT NOT NULL,
    PRIMARY KEY (device_id, tag)
);
CREATE INDEX device_tags_tag ON device_tags (tag);
CREATE TABLE transitions (
    id INTEGER PRIMARY KEY,
    device_id TEXT NOT NULL REFERENCES devices(id),
    time REAL NOT NULL,
    online INTEGER NOT NULL,
    reason TEXT NOT NULL
);
CREATE INDEX transitions_device_time ON transitions (device_id, time);
CREATE TABLE device_errors (
    device_id TEXT NOT NULL REFERENCES devices(id),
    kind TEXT NOT NULL,
    count INTEGER NOT NULL,
    last_time REAL NOT NULL,
    PRIMARY KEY (device_id, kind)
);
INSERT INTO device_errors (device_id, kind, count, last_time)
    SELECT t.device_id, e.key, sum(e.value), max(t.time) FROM telemetry t, json_each(t.payload, '$.errors') e
    GROUP BY t.device_id, e.key;
""" + ";".join(retention.ROLLUP_DDL.format(table=table) for table, _, _ in retention.TIERS) + """;
CREATE TABLE retention (tier TEXT PRIMARY KEY, before REAL NOT NULL);
UPDATE schema_version SET version = 3
"""
# Who may speak to the fleet. Operators (fleet/auth.py): API tokens (only their sha256 is kept), the dashboard's
# sign-in sessions (a session belongs to the token that signed in: revoking the token ends it) and the audit
# trail. Devices (fleet/enroll.py): the certificates the fleet CA issued, one-time and provisioning enrollment
# tokens (stored hashed), revoked device ids; and what clone detection keeps per device (record_state).
_V3_TO_V4 = """
CREATE TABLE tokens (
    id INTEGER PRIMARY KEY,
    name TEXT NOT NULL,
    role TEXT NOT NULL CHECK (role IN ('read', 'operator', 'admin')),
    hash TEXT NOT NULL UNIQUE,
    created REAL NOT NULL,
    last_used REAL,
    revoked REAL
);
CREATE UNIQUE INDEX tokens_active_name ON tokens (name) WHERE revoked IS NULL;
CREATE TABLE sessions (
    hash TEXT PRIMARY KEY,
    token_id INTEGER NOT NULL REFERENCES tokens(id),
    created REAL NOT NULL,
    expires REAL NOT NULL
);
CREATE INDEX sessions_token ON sessions (token_id);
CREATE TABLE audit (
    id INTEGER PRIMARY KEY,
    time REAL NOT NULL,
    actor TEXT NOT NULL,
    action TEXT NOT NULL,
    target TEXT NOT NULL DEFAULT '',
    status INTEGER,
    remote TEXT NOT NULL DEFAULT '',
    detail TEXT NOT NULL DEFAULT ''
);
CREATE TABLE certificates (
    serial TEXT PRIMARY KEY,
    device_id TEXT NOT NULL,
    fingerprint TEXT NOT NULL,
    not_before REAL NOT NULL,
    not_after REAL NOT NULL,
    issued REAL NOT NULL,
    kind TEXT NOT NULL,
    revoked REAL,
    reason TEXT NOT NULL DEFAULT ''
);
CREATE INDEX certificates_device ON certificates (device_id);
CREATE TABLE enrollments (
    id TEXT PRIMARY KEY,
    token_hash TEXT NOT NULL UNIQUE,
    kind TEXT NOT NULL,
    device_id TEXT,
    prefix TEXT NOT NULL DEFAULT '',
    uses_left INTEGER NOT NULL,
    used INTEGER NOT NULL DEFAULT 0,
    created REAL NOT NULL,
    expires REAL NOT NULL,
    created_by TEXT NOT NULL DEFAULT '',
    revoked REAL
);
CREATE TABLE revoked_devices (
    device_id TEXT PRIMARY KEY,
    time REAL NOT NULL,
    by TEXT NOT NULL DEFAULT ''
);
ALTER TABLE devices ADD COLUMN boots TEXT NOT NULL DEFAULT '[]';
ALTER TABLE devices ADD COLUMN conflicts INTEGER NOT NULL DEFAULT 0;
ALTER TABLE devices ADD COLUMN conflict_first REAL;
ALTER TABLE devices ADD COLUMN conflict_last REAL;
UPDATE schema_version SET version = 4
"""
# Time the controller can trust (fleet/clock.py). Telemetry and events are filed at the controller's time:
# ``time`` is the corrected time, ``device_time`` the device's own (NULL in rows stored before schema 5, whose
# ``time`` is the device's). ``clocks`` holds each (device, boot)'s clock estimate; ``dirty`` marks one whose
# rows the sweep must move (re-file). The device row keeps what the device said of its storage and clock (from
# state and telemetry, the newest by corrected time wins) and its free disk (from telemetry).
_V4_TO_V5 = """
ALTER TABLE telemetry ADD COLUMN device_time REAL;
ALTER TABLE events ADD COLUMN device_time REAL;
CREATE TABLE clocks (
    device_id TEXT NOT NULL REFERENCES devices(id),
    boot_id TEXT NOT NULL,
    offset_s REAL NOT NULL,
    jumps INTEGER NOT NULL DEFAULT 0,
    updated REAL NOT NULL,
    dirty INTEGER NOT NULL DEFAULT 0,
    state TEXT NOT NULL,
    PRIMARY KEY (device_id, boot_id)
);
CREATE INDEX clocks_dirty ON clocks (dirty) WHERE dirty = 1;
ALTER TABLE devices ADD COLUMN storage TEXT;
ALTER TABLE devices ADD COLUMN storage_since REAL;
ALTER TABLE devices ADD COLUMN storage_time REAL;
ALTER TABLE devices ADD COLUMN clock_synced INTEGER;
ALTER TABLE devices ADD COLUMN disk_free_bytes INTEGER;
ALTER TABLE devices ADD COLUMN disk_time REAL;
UPDATE schema_version SET version = 5
"""
# Signing (issue 10, fleet/keys.py and fleet/signer.py). ``release_keys``: the keys whose bundles the fleet takes
# (``statement``: the signed ``add`` statement it came with, ``removal``: the controller's signed ``remove``); the
# trust statements every desired carries are these, in time order. ``signed``: per device, the counter of its last
# signed desired or cmd (it only grows), and the desired last published, unsigned, with when its signed copy
# expires and which trust list it carried (the re-sign sweep republishes it). Bundles record who signed them.
_V5_TO_V6 = """
CREATE TABLE release_keys (
    keyid TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    pem TEXT NOT NULL,
    added REAL NOT NULL,
    removed REAL,
    statement TEXT,
    removal TEXT
);
CREATE TABLE signed (
    device_id TEXT PRIMARY KEY,
    counter INTEGER NOT NULL DEFAULT 0,
    desired TEXT,
    issued REAL,
    expires REAL,
    trust TEXT
);
ALTER TABLE bundles ADD COLUMN signed_by TEXT;
ALTER TABLE bundles ADD COLUMN signer TEXT;
ALTER TABLE bundles ADD COLUMN serial INTEGER;
ALTER TABLE devices ADD COLUMN active_signed_by TEXT;
ALTER TABLE devices ADD COLUMN active_serial INTEGER;
UPDATE schema_version SET version = 6
"""
# Model quality (issue 12, fleet/quality.py). ``quality``: one row a device's quality message (a window's counts in
# the bins of its bundle's profile, canary and feedback), filed at the controller's time like telemetry (``time``
# corrected, ``device_time`` the device's) and keyed like it by (device, boot, seq); ``bins``, ``confusion`` and
# ``refused`` are the message's JSON. ``quality_refused``: quality messages refused (fleet/quality.refusal), by
# reason. ``bundles.profile``: the bundle's profile.json as uploaded ('' when it has none; NULL for a bundle stored
# before schema 7, until the controller reads it from its file at start) and ``profile_id`` its id.
_V6_TO_V7 = """
CREATE TABLE quality (
    id INTEGER PRIMARY KEY,
    device_id TEXT NOT NULL REFERENCES devices(id),
    boot_id TEXT NOT NULL,
    seq INTEGER NOT NULL,
    time REAL NOT NULL,
    device_time REAL,
    received REAL NOT NULL,
    interval_s REAL NOT NULL,
    sha256 TEXT NOT NULL,
    version TEXT NOT NULL,
    deployment_id TEXT,
    profile TEXT NOT NULL,
    served INTEGER NOT NULL,
    bins TEXT NOT NULL,
    canary_runs INTEGER NOT NULL DEFAULT 0,
    canary_agree INTEGER NOT NULL DEFAULT 0,
    canary_max_abs_err REAL,
    canary_time REAL,
    labels INTEGER NOT NULL DEFAULT 0,
    confusion TEXT NOT NULL DEFAULT '[]',
    refused TEXT NOT NULL DEFAULT '{}',
    UNIQUE (device_id, boot_id, seq)
);
CREATE INDEX quality_device_time ON quality (device_id, time);
CREATE INDEX quality_sha_time ON quality (sha256, time);
CREATE INDEX quality_device_seq ON quality (device_id, seq);
CREATE INDEX quality_time ON quality (time);
CREATE TABLE quality_refused (
    reason TEXT PRIMARY KEY,
    count INTEGER NOT NULL,
    last_time REAL NOT NULL
);
ALTER TABLE bundles ADD COLUMN profile TEXT;
ALTER TABLE bundles ADD COLUMN profile_id TEXT;
UPDATE schema_version SET version = 7
"""
# Accelerators (issue 14). From the device's latest state: ``active_serving``, the JSON of its active model's
# ``serving`` (the device and provider that really run it, and why its bundle's earlier choices do not; NULL: the
# agent does not say), and ``runtime_devices``, the JSON of its ``devices`` (runtime -> the devices it can use
# there). The accelerators' load is in each telemetry row's payload (health reads the latest).
_V7_TO_V8 = """
ALTER TABLE devices ADD COLUMN active_serving TEXT;
ALTER TABLE devices ADD COLUMN runtime_devices TEXT NOT NULL DEFAULT '{}';
UPDATE schema_version SET version = 8
"""
_MIGRATIONS = {1: _V1_TO_V2, 2: _V2_TO_V3, 3: _V3_TO_V4, 4: _V4_TO_V5, 5: _V5_TO_V6, 6: _V6_TO_V7, 7: _V7_TO_V8}
SEQ_TABLES = ("telemetry", "events", "quality")  # the messages that take a seq from the device's one counter

class Store:
    """The controller's SQLite registry at ``path``; safe to call from any thread.

    ``offline_after``: how many telemetry intervals of silence make a device offline; ``max_clock_offset_s``:
    how far off a device's clock may be before health flags it."""

    def __init__(self, path: Path, offline_after: float = OFFLINE_AFTER_INTERVALS,
                 max_clock_offset_s: float = MAX_CLOCK_OFFSET_S) -> None:
        if not offline_after > 0:
            raise EdgefleetError(f"offline_after must be a positive number of intervals (got {offline_after})")
        if not max_clock_offset_s > 0:
            raise EdgefleetError(f"the clock offset bound must be a positive number of seconds "
                                 f"(got {max_clock_offset_s})")
        self.path = Path(path)
        self.offline_after = float(offline_after)
        self.max_clock_offset_s = float(max_clock_offset_s)
        self._lock = threading.RLock()
        self._db: sqlite3.Connection | None = None
        self._clocks: dict[tuple[str, str], clocks.Clock] = {}  # (device, boot) -> as last saved
        self._profiles: dict[str, Any] = {}  # bundle sha256 -> (profile id, Profile) or None (it has none)

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
            if not has:  # a new file: the v2 schema, then the migrations from there
                for stmt in filter(str.strip, _SCHEMA_V2.split(";")):
                    db.execute(stmt)
                db.execute("INSERT INTO schema_version VALUES (2)")
            version = db.execute("SELECT version FROM schema_version").fetchone()[0]
            while version in _MIGRATIONS:
                for stmt in filter(str.strip, _MIGRATIONS[version].split(";")):
                    db.execute(stmt)
                version += 1
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

    # for the other modules of fleet/ that keep tables here (fleet.retention)
    tx = _tx
    query = _query

    # -- online / offline ---------------------------------------------------------------------------
    def _limit(self, d: Any) -> float:
        return self.offline_after * (d["interval_s"] or DEFAULT_INTERVAL_S)

    def is_online(self, d: Any, now: float) -> bool:
        """Online unless the last state said offline (the last will) or nothing came for offline_after intervals."""
        return bool(d["online"]) and now - d["last_seen"] <= self._limit(d)

    def _settle(self, db: sqlite3.Connection, device_id: str, now: float, reason: str) -> None:
        """Record a transition if the device's status is not what was last recorded."""
        d = db.execute("SELECT online, last_seen, interval_s, status_online FROM devices WHERE id = ?",
                       (device_id,)).fetchone()
        online = self.is_online(d, now)
        if d["status_online"] is not None and bool(d["status_online"]) == online:
            return
        at = now
        if not online and d["online"]:  # it said nothing for too long
            reason, at = "heartbeat timeout", d["last_seen"] + self._limit(d)
        db.execute("INSERT INTO transitions (device_id, time, online, reason) VALUES (?, ?, ?, ?)",
                   (device_id, at, int(online), reason))
        db.execute("UPDATE devices SET status_online = ?, status_time = ? WHERE id = ?",
                   (int(online), at, device_id))

    def sweep(self, now: float | None = None) -> int:
        """Record the heartbeat timeouts reached by ``now``; returns how many devices went offline."""
        now = time.time() if now is None else now
        with self._tx() as db:
            ids = [r[0] for r in db.execute(
                "SELECT id FROM devices WHERE status_online IS NOT 0 AND (online = 0 OR "
                "? - last_seen > ? * coalesce(interval_s, ?))", (now, self.offline_after, DEFAULT_INTERVAL_S))]
            for device_id in ids:
                self._settle(db, device_id, now, "heartbeat timeout")
        self.refile()
        return len(ids)

    # -- what devices report --------------------------------------------------------------------
    def _touch(self, db: sqlite3.Connection, device_id: str, seen: float) -> None:
        """Register a device on the first message of any kind; move last_seen forward."""
        db.execute("INSERT INTO devices (id, first_seen, last_seen) VALUES (?, ?, ?) "
                   "ON CONFLICT (id) DO UPDATE SET last_seen = max(last_seen, excluded.last_seen)",
                   (device_id, seen, seen))

    # -- clocks: what is filed where on the controller's time line (fleet/clock.py) ------------------------
    def _clock(self, db: sqlite3.Connection, device_id: str, boot_id: str) -> clocks.Clock | None:
        """A boot's clock (from the cache of those in use, else the table); under the lock."""
        clock = self._clocks.get((device_id, boot_id))
        if clock is None:
            row = db.execute("SELECT state FROM clocks WHERE device_id = ? AND boot_id = ?",
                             (device_id, boot_id)).fetchone()
            clock = clocks.Clock.load(row[0]) if row else None
        return clock

    def _cache_clock(self, device_id: str, boot_id: str, clock: clocks.Clock) -> None:
        """Once its transaction committed: the clock as the table has it (unless a message taken in since has
        cached a newer one)."""
        with self._lock:
            if len(self._clocks) >= CLOCK_CACHE:
                self._clocks.clear()
            self._clocks.setdefault((device_id, boot_id), clock)

    @staticmethod
    def _save_clock(db: sqlite3.Connection, device_id: str, boot_id: str, clock: clocks.Clock,
                    received: float) -> None:
        dirty = int(any(r.needs_refile for r in clock.regimes))
        db.execute("INSERT INTO clocks (device_id, boot_id, offset_s, jumps, updated, dirty, state) "
                   "VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (device_id, boot_id) DO UPDATE SET "
                   "offset_s = excluded.offset_s, jumps = excluded.jumps, dirty = excluded.dirty, "
                   "updated = max(updated, excluded.updated), state = excluded.state",
                   (device_id, boot_id, clock.offset, clock.jumps, received, dirty, clock.dump().decode()))

    def _corrected(self, db: sqlite3.Connection, device_id: str, boot_id: str, sent: float, received: float) -> float:
        """A time the device stamped (a state's: no seq) on the controller's time line: with its boot's current
        estimate when there is one, else when it arrived."""
        clock = self._clock(db, device_id, boot_id) if boot_id else None
        if clock is None:
            return received
        return min(received, sent + clock.regimes[-1].value(received))

    def refile(self) -> int:
        """Move the rows of every clock regime whose estimate fell since they were filed (``fleet.clock``): each
        row more than REFILE_S later than ``device_time`` + the estimate is put there. Returns the rows moved."""
        moved = 0
        with self._tx() as db:
            for device_id, boot_id, state in db.execute(
                    "SELECT device_id, boot_id, state FROM clocks WHERE dirty = 1").fetchall():
                clock = clocks.Clock.load(state)
                for r in clock.regimes:
                    if not r.needs_refile:
                        continue
                    lo, hi = clock.span(r)
                    for table in SEQ_TABLES:
                        moved += db.execute(
                            f"UPDATE {table} SET time = device_time + ?1 WHERE device_id = ?2 AND boot_id = ?3 AND "
                            f"seq >= ?4 AND seq < ?5 AND device_time IS NOT NULL AND time > device_time + ?1 + ?6",
                            (r.offset, device_id, boot_id, lo, hi, clocks.REFILE_S)).rowcount
                    r.filed = r.offset
                db.execute("UPDATE clocks SET dirty = 0, state = ? WHERE device_id = ? AND boot_id = ?",
                           (clock.dump().decode(), device_id, boot_id))
                self._clocks.pop((device_id, boot_id), None)  # read again from the table when next needed
        return moved

    @staticmethod
    def _report(db: sqlite3.Connection, device_id: str, when: float, storage: str, synced: bool | None,
                disk_free: int | None = None) -> None:
        """What a state or telemetry message says of the device's storage, clock and (telemetry) free disk, unless
        the device row already holds a newer report (``when`` is the message's corrected time)."""
        db.execute("UPDATE devices SET storage_since = CASE WHEN storage IS ?1 THEN storage_since ELSE ?2 END, "
                   "storage = ?1, clock_synced = ?3, storage_time = ?2, "
                   "disk_free_bytes = coalesce(?5, disk_free_bytes), "
                   "disk_time = CASE WHEN ?5 IS NULL THEN disk_time ELSE ?2 END "
                   "WHERE id = ?4 AND (storage_time IS NULL OR storage_time <= ?2)",
                   (storage, when, None if synced is None else int(synced), device_id, disk_free))

    def record_state(self, msg: protocol.State, received: float, retained: bool = False) -> None:
        a = msg.active
        with self._tx() as db:
            # A retained message replayed on subscribe is old news: it shows the device no later than it was sent.
            sent = self._corrected(db, msg.device_id, msg.boot_id, msg.time, received)
            self._touch(db, msg.device_id, sent if retained else received)
            if msg.online:
                self._report(db, msg.device_id, sent, msg.storage, msg.clock_synced)
                self._check_boot(db, msg, received)
                db.execute(
                    "UPDATE devices SET online = 1, state_time = ?, boot_id = ?, agent_version = ?, arch = ?, "
                    "cpu_flags = ?, runtimes = ?, active_name = ?, active_version = ?, active_sha256 = ?, "
                    "active_runtime = ?, active_precision = ?, active_deployment_id = ?, active_signed_by = ?, "
                    "active_serial = ?, active_serving = ?, runtime_devices = ? WHERE id = ?",
                    (msg.time, msg.boot_id, msg.agent_version, msg.arch,
                     json.dumps(msg.cpu_flags), json.dumps(msg.runtimes),
                     a and a.name, a and a.version, a and a.sha256, a and a.runtime, a and a.precision,
                     a and a.deployment_id, a and a.signed_by, a and a.serial,
                     protocol.encode(a.serving).decode() if a and a.serving else None, json.dumps(msg.devices),
                     msg.device_id))
                self._settle(db, msg.device_id, received, "birth")
                return
            # Offline: the last will, or the state an agent sends when it stops. Neither says more than that, so
            # what the device said when alive (identity, active model) stays. The will was composed when the
            # device connected (the agent's says time 0): it is not newer than the birth that followed.
            prev = db.execute("SELECT state_time FROM devices WHERE id = ?", (msg.device_id,)).fetchone()[0]
            will = msg.time == 0 or (prev is not None and msg.time <= prev)
            db.execute("UPDATE devices SET online = 0, state_time = max(coalesce(state_time, ?), ?) WHERE id = ?",
                       (msg.time, msg.time, msg.device_id))
            self._settle(db, msg.device_id, received, "last will" if will else "offline state")

    def _check_boot(self, db: sqlite3.Connection, msg: protocol.State, received: float) -> None:
        """Clone detection. A device's boot id changes only when its agent restarts, and an old one never comes
        back; births whose boot ids alternate (a, b, a) are two devices using one identity (an image cloned
        after enrollment: the broker hands the session from one to the other and each reconnects)."""
        if not msg.boot_id:
            return
        row = db.execute("SELECT boot_id, boots FROM devices WHERE id = ?", (msg.device_id,)).fetchone()
        if msg.boot_id == row["boot_id"]:
            return
        boots = [b for b in json.loads(row["boots"]) if b != msg.boot_id]
        if msg.boot_id in json.loads(row["boots"]) and row["boot_id"]:
            n = db.execute("UPDATE devices SET conflicts = conflicts + 1, conflict_first = coalesce(conflict_first, "
                           "?1), conflict_last = ?1 WHERE id = ?2 RETURNING conflicts",
                           (received, msg.device_id)).fetchone()[0]
            if n == 1 or n % 10 == 0:  # an event when it starts, then every tenth takeover
                db.execute("INSERT OR IGNORE INTO events (device_id, boot_id, seq, time, received, kind, reason) "
                           "VALUES (?, 'controller', ?, ?, ?, 'identity_conflict', ?)",
                           (msg.device_id, -n, received, received,
                            f"two devices use the identity {msg.device_id}: boot ids {row['boot_id']} and "
                            f"{msg.boot_id} alternate ({n} takeover{'s' if n > 1 else ''}); give one a new "
                            f"identity (revoke this one and enroll both)"))
        db.execute("UPDATE devices SET boots = ? WHERE id = ?",
                   (json.dumps((boots + [msg.boot_id])[-CLONE_BOOTS:]), msg.device_id))

    @staticmethod
    def _count_seq(db: sqlite3.Connection, device_id: str, seq: int, stored: bool) -> bool:
        """Keep the device's seq accounting after one telemetry/event/quality insert; returns ``stored``."""
        if not stored:  # the same (boot_id, seq) again: a redelivery
            db.execute("UPDATE devices SET duplicates = duplicates + 1 WHERE id = ?", (device_id,))
            return False
        if seq > 0:
            # The row just stored counts once; more than one means this seq came before under another boot_id
            # (only after a device lost its outbox and started seq again): not a new seq, not a duplicate.
            n = db.execute("SELECT " + " + ".join(f"(SELECT count(*) FROM {t} WHERE device_id = ?1 AND seq = ?2)"
                                                  for t in SEQ_TABLES), (device_id, seq)).fetchone()[0]
            db.execute("UPDATE devices SET seq_max = max(seq_max, ?), seq_count = seq_count + ? WHERE id = ?",
                       (seq, int(n == 1), device_id))
        return True

    def _file(self, db: sqlite3.Connection, msg: protocol.Telemetry | protocol.Event | protocol.Quality,
              received: float,
              interval_s: float | None) -> tuple[clocks.Clock, float]:
        """(the boot's clock with this message taken in, the controller time to file the message at). The clock
        is changed in place, so the cache drops it until its transaction has committed (a duplicate or a failed
        transaction leaves the table's copy the truth)."""
        clock = self._clock(db, msg.device_id, msg.boot_id)
        self._clocks.pop((msg.device_id, msg.boot_id), None)  # back in by _cache_clock, after the commit
        return clocks.observe(clock, msg.seq, msg.time, received, interval_s or DEFAULT_INTERVAL_S)

    def record_telemetry(self, msg: protocol.Telemetry, received: float, retained: bool = False) -> bool:
        """Store one window, filed at the controller's time (``fleet.clock``); False when it was already stored
        (a redelivery)."""
        lat = msg.latency_ms
        errors = sum(msg.errors.values())
        hist = json.dumps(msg.histogram) if msg.histogram else None
        with self._tx() as db:
            clock, at = self._file(db, msg, received, msg.interval_s)
            self._touch(db, msg.device_id, min(at, received) if retained else received)
            cur = db.execute(
                "INSERT OR IGNORE INTO telemetry (device_id, boot_id, seq, time, device_time, received, interval_s, "
                "inferences, errors, p50, p95, p99, mean_ms, max_ms, histogram, cpu_percent, rss_bytes, "
                "memory_percent, temperature_c, payload) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, "
                "?, ?, ?, ?)",
                (msg.device_id, msg.boot_id, msg.seq, at, msg.time, received, msg.interval_s, msg.inferences,
                 errors, lat and lat.p50, lat and lat.p95, lat and lat.p99, lat and lat.mean, lat and lat.max,
                 hist, msg.cpu_percent, msg.rss_bytes, msg.memory_percent, msg.temperature_c,
                 protocol.encode(msg).decode()))
            if not self._count_seq(db, msg.device_id, msg.seq, cur.rowcount == 1):
                return False
            self._save_clock(db, msg.device_id, msg.boot_id, clock, received)
            db.execute("UPDATE devices SET inferences = inferences + ?, errors = errors + ?, interval_s = ? "
                       "WHERE id = ?", (msg.inferences, errors, msg.interval_s, msg.device_id))
            self._report(db, msg.device_id, at, msg.storage, msg.clock_synced, msg.disk_free_bytes)
            db.executemany(
                "INSERT INTO device_errors (device_id, kind, count, last_time) VALUES (?, ?, ?, ?) "
                "ON CONFLICT (device_id, kind) DO UPDATE SET count = count + excluded.count, "
                "last_time = max(last_time, excluded.last_time)",
                [(msg.device_id, kind, n, at) for kind, n in msg.errors.items() if n])
            self._settle(db, msg.device_id, received, "telemetry")
        self._cache_clock(msg.device_id, msg.boot_id, clock)
        return True

    def record_event(self, msg: protocol.Event, received: float, retained: bool = False) -> bool:
        """Store one event, filed at the controller's time, and move the device's phase in its deployment; False
        for a redelivery."""
        with self._tx() as db:
            row = db.execute("SELECT interval_s FROM devices WHERE id = ?", (msg.device_id,)).fetchone()
            clock, at = self._file(db, msg, received, row and row[0])
            self._touch(db, msg.device_id, min(at, received) if retained else received)
            cur = db.execute(
                "INSERT OR IGNORE INTO events (device_id, boot_id, seq, time, device_time, received, kind, "
                "deployment_id, sha256, version, reason) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (msg.device_id, msg.boot_id, msg.seq, at, msg.time, received, msg.kind, msg.deployment_id,
                 msg.sha256, msg.version, msg.reason))
            if not self._count_seq(db, msg.device_id, msg.seq, cur.rowcount == 1):
                return False
            self._save_clock(db, msg.device_id, msg.boot_id, clock, received)
            if msg.kind in PHASES and msg.deployment_id:
                # Only a deployment this controller made; an older event never overwrites a newer phase.
                db.execute(
                    "INSERT INTO deployment_devices (deployment_id, device_id, phase, reason, updated, event_time) "
                    "SELECT ?, ?, ?, ?, ?, ? WHERE EXISTS (SELECT 1 FROM deployments WHERE id = ?) "
                    "ON CONFLICT (deployment_id, device_id) DO UPDATE SET phase = excluded.phase, "
                    "reason = excluded.reason, updated = excluded.updated, event_time = excluded.event_time "
                    "WHERE deployment_devices.event_time IS NULL "
                    "OR deployment_devices.event_time <= excluded.event_time",
                    (msg.deployment_id, msg.device_id, msg.kind, msg.reason, received, at,
                     msg.deployment_id))
            self._settle(db, msg.device_id, received, "event")
        self._cache_clock(msg.device_id, msg.boot_id, clock)
        return True

    def record_quality(self, msg: protocol.Quality, received: float, retained: bool = False) -> bool:
        """Store one window's model-quality counts, filed at the controller's time like telemetry; False for a
        redelivery. Raises ``fleet.quality.Refused`` (and counts it in ``quality_refused``) for a message that does
        not fit its bundle: an unknown bundle, one without a profile, another profile id, bins that do not follow
        the profile's layout, a confusion cell outside its classes (``fleet.quality.refusal``)."""
        ref = self.reference(msg.sha256)
        known = ref is not None or bool(self._query("SELECT 1 FROM bundles WHERE sha256 = ?", (msg.sha256,)))
        reason = quality.refusal(msg, known, ref and ref[1], ref and ref[0])
        if reason is not None:
            with self._tx() as db:
                db.execute("INSERT INTO quality_refused (reason, count, last_time) VALUES (?, 1, ?) ON CONFLICT "
                           "(reason) DO UPDATE SET count = count + 1, last_time = excluded.last_time",
                           (reason, received))
            raise quality.Refused(reason)
        c, fb = msg.canary, msg.feedback
        with self._tx() as db:
            clock, at = self._file(db, msg, received, msg.interval_s)
            self._touch(db, msg.device_id, min(at, received) if retained else received)
            canary_time = min(at, at + c.time - msg.time) if c is not None and c.runs and c.time > 0 else None
            cur = db.execute(
                "INSERT OR IGNORE INTO quality (device_id, boot_id, seq, time, device_time, received, interval_s, "
                "sha256, version, deployment_id, profile, served, bins, canary_runs, canary_agree, "
                "canary_max_abs_err, canary_time, labels, confusion, refused) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (msg.device_id, msg.boot_id, msg.seq, at, msg.time, received, msg.interval_s, msg.sha256,
                 msg.version, msg.deployment_id, msg.profile, msg.served, json.dumps(msg.bins),
                 c.runs if c else 0, c.agree if c else 0, c.max_abs_err if c else None, canary_time,
                 fb.labels if fb else 0, json.dumps(fb.confusion if fb else []),
                 json.dumps(fb.refused if fb else {})))
            if not self._count_seq(db, msg.device_id, msg.seq, cur.rowcount == 1):
                return False
            self._save_clock(db, msg.device_id, msg.boot_id, clock, received)
            self._settle(db, msg.device_id, received, "quality")
        self._cache_clock(msg.device_id, msg.boot_id, clock)
        return True

    # -- bundles and deployments ----------------------------------------------------------------
    def add_bundle(self, sha256: str, size: int, manifest: dict[str, Any], signed_by: str | None = None,
                   signer: str | None = None, profile: bytes | None = None) -> None:
        """Record an uploaded bundle; ``signed_by``/``signer``: the key id and name of the release key that signed
        it (None: unsigned, taken under --allow-unsigned); ``profile``: its profile.json (None: it has none), which
        must decode as ``agent.quality.Profile`` (EdgefleetError if not)."""
        text, profile_id = "", ""
        if profile is not None:
            profile_id, text = quality.load_profile(profile).id, profile.decode()
        with self._tx() as db:
            db.execute("INSERT INTO bundles (sha256, size, name, version, target, runtime, precision, manifest, "
                       "uploaded, signed_by, signer, serial, profile, profile_id) "
                       "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) "
                       "ON CONFLICT (sha256) DO UPDATE SET signed_by = coalesce(signed_by, excluded.signed_by), "
                       "signer = coalesce(signer, excluded.signer), profile = coalesce(profile, excluded.profile), "
                       "profile_id = coalesce(profile_id, excluded.profile_id)",
                       (sha256, size, manifest["name"], manifest["version"], manifest["target"],
                        manifest["runtime"], manifest["precision"], json.dumps(manifest), time.time(), signed_by,
                        signer, manifest.get("serial"), text, profile_id))

    def reference(self, sha256: str) -> tuple[str, "quality_.Profile"] | None:
        """(profile id, profile) of a bundle's reference profile; None for an unknown bundle or one without a
        profile. Bundles do not change, so each is decoded once."""
        if sha256 in self._profiles:
            return self._profiles[sha256]
        rows = self._query("SELECT profile, profile_id FROM bundles WHERE sha256 = ?", (sha256,))
        if not rows or rows[0]["profile"] is None:  # unknown, or not read from its file yet: ask again later
            return None
        found = (rows[0]["profile_id"], quality.load_profile(rows[0]["profile"].encode())) if rows[0]["profile"] \
            else None
        with self._lock:
            if len(self._profiles) >= CLOCK_CACHE:
                self._profiles.clear()
            self._profiles[sha256] = found
        return found

    def read_profiles(self, bundles_dir: Path) -> int:
        """Read the reference profile of every bundle stored before the controller kept them (schema 7) from its
        file in ``bundles_dir``; returns how many had one. A file that is gone or unreadable is logged and its
        bundle left without a profile."""
        from agent.bundle import BundleError, read_member

        found = 0
        for (sha,) in self._query("SELECT sha256 FROM bundles WHERE profile IS NULL"):
            data = None
            try:
                data = read_member(Path(bundles_dir) / f"{sha}.tar", quality.PROFILE, quality.MAX_PROFILE_BYTES)
                profile_id = quality.load_profile(data).id if data is not None else ""
            except (BundleError, EdgefleetError) as e:
                log.warning("bundle %s: no reference profile (%s)", sha[:12], e)
                data, profile_id = None, ""
            with self._tx() as db:
                db.execute("UPDATE bundles SET profile = ?, profile_id = ? WHERE sha256 = ?",
                           (data.decode() if data is not None else "", profile_id, sha))
            found += data is not None
        return found

    def bundles(self) -> list[dict[str, Any]]:
        """Every uploaded bundle, newest first, without its manifest."""
        return [dict(r) for r in self._query(
            "SELECT sha256, size, name, version, target, runtime, precision, uploaded, serial, signed_by, signer "
            "FROM bundles ORDER BY uploaded DESC, sha256")]

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


    # -- release keys and signed messages (fleet/keys.py, fleet/signer.py) ------------------------------
    def release_keys(self, include_removed: bool = True) -> list[dict[str, Any]]:
        """The release keys, in the order they were added; ``statement``/``removal`` decoded (or None)."""
        where = "" if include_removed else "WHERE removed IS NULL"
        out = []
        for r in self._query(f"SELECT * FROM release_keys {where} ORDER BY added, keyid"):
            k = dict(r)
            k["statement"] = json.loads(k["statement"]) if k["statement"] else None
            k["removal"] = json.loads(k["removal"]) if k["removal"] else None
            out.append(k)
        return out

    def release_key(self, keyid: str) -> dict[str, Any] | None:
        return next((k for k in self.release_keys() if k["keyid"] == keyid), None)

    def add_release_key(self, keyid: str, name: str, pem: str, added: float,
                        statement: dict[str, Any] | None = None) -> bool:
        """List a key; False when it is listed already (removed or not: nothing changes)."""
        with self._tx() as db:
            cur = db.execute("INSERT OR IGNORE INTO release_keys (keyid, name, pem, added, statement) "
                             "VALUES (?, ?, ?, ?, ?)",
                             (keyid, name, pem, added, json.dumps(statement) if statement else None))
            return cur.rowcount == 1

    def remove_release_key(self, keyid: str, removed: float, removal: dict[str, Any]) -> bool:
        """Mark a listed key removed, with the controller's signed statement; False if none is listed and active."""
        with self._tx() as db:
            cur = db.execute("UPDATE release_keys SET removed = ?, removal = ? WHERE keyid = ? AND removed IS NULL",
                             (removed, json.dumps(removal), keyid))
            return cur.rowcount == 1

    def next_counter(self, device_id: str, now: float) -> int:
        """The counter for the next message signed for this device: above every earlier one, and at least the
        time in ms (so a restored database does not go back)."""
        with self._tx() as db:
            return db.execute(
                "INSERT INTO signed (device_id, counter) VALUES (?1, ?2) ON CONFLICT (device_id) DO UPDATE SET "
                "counter = max(counter + 1, ?2) RETURNING counter", (device_id, int(now * 1000))).fetchone()[0]

    def set_signed_desired(self, device_id: str, desired: str, issued: float, expires: float, trust: str) -> None:
        """The desired (unsigned JSON) just published to the device, when its signed copy expires, and a digest
        of the trust list it carried."""
        with self._tx() as db:
            db.execute("INSERT INTO signed (device_id, desired, issued, expires, trust) VALUES (?, ?, ?, ?, ?) "
                       "ON CONFLICT (device_id) DO UPDATE SET desired = excluded.desired, issued = excluded.issued, "
                       "expires = excluded.expires, trust = excluded.trust",
                       (device_id, desired, issued, expires, trust))

    def signed_desired(self, device_id: str) -> dict[str, Any] | None:
        rows = self._query("SELECT * FROM signed WHERE device_id = ?", (device_id,))
        return dict(rows[0]) if rows else None

    def signed_desireds(self, due_before: float | None = None, trust_not: str | None = None
                        ) -> list[dict[str, Any]]:
        """Devices with a retained desired: all, or those expiring before ``due_before`` or carrying another trust
        list than ``trust_not``."""
        conds, args = [], []
        if due_before is not None:
            conds.append("expires < ?")
            args.append(due_before)
        if trust_not is not None:
            conds.append("trust IS NOT ?")
            args.append(trust_not)
        where = f" AND ({' OR '.join(conds)})" if conds else ""
        rows = self._query(f"SELECT * FROM signed WHERE desired IS NOT NULL{where} ORDER BY device_id", tuple(args))
        return [dict(r) for r in rows]

    # -- identities: certificates, enrollment tokens, revocations (fleet/enroll.py) --------------------
    def add_certificate(self, serial: int, device_id: str, fingerprint: str, not_before: float, not_after: float,
                        kind: str) -> None:
        with self._tx() as db:
            db.execute("INSERT INTO certificates (serial, device_id, fingerprint, not_before, not_after, issued, "
                       "kind) VALUES (?, ?, ?, ?, ?, ?, ?)",
                       (format(serial, "x"), device_id, fingerprint, not_before, not_after, time.time(), kind))

    def certificate(self, serial: int) -> dict[str, Any] | None:
        rows = self._query("SELECT * FROM certificates WHERE serial = ?", (format(serial, "x"),))
        return dict(rows[0]) if rows else None

    def certificates(self, device_id: str | None = None, limit: int = 1000) -> list[dict[str, Any]]:
        where, args = ("WHERE device_id = ?", (device_id,)) if device_id else ("", ())
        return [dict(r) for r in self._query(f"SELECT * FROM certificates {where} ORDER BY issued DESC LIMIT ?",
                                             (*args, limit))]

    def enrolled_ids(self, now: float | None = None, device_id: str | None = None) -> set[str]:
        """Device ids (or only ``device_id``) holding a device certificate that is neither revoked nor expired."""
        now = time.time() if now is None else now
        where, args = ("AND device_id = ?", (device_id,)) if device_id is not None else ("", ())
        return {r[0] for r in self._query("SELECT DISTINCT device_id FROM certificates WHERE revoked IS NULL AND "
                                          f"not_after > ? AND kind != 'kick' {where}", (now, *args))}

    def revoke_certificates(self, device_id: str, reason: str, serials: list[int] | None = None,
                            keep: int | None = None, now: float | None = None) -> list[str]:
        """Revoke the device's unrevoked certificates (only ``serials``, or all but ``keep``); returns the
        serials revoked."""
        now = time.time() if now is None else now
        with self._tx() as db:
            rows = db.execute("SELECT serial FROM certificates WHERE device_id = ? AND revoked IS NULL",
                              (device_id,)).fetchall()
            wanted = None if serials is None else {format(s, "x") for s in serials}
            hit = [r[0] for r in rows if (wanted is None or r[0] in wanted)
                   and (keep is None or r[0] != format(keep, "x"))]
            db.executemany("UPDATE certificates SET revoked = ?, reason = ? WHERE serial = ?",
                           [(now, reason, s) for s in hit])
        return hit

    def revoke_device(self, device_id: str, by: str, now: float | None = None) -> list[str]:
        """Mark the device id revoked (the broker denies it everything) and revoke its certificates."""
        now = time.time() if now is None else now
        with self._tx() as db:
            db.execute("INSERT INTO revoked_devices (device_id, time, by) VALUES (?, ?, ?) "
                       "ON CONFLICT (device_id) DO UPDATE SET time = excluded.time, by = excluded.by",
                       (device_id, now, by))
        return self.revoke_certificates(device_id, f"revoked by {by}", now=now)

    def readmit_device(self, device_id: str) -> None:
        """An administrator enrolled a revoked device id again."""
        with self._tx() as db:
            db.execute("DELETE FROM revoked_devices WHERE device_id = ?", (device_id,))

    def revoked_device_ids(self) -> list[str]:
        return [r[0] for r in self._query("SELECT device_id FROM revoked_devices ORDER BY device_id")]

    def revoked_serials(self, now: float | None = None) -> list[tuple[int, float]]:
        """(serial, revocation time) of revoked certificates that have not expired yet: what the CRL lists."""
        now = time.time() if now is None else now
        return [(int(r[0], 16), r[1]) for r in self._query(
            "SELECT serial, revoked FROM certificates WHERE revoked IS NOT NULL AND not_after > ? ORDER BY revoked",
            (now,))]

    def add_enrollment(self, token_id: str, token_hash: str, kind: str, device_id: str | None, prefix: str,
                       uses: int, expires: float, created_by: str) -> None:
        with self._tx() as db:
            db.execute("INSERT INTO enrollments (id, token_hash, kind, device_id, prefix, uses_left, created, "
                       "expires, created_by) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                       (token_id, token_hash, kind, device_id, prefix, uses, time.time(), expires, created_by))

    def take_enrollment(self, token_hash: str, now: float) -> dict[str, Any] | None:
        """Use one enrollment of the token with this hash: its row (as it was), or None when there is no such
        token or it is revoked, expired or used up."""
        with self._tx() as db:
            row = db.execute("SELECT * FROM enrollments WHERE token_hash = ?", (token_hash,)).fetchone()
            if row is None or row["revoked"] is not None or row["expires"] <= now or row["uses_left"] <= 0:
                return None
            db.execute("UPDATE enrollments SET uses_left = uses_left - 1, used = used + 1 WHERE id = ?", (row["id"],))
            return dict(row)

    def return_enrollment(self, token_id: str) -> None:
        """Give back a use that ended in a refusal (an id already taken, a bad CSR)."""
        with self._tx() as db:
            db.execute("UPDATE enrollments SET uses_left = uses_left + 1, used = used - 1 WHERE id = ?", (token_id,))

    def enrollments(self) -> list[dict[str, Any]]:
        return [dict(r) for r in self._query(
            "SELECT id, kind, device_id, prefix, uses_left, used, created, expires, created_by, revoked "
            "FROM enrollments ORDER BY created DESC")]

    def revoke_enrollment(self, token_id: str, now: float | None = None) -> bool:
        with self._tx() as db:
            cur = db.execute("UPDATE enrollments SET revoked = ? WHERE id = ? AND revoked IS NULL",
                             (time.time() if now is None else now, token_id))
            return cur.rowcount == 1

    def identity_conflicts(self, now: float | None = None) -> dict[str, dict[str, Any]]:
        """Device id -> its identity conflict (first/last takeover, count, the boot ids seen), while one is recent."""
        now = time.time() if now is None else now
        return {r["id"]: {"since": r["conflict_first"], "last": r["conflict_last"], "takeovers": r["conflicts"],
                          "boot_ids": json.loads(r["boots"])}
                for r in self._query("SELECT id, conflicts, conflict_first, conflict_last, boots FROM devices "
                                     "WHERE conflict_last > ?", (now - health.CONFLICT_QUIET_S,))}

    # -- tags ---------------------------------------------------------------------------------------
    def device_ids(self, tag: str | None = None) -> list[str]:
        """Every registered device id, or those carrying ``tag``, sorted."""
        if tag is None:
            return [r[0] for r in self._query("SELECT id FROM devices ORDER BY id")]
        return [r[0] for r in self._query("SELECT device_id FROM device_tags WHERE tag = ? ORDER BY device_id",
                                          (tag,))]

    def tags(self, device_id: str | None = None) -> dict[str, list[str]]:
        """device id -> its tags (sorted), for every device or one."""
        where, args = ("WHERE device_id = ?", (device_id,)) if device_id is not None else ("", ())
        out: dict[str, list[str]] = {}
        for r in self._query(f"SELECT device_id, tag FROM device_tags {where} ORDER BY device_id, tag", args):
            out.setdefault(r[0], []).append(r[1])
        return out

    def set_tags(self, device_id: str, add: list[str] = (), remove: list[str] = (),
                 replace: list[str] | None = None) -> list[str] | None:
        """Add and remove tags (or ``replace`` them all); the device's tags after, or None for an unknown device.
        A malformed tag raises ``targets.TargetError``."""
        for t in (*add, *remove, *(replace or ())):
            targets.check_tag(t)
        with self._tx() as db:
            if db.execute("SELECT 1 FROM devices WHERE id = ?", (device_id,)).fetchone() is None:
                return None
            if replace is not None:
                db.execute("DELETE FROM device_tags WHERE device_id = ?", (device_id,))
                add = replace
            db.executemany("DELETE FROM device_tags WHERE device_id = ? AND tag = ?",
                           [(device_id, t) for t in remove])
            db.executemany("INSERT OR IGNORE INTO device_tags (device_id, tag) VALUES (?, ?)",
                           [(device_id, t) for t in add])
            return [r[0] for r in db.execute("SELECT tag FROM device_tags WHERE device_id = ? ORDER BY tag",
                                             (device_id,))]

    # -- what the API shows ---------------------------------------------------------------------
    def device_count(self) -> int:
        return self._query("SELECT count(*) FROM devices")[0][0]

    def devices(self, ids: list[str] | None = None) -> list[dict[str, Any]]:
        """Every device's registry row (or those in ``ids``), with its tags and whether it is online."""
        now, tags = time.time(), self.tags()
        wanted = None if ids is None else set(ids)
        out = []
        for r in self._query("SELECT * FROM devices ORDER BY id"):
            if wanted is not None and r["id"] not in wanted:
                continue
            d = {k: r[k] for k in r.keys() if k not in _INTERNAL}
            d["cpu_flags"], d["runtimes"] = json.loads(d["cpu_flags"]), json.loads(d["runtimes"])
            d["active_serving"] = json.loads(d["active_serving"]) if d["active_serving"] else None
            d["runtime_devices"] = json.loads(d["runtime_devices"])
            d["online"] = self.is_online(r, now)
            d["clock_synced"] = None if r["clock_synced"] is None else bool(r["clock_synced"])
            d["tags"] = tags.get(r["id"], [])
            out.append(d)
        return out

    def disk_reports(self, ids: list[str]) -> dict[str, dict[str, Any]]:
        """Device id -> what it last said of its disk: {"disk_free_bytes", "disk_time", "storage"} (a device that
        never sent telemetry has null figures); unknown ids are left out."""
        wanted = set(ids)
        return {r["id"]: {"disk_free_bytes": r["disk_free_bytes"], "disk_time": r["disk_time"], "storage": r["storage"]}
                for r in self._query("SELECT id, disk_free_bytes, disk_time, storage FROM devices ORDER BY id")
                if r["id"] in wanted}

    def health(self, device_id: str | None = None, now: float | None = None, tag: str | None = None,
               status: str | None = None, sort: str | None = None, descending: bool | None = None
               ) -> list[dict[str, Any]]:
        """Every device's health entry, or one's; filters and sorting as ``fleet.health.entries`` says."""
        return health.entries(self, device_id, now, tag, status, sort, descending)

    def device_detail(self, device_id: str, events: int = 20, transitions: int = 50) -> dict[str, Any] | None:
        """One device's report (``fleet.health.report``), or None for an unknown device."""
        return health.report(self, device_id, events, transitions)

    def series(self, device_id: str, since: float, until: float, step: float | None = None) -> list[dict[str, Any]]:
        """One device's telemetry over [since, until] from raw rows and rollups alike: see
        ``fleet.retention.series`` for the points' fields."""
        return retention.series(self, device_id, since, until, step)

    # -- operators: tokens, dashboard sessions, the audit trail (fleet/auth.py) ---------------------------
    _TOKEN = "id, name, role, created, last_used, revoked"

    def add_token(self, name: str, role: str, token_hash: str, now: float) -> dict[str, Any] | None:
        """A new token (only its hash is stored); None when an active token already has that name."""
        with self._tx() as db:
            if db.execute("SELECT 1 FROM tokens WHERE name = ? AND revoked IS NULL", (name,)).fetchone():
                return None
            cur = db.execute("INSERT INTO tokens (name, role, hash, created) VALUES (?, ?, ?, ?)",
                             (name, role, token_hash, now))
            return dict(db.execute(f"SELECT {self._TOKEN} FROM tokens WHERE id = ?", (cur.lastrowid,)).fetchone())

    def tokens(self) -> list[dict[str, Any]]:
        """Every token, active and revoked, oldest first (never their hashes)."""
        return [dict(r) for r in self._query(f"SELECT {self._TOKEN} FROM tokens ORDER BY id")]

    def active_token(self, token_hash: str) -> dict[str, Any] | None:
        rows = self._query(f"SELECT {self._TOKEN} FROM tokens WHERE hash = ? AND revoked IS NULL", (token_hash,))
        return dict(rows[0]) if rows else None

    def has_active_token(self, role: str) -> bool:
        return bool(self._query("SELECT 1 FROM tokens WHERE role = ? AND revoked IS NULL LIMIT 1", (role,)))

    def token_used(self, token_id: int, now: float) -> None:
        with self._tx() as db:
            db.execute("UPDATE tokens SET last_used = ? WHERE id = ?", (now, token_id))

    def revoke_token(self, name: str, now: float) -> dict[str, Any] | None:
        """Revoke the active token called ``name`` and end its sessions; None when there is none."""
        with self._tx() as db:
            row = db.execute("SELECT id FROM tokens WHERE name = ? AND revoked IS NULL", (name,)).fetchone()
            if row is None:
                return None
            db.execute("UPDATE tokens SET revoked = ? WHERE id = ?", (now, row[0]))
            db.execute("DELETE FROM sessions WHERE token_id = ?", (row[0],))
            return dict(db.execute(f"SELECT {self._TOKEN} FROM tokens WHERE id = ?", (row[0],)).fetchone())

    def add_session(self, session_hash: str, token_id: int, now: float, expires: float) -> None:
        with self._tx() as db:
            db.execute("DELETE FROM sessions WHERE expires <= ?", (now,))
            db.execute("INSERT INTO sessions (hash, token_id, created, expires) VALUES (?, ?, ?, ?)",
                       (session_hash, token_id, now, expires))

    def session(self, session_hash: str, now: float) -> dict[str, Any] | None:
        """The unexpired session with this hash and its (active) token: {"token_id", "name", "role", "expires"}."""
        rows = self._query("SELECT t.id AS token_id, t.name, t.role, s.expires FROM sessions s "
                           "JOIN tokens t ON t.id = s.token_id WHERE s.hash = ? AND s.expires > ? "
                           "AND t.revoked IS NULL", (session_hash, now))
        return dict(rows[0]) if rows else None

    def end_session(self, session_hash: str) -> None:
        with self._tx() as db:
            db.execute("DELETE FROM sessions WHERE hash = ?", (session_hash,))

    def add_audit(self, now: float, actor: str, action: str, target: str = "", status: int | None = None,
                  remote: str = "", detail: str = "") -> None:
        with self._tx() as db:
            db.execute("INSERT INTO audit (time, actor, action, target, status, remote, detail) "
                       "VALUES (?, ?, ?, ?, ?, ?, ?)", (now, actor, action, target, status, remote, detail))

    def audit(self, limit: int = 100, before: int | None = None) -> list[dict[str, Any]]:
        """The audit trail, newest first: ``limit`` rows with an id below ``before`` (the previous page's last)."""
        where, args = ("WHERE id < ?", (before,)) if before is not None else ("", ())
        return [dict(r) for r in self._query(f"SELECT * FROM audit {where} ORDER BY id DESC LIMIT ?",
                                             (*args, limit))]

    # -- batched ingest (a stand-in: the store package records a batch in one transaction) ---------------------
    def record_many(self, items: list[tuple[protocol.Message, float, bool]]) -> list[bool | str]:
        """Record (msg, received, retained) items; per item True (stored), False (a duplicate) or the reason a
        quality message was refused (``quality.Refused``). Any other error propagates."""
        record = {protocol.State: self.record_state, protocol.Telemetry: self.record_telemetry,
                  protocol.Event: self.record_event, protocol.Quality: self.record_quality}
        out: list[bool | str] = []
        for msg, received, retained in items:
            try:
                out.append(record[type(msg)](msg, received, retained) is not False)
            except quality.Refused as e:
                out.append(str(e))
        return out
