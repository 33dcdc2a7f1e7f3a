"""The registry: devices, telemetry, events, bundles and deployments, in a SQLite file (WAL) or a PostgreSQL
database (``fleet.store.backend``: what differs between the two is there, the tables in ``fleet.store.schema``).

Paho's network thread writes what devices report while uvicorn's threads read and write for the API: on SQLite
every call goes through one connection guarded by a lock; on PostgreSQL through a pool, and other controller
processes may write the same database, so nothing another process writes is trusted from memory (the clock
cache is SQLite's only). A QoS 1 message may arrive twice: telemetry and events are keyed by (device_id,
boot_id, seq) and a repeat changes nothing but the device's ``duplicates`` count. ``record_many`` stores a batch
of messages in one transaction; the telemetry of devices that sent nothing else in the batch set-based (their rows,
clocks and stored keys read in a few statements, each message folded in Python as the one-message path would store
it, one multi-row statement per table written: ``_windows``), the rest one message at a time.

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
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from agent import protocol
from agent.errors import EdgefleetError
from fleet import clock as clocks
from fleet import health, quality, retention, targets
from fleet.store import schema
from fleet.store.backend import open_backend
from fleet.store.pages import Pages
from fleet.store.reads import Reads
from fleet.store.schema import SEQ_TABLES
from fleet.store.upkeep import Upkeep

if TYPE_CHECKING:
    from agent import quality as quality_

log = logging.getLogger("edgefleet.fleet.store")

DEFAULT_INTERVAL_S = 10.0
OFFLINE_AFTER_INTERVALS = 3
CLONE_BOOTS = 8  # the boot ids remembered per device for clone detection
_INTERNAL = {"boots", "conflicts", "conflict_first", "conflict_last",  # health reports the identity conflict
             "storage_time", "disk_time"}  # bookkeeping: the (corrected) time of the report each figure came from
MAX_CLOCK_OFFSET_S = 300.0  # a device whose clock is further off than this is flagged (fleet serve --max-clock-offset)
CLOCK_CACHE = 100_000  # boots whose clock estimate is kept in memory too (the table is the truth)
_T, _I, _F = "text", "bigint", "double precision"  # column types for Backend.insert_many
PHASES = {"downloading", "verifying", "activating", "active", "failed", "rolled_back"}


class Store(Reads, Pages, Upkeep):
    """The controller's registry in the database at ``url`` (``sqlite:///PATH``, a plain path, or
    ``postgresql://USER@HOST:PORT/DB``: ``fleet.store.backend``); safe to call from any thread.

    ``offline_after``: how many telemetry intervals of silence make a device offline; ``max_clock_offset_s``:
    how far off a device's clock may be before health flags it; ``opts`` go to the backend (PostgreSQL:
    ``min_size``, ``max_size``, ``connect_timeout``)."""

    def __init__(self, url: str | Path, offline_after: float = OFFLINE_AFTER_INTERVALS,
                 max_clock_offset_s: float = MAX_CLOCK_OFFSET_S, **opts: Any) -> None:
        if not offline_after > 0:
            raise EdgefleetError(f"offline_after must be a positive number of intervals (got {offline_after})")
        if not max_clock_offset_s > 0:
            raise EdgefleetError(f"the clock offset bound must be a positive number of seconds "
                                 f"(got {max_clock_offset_s})")
        self.backend = open_backend(url, **opts)
        self.path = getattr(self.backend, "path", None)  # SQLite's file (None on PostgreSQL)
        self.offline_after = float(offline_after)
        self.max_clock_offset_s = float(max_clock_offset_s)
        self._lock = self.backend.lock  # SQLite: the lock every transaction holds, so the caches move with it
        # Only a SQLite file has one writer process: on PostgreSQL other controllers write the clocks too, so
        # each message reads its boot's clock from the table (under a row lock) and nothing is cached.
        self._cache_clocks = self.backend.name == "sqlite"
        self._clocks: dict[tuple[str, str], clocks.Clock] = {}  # (device, boot) -> as last saved
        self._profiles: dict[str, Any] = {}  # bundle sha256 -> (profile id, Profile) or None (it has none)

    # -- lifecycle -----------------------------------------------------------------------------
    def open(self) -> "Store":
        self.backend.open()
        try:
            self._migrate()
        except BaseException as e:
            self.close()
            if type(e).__name__ in ("DatabaseError", "OperationalError") and not isinstance(e, EdgefleetError):
                raise EdgefleetError(f"cannot open the fleet database {self.backend.describe()}: {e}") from None
            raise
        return self

    def close(self) -> None:
        self.backend.close()

    def _migrate(self) -> None:
        schema.migrate(self.backend)

    @contextlib.contextmanager
    def _tx(self) -> Iterator[Any]:
        """One write transaction (SQLite: under the lock)."""
        with self.backend.tx() as db:
            yield db

    def _query(self, sql: str, args: tuple = ()) -> list[Any]:
        return self.backend.query(sql, args)

    # the tests' way in (and the store's modules'); nothing outside fleet/store/ writes SQL
    tx = _tx
    query = _query

    def try_leader(self, name: str) -> bool:
        """Whether this controller is (now) the one that runs ``name`` (the rollout driver, the sweep, retention):
        a PostgreSQL advisory lock on a connection of its own, taken over by another controller when this one
        dies; always True on SQLite (one controller per file)."""
        return self.backend.try_leader(name)

    def release_leader(self) -> None:
        self.backend.release_leader()

    def exclusive(self, name: str, timeout_s: float = 60.0) -> Any:
        """A context manager: the lock ``name`` across every controller process on this database (PostgreSQL: an
        advisory lock on a pooled connection, gone with its session if the process dies; SQLite: nothing, one
        process owns the file)."""
        return self.backend.exclusive(name, timeout_s)

    # -- online / offline ---------------------------------------------------------------------------
    def _limit(self, d: Any) -> float:
        return self.offline_after * (d["interval_s"] or DEFAULT_INTERVAL_S)

    def is_online(self, d: Any, now: float) -> bool:
        """Online unless the last state said offline (the last will) or nothing came for offline_after intervals."""
        return bool(d["online"]) and now - d["last_seen"] <= self._limit(d)

    def _settle(self, db: Any, device_id: str, now: float, reason: str) -> None:
        """Record a transition if the device's status is not what was last recorded. On PostgreSQL the row is
        locked first: two controllers sweeping at once record one transition, not two."""
        lock = "" if self._cache_clocks else " FOR UPDATE"
        d = db.execute(f"SELECT online, last_seen, interval_s, status_online FROM devices WHERE id = ?{lock}",
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
                "SELECT id FROM devices WHERE status_online IS DISTINCT FROM 0 AND (online = 0 OR "
                "? - last_seen > ? * coalesce(interval_s, ?)) ORDER BY id",  # id order: as record_many locks
                (now, self.offline_after, DEFAULT_INTERVAL_S))]
            for device_id in ids:
                self._settle(db, device_id, now, "heartbeat timeout")
        self.refile()
        return len(ids)

    # -- what devices report --------------------------------------------------------------------
    def _touch(self, db: Any, device_id: str, seen: float) -> None:
        """Register a device on the first message of any kind; move last_seen forward."""
        db.execute("INSERT INTO devices (id, first_seen, last_seen) VALUES (?, ?, ?) "
                   "ON CONFLICT (id) DO UPDATE SET last_seen = GREATEST(devices.last_seen, excluded.last_seen)",
                   (device_id, seen, seen))

    # -- clocks: what is filed where on the controller's time line (fleet/clock.py) ------------------------
    def _clock(self, db: Any, device_id: str, boot_id: str) -> clocks.Clock | None:
        """A boot's clock (SQLite: from the cache of those in use, else the table; PostgreSQL: from the table,
        its row locked until the transaction ends, as another controller may be filing the same boot)."""
        clock = self._clocks.get((device_id, boot_id)) if self._cache_clocks else None
        if clock is None:
            lock = "" if self._cache_clocks else " FOR UPDATE"
            row = db.execute(f"SELECT state FROM clocks WHERE device_id = ? AND boot_id = ?{lock}",
                             (device_id, boot_id)).fetchone()
            clock = clocks.Clock.load(row[0]) if row else None
        return clock

    def _cache_clock(self, device_id: str, boot_id: str, clock: clocks.Clock) -> None:
        """Once its transaction committed: the clock as the table has it (unless a message taken in since has
        cached a newer one)."""
        if not self._cache_clocks:
            return
        with self._lock:
            if len(self._clocks) >= CLOCK_CACHE:
                self._clocks.clear()
            self._clocks.setdefault((device_id, boot_id), clock)

    _SAVE_CLOCK = ("INSERT INTO clocks (device_id, boot_id, offset_s, jumps, updated, dirty, state) "
                   "VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (device_id, boot_id) DO UPDATE SET "
                   "offset_s = excluded.offset_s, jumps = excluded.jumps, dirty = excluded.dirty, "
                   "updated = GREATEST(clocks.updated, excluded.updated), state = excluded.state")

    @staticmethod
    def _clock_row(device_id: str, boot_id: str, clock: clocks.Clock, received: float) -> tuple:
        dirty = int(any(r.needs_refile for r in clock.regimes))
        return (device_id, boot_id, float(clock.offset), int(clock.jumps), received, dirty, clock.dump().decode())

    @classmethod
    def _save_clock(cls, db: Any, device_id: str, boot_id: str, clock: clocks.Clock,
                    received: float) -> None:
        db.execute(cls._SAVE_CLOCK, cls._clock_row(device_id, boot_id, clock, received))

    def _corrected(self, db: Any, device_id: str, boot_id: str, sent: float, received: float) -> float:
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
            lock = "" if self._cache_clocks else " FOR UPDATE SKIP LOCKED"
            for device_id, boot_id, state in db.execute(
                    f"SELECT device_id, boot_id, state FROM clocks WHERE dirty = 1{lock}").fetchall():
                clock = clocks.Clock.load(state)
                for r in clock.regimes:
                    if not r.needs_refile:
                        continue
                    lo, hi = clock.span(r)
                    for table in SEQ_TABLES:
                        moved += db.execute(
                            f"UPDATE {table} SET time = device_time + ?1 WHERE device_id = ?2 AND boot_id = ?3 AND "
                            f"seq >= ?4 AND seq < ?5 AND device_time IS NOT NULL AND time > device_time + ?1 + ?6",
                            (float(r.offset), device_id, boot_id, lo, hi, float(clocks.REFILE_S))).rowcount
                    r.filed = r.offset
                db.execute("UPDATE clocks SET dirty = 0, state = ? WHERE device_id = ? AND boot_id = ?",
                           (clock.dump().decode(), device_id, boot_id))
                self._clocks.pop((device_id, boot_id), None)  # read again from the table when next needed
        return moved

    @staticmethod
    def _report(db: Any, device_id: str, when: float, storage: str, synced: bool | None,
                disk_free: int | None = None) -> None:
        """What a state or telemetry message says of the device's storage, clock and (telemetry) free disk, unless
        the device row already holds a newer report (``when`` is the message's corrected time)."""
        db.execute("UPDATE devices SET storage_since = CASE WHEN storage IS NOT DISTINCT FROM ?1 THEN storage_since "
                   "ELSE ?2 END, storage = ?1, clock_synced = ?3, storage_time = ?2, "
                   "disk_free_bytes = coalesce(?5, disk_free_bytes), "
                   "disk_time = CASE WHEN ?6 = 0 THEN disk_time ELSE ?2 END "
                   "WHERE id = ?4 AND (storage_time IS NULL OR storage_time <= ?2)",
                   (storage, when, None if synced is None else int(synced), device_id, disk_free,
                    int(disk_free is not None)))

    # -- recording: one message, or a batch in one transaction --------------------------------------------
    def record_state(self, msg: protocol.State, received: float, retained: bool = False) -> None:
        self.record_many([(msg, received, retained)])

    def record_telemetry(self, msg: protocol.Telemetry, received: float, retained: bool = False) -> bool:
        """Store one window, filed at the controller's time (``fleet.clock``); False when it was already stored
        (a redelivery)."""
        return self._one(msg, received, retained)

    def record_event(self, msg: protocol.Event, received: float, retained: bool = False) -> bool:
        """Store one event, filed at the controller's time, and move the device's phase in its deployment; False
        for a redelivery."""
        return self._one(msg, received, retained)

    def record_quality(self, msg: protocol.Quality, received: float, retained: bool = False) -> bool:
        """Store one window's model-quality counts, filed at the controller's time like telemetry; False for a
        redelivery. Raises ``fleet.quality.Refused`` (and counts it in ``quality_refused``) for a message that does
        not fit its bundle: an unknown bundle, one without a profile, another profile id, bins that do not follow
        the profile's layout, a confusion cell outside its classes (``fleet.quality.refusal``)."""
        result = self._one(msg, received, retained)
        if isinstance(result, str):
            raise quality.Refused(result)
        return result

    def _one(self, msg: Any, received: float, retained: bool) -> bool | str:
        return self.record_many([(msg, received, retained)])[0]

    def record_many(self, items: Sequence[tuple[protocol.Message, float, bool]]) -> list[bool | str]:
        """Store state, telemetry, event and quality messages, each with when it was received and whether the
        broker replayed it retained, in ONE transaction; per item: True (stored; a state always), False (already
        stored: a redelivery, by (device, boot_id, seq)), or the reason a quality message was refused (counted in
        ``quality_refused``, as ``record_quality`` raises it). An error that is not the message's ends the
        transaction: nothing of the batch is stored, and the caller may retry it whole (redeliveries are
        harmless)."""
        # The quality references are read before the transaction: a bundle's profile is read once and kept.
        refs = {m.sha256: self._quality_check(m) for m, _, _ in items if isinstance(m, protocol.Quality)}
        out: list[bool | str] = [False] * len(items)
        cache: dict[tuple[str, str], clocks.Clock] = {}  # the batch's last clock per boot, cached after commit
        # Device by device (each one's messages in the order given): concurrent batches of several controllers
        # then lock the device rows they share in one order, and never deadlock on them. A device whose messages
        # in the batch are all telemetry (the bulk of any stream) is stored set-based with the other such devices
        # next to it in that order (``_windows``): a few statements per run of devices, not ~10 per message.
        by_device: dict[str, list[int]] = {}
        for i in sorted(range(len(items)), key=lambda i: getattr(items[i][0], "device_id", "")):
            by_device.setdefault(getattr(items[i][0], "device_id", ""), []).append(i)
        with self._tx() as db:
            rows = self._device_rows(db, list(by_device))
            run: list[str] = []
            for device_id, idx in by_device.items():
                if all(type(items[i][0]) is protocol.Telemetry for i in idx):
                    run.append(device_id)
                    continue
                if run:
                    self._windows(db, items, by_device, run, rows, out, cache)
                    run = []
                for i in idx:
                    self._message(db, items[i], refs, out, cache, i)
            if run:
                self._windows(db, items, by_device, run, rows, out, cache)
        for (device_id, boot_id), clock in cache.items():
            self._cache_clock(device_id, boot_id, clock)
        return out

    def _message(self, db: Any, item: tuple[protocol.Message, float, bool], refs: dict[str, Any],
                 out: list[bool | str], cache: dict[tuple[str, str], clocks.Clock], i: int) -> None:
        """One message of ``record_many`` stored alone: ``out[i]`` its result."""
        msg, received, retained = item
        if isinstance(msg, protocol.State):
            self._state(db, msg, received, retained)
            out[i] = True
            return
        if isinstance(msg, protocol.Quality) and refs[msg.sha256] is not None:
            reason = quality.refusal(msg, *refs[msg.sha256])
            if reason is not None:
                db.execute("INSERT INTO quality_refused (reason, count, last_time) VALUES (?, 1, ?) "
                           "ON CONFLICT (reason) DO UPDATE SET count = quality_refused.count + 1, "
                           "last_time = excluded.last_time", (reason, received))
                out[i] = reason
                return
        if isinstance(msg, protocol.Telemetry):
            clock = self._telemetry(db, msg, received, retained)
        elif isinstance(msg, protocol.Event):
            clock = self._event(db, msg, received, retained)
        elif isinstance(msg, protocol.Quality):
            clock = self._quality(db, msg, received, retained)
        else:
            raise TypeError(f"record_many cannot store a {type(msg).__name__}")
        cache.pop((msg.device_id, msg.boot_id), None)
        if clock is not None:
            cache[(msg.device_id, msg.boot_id)] = clock
        out[i] = clock is not None

    # -- set-based telemetry: a run of devices whose messages in a batch are all telemetry windows ------------
    _DEVICE = ("id, first_seen, last_seen, online, interval_s, status_online, status_time, storage, storage_since, "
               "storage_time, clock_synced, disk_free_bytes, disk_time, inferences, errors, seq_max, seq_count, "
               "duplicates")

    _DEVICE_TYPES = ("text", "double precision", "double precision", "bigint", "double precision", "bigint",
                     "double precision", "text", "double precision", "double precision", "bigint", "bigint",
                     "double precision", "bigint", "bigint", "bigint", "bigint", "bigint")

    def _device_rows(self, db: Any, ids: list[str]) -> dict[str, dict[str, Any]]:
        """The batch's known devices (what ``_windows`` folds from), by id. PostgreSQL: their rows locked, in id
        order, until the transaction ends: every writer of a device's telemetry, clocks and counters holds its
        row first, so what is read here stays true, and concurrent batches lock in one order."""
        lock = "" if self._cache_clocks else " ORDER BY id FOR UPDATE"
        return {r["id"]: dict(r) for r in db.execute(
            f"SELECT {self._DEVICE} FROM devices WHERE {self.backend.among('id')}{lock}",
            (self.backend.list_arg(ids),)).fetchall()}

    def _windows(self, db: Any, items: Sequence[tuple[protocol.Message, float, bool]],
                 by_device: dict[str, list[int]], run: list[str], rows: dict[str, dict[str, Any]],
                 out: list[bool | str], cache: dict[tuple[str, str], clocks.Clock]) -> None:
        """Store the telemetry of the devices in ``run`` (sorted ids) as ``_telemetry`` would one message at a time,
        with the same results, in a fixed number of statements: the devices' rows, clocks and the keys already
        stored are read at once, each message is folded in Python in order (its clock, its filing time, whether it
        is a redelivery, the device's counters, report and transitions), and what changed is written with one
        ``executemany`` per table (psycopg pipelines them: one round trip)."""
        be, pg = self.backend, self.backend.name == "postgresql"
        new = [d for d in run if d not in rows]
        if new:  # first messages of these devices: their rows made (in id order), then read (and locked) like any
            # other; last_seen -1 marks a row made here (not by another controller meanwhile), whose first and
            # last seen are its first message's (retained: its filing time), set below.
            be.insert_many(db, "INSERT INTO devices (id, first_seen, last_seen) VALUES (?, ?, ?) "
                               "ON CONFLICT DO NOTHING",
                           [(d, items[by_device[d][0]][1], -1.0) for d in new], (_T, _F, _F))
            rows.update(self._device_rows(db, new))
            for d in new:
                if rows[d]["last_seen"] == -1:
                    rows[d]["first_seen"] = None
        lock = "" if self._cache_clocks else " FOR UPDATE"
        saved: dict[tuple[str, str], clocks.Clock | None] = {}
        for device_id, boot_id, state in db.execute(
                f"SELECT device_id, boot_id, state FROM clocks WHERE {be.among('device_id')} "
                f"ORDER BY device_id, boot_id{lock}", (be.list_arg(run),)).fetchall():
            saved[(device_id, boot_id)] = clocks.Clock.load(state)
        msgs = [(i, items[i]) for d in run for i in by_device[d]]
        keys = json.dumps([{"device_id": m.device_id, "boot_id": m.boot_id, "seq": m.seq} for _, (m, _, _) in msgs])
        table = "telemetry_keys" if pg else "telemetry"
        stored_keys = {(r[0], r[1], r[2]) for r in db.execute(
            f"SELECT t.device_id, t.boot_id, t.seq FROM {table} t JOIN "
            f"{be.json_rows([('device_id', 'text'), ('boot_id', 'text'), ('seq', 'bigint')])} b "
            "ON t.device_id = b.device_id AND t.boot_id = b.boot_id AND t.seq = b.seq", (keys,)).fetchall()}
        pairs = be.json_rows([("device_id", "text"), ("seq", "bigint")])
        seen_seqs = {(r[0], r[1]) for r in db.execute(" UNION ".join(
            f"SELECT t.device_id, t.seq FROM {t} t JOIN {pairs} b ON t.device_id = b.device_id AND t.seq = b.seq"
            for t in SEQ_TABLES), (keys,) * len(SEQ_TABLES)).fetchall()}
        telemetry, saves, errs, transitions = [], {}, {}, []
        for i, (msg, received, retained) in msgs:
            d, key = rows[msg.device_id], (msg.device_id, msg.boot_id, msg.seq)
            stored = key not in stored_keys
            stored_keys.add(key)
            boot = (msg.device_id, msg.boot_id)
            clock = saved.get(boot)
            if not stored and clock is not None:  # a redelivery teaches the clock nothing (its copy is dropped)
                clock = clocks.Clock.load(clock.dump())
            self._clocks.pop(boot, None)  # back in by _cache_clock, after the commit
            clock, at = clocks.observe(clock, msg.seq, msg.time, received, msg.interval_s or DEFAULT_INTERVAL_S)
            seen = min(at, received) if retained else received
            if d["first_seen"] is None:
                d["first_seen"] = d["last_seen"] = seen
            d["last_seen"] = max(d["last_seen"], seen)
            cache.pop(boot, None)
            if not stored:
                d["duplicates"] += 1
                continue
            saved[boot] = cache[boot] = clock
            saves[boot] = max(saves.get(boot, received), received)
            out[i] = True
            if msg.seq > 0:
                d["seq_max"] = max(d["seq_max"], msg.seq)
                d["seq_count"] += (msg.device_id, msg.seq) not in seen_seqs
                seen_seqs.add((msg.device_id, msg.seq))
            lat = msg.latency_ms
            errors = sum(msg.errors.values())
            telemetry.append((
                msg.device_id, msg.boot_id, msg.seq, at, msg.time, received, msg.interval_s, msg.inferences,
                errors, lat and lat.p50, lat and lat.p95, lat and lat.p99, lat and lat.mean, lat and lat.max,
                json.dumps(msg.histogram) if msg.histogram else None, msg.cpu_percent, msg.rss_bytes,
                msg.memory_percent, msg.temperature_c, protocol.encode(msg).decode()))
            d["inferences"] += msg.inferences
            d["errors"] += errors
            d["interval_s"] = msg.interval_s
            if d["storage_time"] is None or d["storage_time"] <= at:  # as _report
                if d["storage"] != msg.storage:
                    d["storage_since"] = at
                d["storage"], d["storage_time"] = msg.storage, at
                d["clock_synced"] = None if msg.clock_synced is None else int(msg.clock_synced)
                if msg.disk_free_bytes is not None:
                    d["disk_free_bytes"], d["disk_time"] = msg.disk_free_bytes, at
            for kind, n in msg.errors.items():
                if n:
                    count, last = errs.get((msg.device_id, kind), (0, at))
                    errs[(msg.device_id, kind)] = (count + n, max(last, at))
            online = self.is_online(d, received)  # as _settle
            if d["status_online"] is None or bool(d["status_online"]) != online:
                when, reason = received, "telemetry"
                if not online and d["online"]:
                    reason, when = "heartbeat timeout", d["last_seen"] + self._limit(d)
                transitions.append((msg.device_id, when, int(online), reason))
                d["status_online"], d["status_time"] = int(online), when
        cols = self._DEVICE.split(", ")
        be.insert_many(db, f"INSERT INTO devices ({self._DEVICE}) VALUES ({', '.join('?' * len(cols))}) "
                           f"ON CONFLICT (id) DO UPDATE SET {', '.join(f'{c} = excluded.{c}' for c in cols[1:])}",
                       [tuple(rows[d][c] for c in cols) for d in run], self._DEVICE_TYPES)
        if pg:
            be.insert_many(db, "INSERT INTO telemetry_keys (device_id, boot_id, seq, time) VALUES (?, ?, ?, ?) "
                               "ON CONFLICT DO NOTHING", [r[:4] for r in telemetry], (_T, _T, _I, _F))
        be.insert_many(db, self._ADD_TELEMETRY, telemetry, self._TELEMETRY_TYPES)
        be.insert_many(db, self._SAVE_CLOCK, [self._clock_row(device_id, boot_id, saved[(device_id, boot_id)], received)
                                              for (device_id, boot_id), received in saves.items()],
                       (_T, _T, _F, _I, _F, _I, _T))
        be.insert_many(db, self._ADD_ERRORS, [(device, kind, n, last) for (device, kind), (n, last) in errs.items()],
                       (_T, _T, _I, _F))
        be.insert_many(db, "INSERT INTO transitions (device_id, time, online, reason) VALUES (?, ?, ?, ?)", transitions,
                       (_T, _F, _I, _T))

    def _quality_check(self, msg: protocol.Quality) -> tuple[bool, Any, Any] | None:
        """(known bundle, its profile, its profile id) for ``quality.refusal``."""
        ref = self.reference(msg.sha256)
        known = ref is not None or bool(self._query("SELECT 1 FROM bundles WHERE sha256 = ?", (msg.sha256,)))
        return known, ref and ref[1], ref and ref[0]

    def _state(self, db: Any, msg: protocol.State, received: float, retained: bool) -> None:
        a = msg.active
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
        db.execute("UPDATE devices SET online = 0, state_time = GREATEST(coalesce(state_time, ?1), ?1) WHERE id = ?2",
                   (float(msg.time), msg.device_id))
        self._settle(db, msg.device_id, received, "last will" if will else "offline state")

    def _check_boot(self, db: Any, msg: protocol.State, received: float) -> None:
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
                db.execute("INSERT INTO events (device_id, boot_id, seq, time, received, kind, reason) "
                           "VALUES (?, 'controller', ?, ?, ?, 'identity_conflict', ?) ON CONFLICT DO NOTHING",
                           (msg.device_id, -n, received, received,
                            f"two devices use the identity {msg.device_id}: boot ids {row['boot_id']} and "
                            f"{msg.boot_id} alternate ({n} takeover{'s' if n > 1 else ''}); give one a new "
                            f"identity (revoke this one and enroll both)"))
        db.execute("UPDATE devices SET boots = ? WHERE id = ?",
                   (json.dumps((boots + [msg.boot_id])[-CLONE_BOOTS:]), msg.device_id))

    @staticmethod
    def _count_seq(db: Any, device_id: str, seq: int, stored: bool) -> bool:
        """Keep the device's seq accounting after one telemetry/event/quality insert; returns ``stored``."""
        if not stored:  # the same (boot_id, seq) again: a redelivery
            db.execute("UPDATE devices SET duplicates = duplicates + 1 WHERE id = ?", (device_id,))
            return False
        if seq > 0:
            # The row just stored counts once; more than one means this seq came before under another boot_id
            # (only after a device lost its outbox and started seq again): not a new seq, not a duplicate.
            n = db.execute("SELECT " + " + ".join(f"(SELECT count(*) FROM {t} WHERE device_id = ?1 AND seq = ?2)"
                                                  for t in SEQ_TABLES), (device_id, seq)).fetchone()[0]
            db.execute("UPDATE devices SET seq_max = GREATEST(seq_max, ?), seq_count = seq_count + ? WHERE id = ?",
                       (seq, int(n == 1), device_id))
        return True

    def _file(self, db: Any, msg: protocol.Telemetry | protocol.Event | protocol.Quality,
              received: float,
              interval_s: float | None) -> tuple[clocks.Clock, float]:
        """(the boot's clock with this message taken in, the controller time to file the message at). The clock
        is changed in place, so the cache drops it until its transaction has committed (a duplicate or a failed
        transaction leaves the table's copy the truth)."""
        clock = self._clock(db, msg.device_id, msg.boot_id)
        self._clocks.pop((msg.device_id, msg.boot_id), None)  # back in by _cache_clock, after the commit
        return clocks.observe(clock, msg.seq, msg.time, received, interval_s or DEFAULT_INTERVAL_S)

    _ADD_TELEMETRY = (
        "INSERT INTO telemetry (device_id, boot_id, seq, time, device_time, received, interval_s, "
        "inferences, errors, p50, p95, p99, mean_ms, max_ms, histogram, cpu_percent, rss_bytes, "
        "memory_percent, temperature_c, payload) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, "
        "?, ?, ?, ?) ON CONFLICT DO NOTHING")
    _TELEMETRY_TYPES = ("text", "text", "bigint", *["double precision"] * 4, "bigint", "bigint",
                        *["double precision"] * 5, "text", "double precision", "bigint", "double precision",
                        "double precision", "text")

    def _insert_telemetry(self, db: Any, row: tuple) -> bool:
        """Insert one window unless its (device, boot_id, seq) is stored; whether it was. PostgreSQL's telemetry
        is partitioned by time, where no unique key can span partitions: ``telemetry_keys`` holds the key."""
        if self.backend.name == "postgresql":
            if db.execute("INSERT INTO telemetry_keys (device_id, boot_id, seq, time) VALUES (?, ?, ?, ?) "
                          "ON CONFLICT DO NOTHING", (row[0], row[1], row[2], row[3])).rowcount != 1:
                return False
        cur = db.execute(self._ADD_TELEMETRY, row)
        return cur.rowcount == 1

    _ADD_ERRORS = ("INSERT INTO device_errors (device_id, kind, count, last_time) VALUES (?, ?, ?, ?) "
                   "ON CONFLICT (device_id, kind) DO UPDATE SET count = device_errors.count + excluded.count, "
                   "last_time = GREATEST(device_errors.last_time, excluded.last_time)")

    def _telemetry(self, db: Any, msg: protocol.Telemetry, received: float, retained: bool) -> clocks.Clock | None:
        """One window; its boot's clock as saved, or None for a redelivery."""
        lat = msg.latency_ms
        errors = sum(msg.errors.values())
        hist = json.dumps(msg.histogram) if msg.histogram else None
        clock, at = self._file(db, msg, received, msg.interval_s)
        self._touch(db, msg.device_id, min(at, received) if retained else received)
        stored = self._insert_telemetry(db, (
            msg.device_id, msg.boot_id, msg.seq, at, msg.time, received, msg.interval_s, msg.inferences,
            errors, lat and lat.p50, lat and lat.p95, lat and lat.p99, lat and lat.mean, lat and lat.max,
            hist, msg.cpu_percent, msg.rss_bytes, msg.memory_percent, msg.temperature_c,
            protocol.encode(msg).decode()))
        if not self._count_seq(db, msg.device_id, msg.seq, stored):
            return None
        self._save_clock(db, msg.device_id, msg.boot_id, clock, received)
        db.execute("UPDATE devices SET inferences = inferences + ?, errors = errors + ?, interval_s = ? "
                   "WHERE id = ?", (msg.inferences, errors, msg.interval_s, msg.device_id))
        self._report(db, msg.device_id, at, msg.storage, msg.clock_synced, msg.disk_free_bytes)
        db.executemany(self._ADD_ERRORS, [(msg.device_id, kind, n, at) for kind, n in msg.errors.items() if n])
        self._settle(db, msg.device_id, received, "telemetry")
        return clock

    def _event(self, db: Any, msg: protocol.Event, received: float, retained: bool) -> clocks.Clock | None:
        row = db.execute("SELECT interval_s FROM devices WHERE id = ?", (msg.device_id,)).fetchone()
        clock, at = self._file(db, msg, received, row and row[0])
        self._touch(db, msg.device_id, min(at, received) if retained else received)
        cur = db.execute(
            "INSERT INTO events (device_id, boot_id, seq, time, device_time, received, kind, "
            "deployment_id, sha256, version, reason) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING",
            (msg.device_id, msg.boot_id, msg.seq, at, msg.time, received, msg.kind, msg.deployment_id,
             msg.sha256, msg.version, msg.reason))
        if not self._count_seq(db, msg.device_id, msg.seq, cur.rowcount == 1):
            return None
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
        return clock

    def _quality(self, db: Any, msg: protocol.Quality, received: float, retained: bool) -> clocks.Clock | None:
        c, fb = msg.canary, msg.feedback
        clock, at = self._file(db, msg, received, msg.interval_s)
        self._touch(db, msg.device_id, min(at, received) if retained else received)
        canary_time = min(at, at + c.time - msg.time) if c is not None and c.runs and c.time > 0 else None
        cur = db.execute(
            "INSERT INTO quality (device_id, boot_id, seq, time, device_time, received, interval_s, "
            "sha256, version, deployment_id, profile, served, bins, canary_runs, canary_agree, "
            "canary_max_abs_err, canary_time, labels, confusion, refused) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING",
            (msg.device_id, msg.boot_id, msg.seq, at, msg.time, received, msg.interval_s, msg.sha256,
             msg.version, msg.deployment_id, msg.profile, msg.served, json.dumps(msg.bins),
             c.runs if c else 0, c.agree if c else 0, c.max_abs_err if c else None, canary_time,
             fb.labels if fb else 0, json.dumps(fb.confusion if fb else []),
             json.dumps(fb.refused if fb else {})))
        if not self._count_seq(db, msg.device_id, msg.seq, cur.rowcount == 1):
            return None
        self._save_clock(db, msg.device_id, msg.boot_id, clock, received)
        self._settle(db, msg.device_id, received, "quality")
        return clock

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
                       "ON CONFLICT (sha256) DO UPDATE SET "
                       "signed_by = coalesce(bundles.signed_by, excluded.signed_by), "
                       "signer = coalesce(bundles.signer, excluded.signer), "
                       "profile = coalesce(bundles.profile, excluded.profile), "
                       "profile_id = coalesce(bundles.profile_id, excluded.profile_id)",
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
            cur = db.execute("INSERT INTO release_keys (keyid, name, pem, added, statement) "
                             "VALUES (?, ?, ?, ?, ?) ON CONFLICT DO NOTHING",
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
                "counter = GREATEST(signed.counter + 1, ?2) RETURNING counter",
                (device_id, int(now * 1000))).fetchone()[0]

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
            conds.append("trust IS DISTINCT FROM ?")
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
            db.execute('INSERT INTO revoked_devices (device_id, time, "by") VALUES (?, ?, ?) '
                       'ON CONFLICT (device_id) DO UPDATE SET time = excluded.time, "by" = excluded."by"',
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
            db.executemany("INSERT INTO device_tags (device_id, tag) VALUES (?, ?) ON CONFLICT DO NOTHING",
                           [(device_id, t) for t in add])
            return [r[0] for r in db.execute("SELECT tag FROM device_tags WHERE device_id = ? ORDER BY tag",
                                             (device_id,))]

    # -- what the API shows ---------------------------------------------------------------------
    def device_count(self) -> int:
        return self._query("SELECT count(*) FROM devices")[0][0]

    def devices(self, ids: list[str] | None = None) -> list[dict[str, Any]]:
        """Every device's registry row (or those in ``ids``), with its tags and whether it is online."""
        if ids is None:
            return self.device_dicts(self._query("SELECT * FROM devices ORDER BY id"), self.tags())
        rows = self.device_rows_by_id(sorted(set(ids)))
        return self.device_dicts(rows, self.tags_of([r["id"] for r in rows]))

    def device_dicts(self, rows: list[Any], tags: dict[str, list[str]], now: float | None = None
                     ) -> list[dict[str, Any]]:
        """Registry rows as ``devices`` shows them (JSON decoded, online, tags), in their order."""
        now = time.time() if now is None else now
        out = []
        for r in rows:
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
            return dict(db.execute(f"INSERT INTO tokens (name, role, hash, created) VALUES (?, ?, ?, ?) "
                                   f"RETURNING {self._TOKEN}", (name, role, token_hash, now)).fetchone())

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

