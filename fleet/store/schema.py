"""Every table of the controller's database and every migration, in one place, with the version table.

SQLite: a new file gets the schema-2 tables and then each migration in turn, as every release since schema 2
did, so a file made by any earlier release opens at the current version with its data (``MIGRATIONS``).
PostgreSQL: the same tables at the current version, made in one go: ``postgres_ddl()`` derives them from the
SQLite chain (run on an in-memory database: ``sqlite_master`` holds each table as the migrations left it), with
PostgreSQL's types, so the two cannot drift apart; telemetry is range-partitioned by time there (see
``fleet.store.backend``). A migration after the current version is added to both: a SQLite statement list in
``MIGRATIONS`` and, when the derived DDL does not fit, its PostgreSQL form in ``PG_MIGRATIONS``.
"""

from __future__ import annotations

import calendar
import logging
import re
import sqlite3
import time
from typing import Any

from agent.errors import EdgefleetError

log = logging.getLogger("edgefleet.fleet.store")

SCHEMA_VERSION = 10
ROLLUP_TABLES = ("telemetry_1m", "telemetry_1h")  # fleet.retention.TIERS: 1-minute and 1-hour rollups
SEQ_TABLES = ("telemetry", "events", "quality")  # the messages that take a seq from the device's one counter

# The rollup tables (fleet/retention.py folds raw telemetry into them).
ROLLUP_DDL = """
CREATE TABLE {table} (
    device_id TEXT NOT NULL REFERENCES devices(id),
    bucket REAL NOT NULL,
    windows INTEGER NOT NULL,
    interval_s REAL NOT NULL,
    inferences INTEGER NOT NULL,
    errors INTEGER NOT NULL,
    errors_by_kind TEXT NOT NULL,
    lat_windows INTEGER NOT NULL,
    lat_n INTEGER NOT NULL,
    lat_sum REAL NOT NULL,
    lat_max REAL,
    lat_nohist INTEGER NOT NULL,
    histogram TEXT,
    p50_sum REAL NOT NULL,
    p95_max REAL, p99_max REAL,
    p50 REAL, p95 REAL, p99 REAL,
    cpu_sum REAL NOT NULL, cpu_max REAL,
    rss_sum REAL NOT NULL, rss_max INTEGER,
    mem_sum REAL NOT NULL, mem_max REAL,
    temp_n INTEGER NOT NULL, temp_sum REAL NOT NULL, temp_max REAL,
    PRIMARY KEY (device_id, bucket)
)
"""
ROLLUP_COLUMNS = ("device_id", "bucket", "windows", "interval_s", "inferences", "errors", "errors_by_kind",
                  "lat_windows", "lat_n", "lat_sum", "lat_max", "lat_nohist", "histogram", "p50_sum", "p95_max",
                  "p99_max", "p50", "p95", "p99", "cpu_sum", "cpu_max", "rss_sum", "rss_max", "mem_sum", "mem_max",
                  "temp_n", "temp_sum", "temp_max")

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
""" + ";".join(ROLLUP_DDL.format(table=table) for table in ROLLUP_TABLES) + """;
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

# Rollouts (fleet/rollouts.py): each rollout as JSON with the publishes it asked for and the broker has not taken.
# Before schema 9 the driver made this table itself when it started, so it may be there already.
_V8_TO_V9 = """
CREATE TABLE IF NOT EXISTS rollouts (
    id TEXT PRIMARY KEY,
    created REAL NOT NULL,
    updated REAL NOT NULL,
    status TEXT NOT NULL,
    doc TEXT NOT NULL,
    outbox TEXT NOT NULL DEFAULT '[]'
);
CREATE INDEX IF NOT EXISTS rollouts_status ON rollouts (status);
UPDATE schema_version SET version = 9
"""
# Reads at fleet scale (fleet/store/pages.py): a page's devices find their newest deployment by device id, and
# the listings' model and version filters (and the figures' GROUP BY) find a model's devices without a scan.
_V9_TO_V10 = """
CREATE INDEX IF NOT EXISTS deployment_devices_device ON deployment_devices (device_id);
CREATE INDEX IF NOT EXISTS devices_active ON devices (active_name, active_version);
UPDATE schema_version SET version = 10
"""
MIGRATIONS = {1: _V1_TO_V2, 2: _V2_TO_V3, 3: _V3_TO_V4, 4: _V4_TO_V5, 5: _V5_TO_V6, 6: _V6_TO_V7, 7: _V7_TO_V8,
              8: _V8_TO_V9, 9: _V9_TO_V10}
# version -> its PostgreSQL statements (schema 9 is the first there; a new database is made at SCHEMA_VERSION)
PG_MIGRATIONS: dict[int, str] = {9: _V9_TO_V10}
BASE_VERSION = 2  # what ``BASE`` makes


def statements(script: str) -> list[str]:
    return [s for s in (s.strip() for s in script.split(";")) if s]


BASE = _SCHEMA_V2
PARTITIONED = "telemetry"  # PostgreSQL: range-partitioned by time; (device_id, boot_id, seq) kept in telemetry_keys
_RESERVED = ("by",)  # column names PostgreSQL reserves: quoted in its DDL and in the queries that name them


def sqlite_current() -> sqlite3.Connection:
    """An in-memory SQLite database at the current version (the base schema and every migration)."""
    db = sqlite3.connect(":memory:")
    for stmt in statements(BASE):
        db.execute(stmt)
    db.execute("INSERT INTO schema_version VALUES (?)", (BASE_VERSION,))
    for v in range(BASE_VERSION, SCHEMA_VERSION):
        for stmt in statements(MIGRATIONS[v]):
            db.execute(stmt)
    return db


def _pg_types(sql: str) -> str:
    sql = re.sub(r"\bid INTEGER PRIMARY KEY\b", "id BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY", sql)
    sql = re.sub(r"\bREAL\b", "DOUBLE PRECISION", sql)
    sql = re.sub(r"\bINTEGER\b", "BIGINT", sql)
    for word in _RESERVED:
        sql = re.sub(rf"(?<![\w\"]){word} TEXT", f'"{word}" TEXT', sql)
    return sql


def postgres_ddl() -> list[str]:
    """The current schema as PostgreSQL statements (tables, then indexes), telemetry partitioned by time."""
    db = sqlite_current()
    try:
        rows = db.execute("SELECT type, name, tbl_name, sql FROM sqlite_master WHERE sql IS NOT NULL "
                          "ORDER BY type DESC, rowid").fetchall()  # tables before indexes, in creation order
    finally:
        db.close()
    out = []
    for kind, name, table, sql in rows:
        sql = _pg_types(sql)
        if kind == "table" and name == PARTITIONED:
            # A unique key of a partitioned table must hold the partition key: dedupe is telemetry_keys' job.
            sql = sql.replace("id BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY",
                              "id BIGINT GENERATED BY DEFAULT AS IDENTITY")
            sql = re.sub(r",\s*UNIQUE \(device_id, boot_id, seq\)", "", sql)
            sql += " PARTITION BY RANGE (time)"
            out.append(sql)
            out.append("CREATE TABLE telemetry_keys (device_id TEXT NOT NULL, boot_id TEXT NOT NULL, "
                       "seq BIGINT NOT NULL, time DOUBLE PRECISION NOT NULL, PRIMARY KEY (device_id, boot_id, seq))")
            out.append("CREATE INDEX telemetry_keys_time ON telemetry_keys (time)")
            out.append("CREATE TABLE telemetry_default PARTITION OF telemetry DEFAULT")
            continue
        out.append(sql)
    return out


# -- applying it ----------------------------------------------------------------------------------------------
PARTITION_S = 86400  # PostgreSQL: one telemetry partition a day (UTC), made PARTITIONS_AHEAD days ahead
PARTITIONS_AHEAD = 3


def migrate(backend: Any) -> None:
    """Bring the database to SCHEMA_VERSION (a new one is made at it); EdgefleetError for a newer one. On
    PostgreSQL several controllers may start at once: a transaction-scoped advisory lock lets one migrate."""
    pg = backend.name == "postgresql"
    with backend.tx() as db:
        if pg:
            db.execute("SELECT pg_advisory_xact_lock(hashtext('edgefleet-schema'))")
        if not backend.has_table(db, "schema_version"):
            if pg:
                for stmt in postgres_ddl():
                    db.execute(stmt)
                db.execute("INSERT INTO schema_version VALUES (?)", (SCHEMA_VERSION,))
            else:  # a new file: the v2 schema, then the migrations from there
                for stmt in statements(BASE):
                    db.execute(stmt)
                db.execute("INSERT INTO schema_version VALUES (?)", (BASE_VERSION,))
        version = db.execute("SELECT version FROM schema_version").fetchone()[0]
        steps = PG_MIGRATIONS if pg else MIGRATIONS
        while version < SCHEMA_VERSION and version in steps:
            for stmt in statements(steps[version]):
                db.execute(stmt)
            version += 1
        if version != SCHEMA_VERSION:
            raise EdgefleetError(f"{backend.describe()} has schema version {version}; this edgefleet "
                                 f"understands {SCHEMA_VERSION}")
    if pg:
        ensure_partitions(backend, time.time())


def partition_name(start: float) -> str:
    return "telemetry_" + time.strftime("%Y%m%d", time.gmtime(start))


def ensure_partitions(backend: Any, now: float, ahead: int = PARTITIONS_AHEAD) -> list[str]:
    """PostgreSQL: the daily telemetry partitions from today's to ``ahead`` days on (those missing); returns
    the ones made. A day whose rows already went to the default partition is left to it."""
    made = []
    day0 = int(now // PARTITION_S) * PARTITION_S
    with backend.tx() as db:
        have = {r[0] for r in db.execute(
            "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid "
            "JOIN pg_class p ON p.oid = i.inhparent WHERE p.relname = 'telemetry'")}
    for k in range(ahead + 1):
        lo = day0 + k * PARTITION_S
        name = partition_name(lo)
        if name in have:
            continue
        try:
            with backend.tx() as db:
                db.execute(f"CREATE TABLE IF NOT EXISTS {name} PARTITION OF telemetry "
                           f"FOR VALUES FROM ({lo}) TO ({lo + PARTITION_S})")
            made.append(name)
        except Exception as e:  # e.g. the default partition holds rows of that day
            log.warning("telemetry partition %s not made: %s", name, str(e).strip().splitlines()[0])
    return made


def partitions(backend: Any) -> list[tuple[str, float, float]]:
    """PostgreSQL: (name, from, to) of each daily telemetry partition, oldest first (not the default one)."""
    out = []
    for (name,) in backend.query(
            "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid "
            "JOIN pg_class p ON p.oid = i.inhparent WHERE p.relname = 'telemetry'"):
        m = re.fullmatch(r"telemetry_(\d{8})", name)
        if m:
            lo = calendar.timegm(time.strptime(m.group(1), "%Y%m%d"))
            out.append((name, float(lo), float(lo + PARTITION_S)))
    return sorted(out, key=lambda p: p[1])
