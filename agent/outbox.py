"""The agent's durable outbox: every telemetry and event message waits here until the broker's PUBACK.

One SQLite file, ``STATE_DIR/outbox.db``, in WAL mode with ``synchronous=FULL``:

- **Durability.** FULL makes every commit fsync the WAL, so a message (and the seq it took) that
  ``put`` returned survives a power cut, not only a crash. NORMAL would be enough against SIGKILL
  but a power cut may roll back the last commits, and the next boot would hand out those seqs again
  for different messages. Puts come every few seconds and acks are committed in batches, so the
  fsyncs are cheap even on an SD card.
- **seq.** One per-device counter for all kinds, kept in the ``meta`` table and bumped in the same
  transaction as the insert: it never goes back, across restarts and power cuts. The payload is built
  (``build(seq)``) and stored once, so a replay is byte-identical (same boot_id, same seq) and the
  controller's (device, boot_id, seq) key sees it as the duplicate it is.
- **A seq ceiling outside the database.** ``outbox.seq`` holds a number no seq ever exceeded; it is
  raised (atomically, fsynced) in steps of ``SEQ_RESERVE`` *before* a seq above it is committed. When
  the database is lost (corrupt, unreadable, deleted) the new one starts above that ceiling, or above
  whatever can still be read from the broken file: seqs are never reused (the controller sees at most
  one gap of skipped seqs, and the agent reports why). Only with both files gone does seq start at 1.
- **Bounds.** ``max_bytes`` counts payload bytes of pending messages; ``max_age_s`` their age. What
  breaks a bound is dropped oldest first and counted in ``dropped`` (persisted). Age is measured on
  CLOCK_BOOTTIME while the kernel has not rebooted (immune to the wall clock jumping when NTP syncs on
  a device without an RTC) and on the wall clock across reboots.
- **Corruption.** A file that is not a database, fails ``PRAGMA integrity_check`` or cannot be read is
  renamed to ``outbox.db.corrupt-<unix time>`` (with its -wal/-shm), never deleted; a new one is made
  and the reason is returned (by ``open``) or queued (``take_reports``) for the agent to publish as an
  ``events`` message of kind "error". The same happens when SQLite reports corruption later on.
- **Threads.** The telemetry thread, the updater thread and the link's publisher call in; one
  connection under one lock serialises them.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import NamedTuple

from agent.errors import EdgefleetError

log = logging.getLogger("edgefleet.agent.outbox")

SCHEMA_VERSION = 1
SEQ_RESERVE = 1000  # the ceiling file is rewritten once every this many seqs
FILE = "outbox.db"
CEILING_SUFFIX = ".seq"
BUSY_TIMEOUT_S = 30.0  # waiting for another connection's write lock (only a second agent on the same dir)

# SQLite primary result codes that mean "this file is not (or no longer) a sound database" or "cannot be read"
_CORRUPT = {11: "SQLITE_CORRUPT", 26: "SQLITE_NOTADB"}
_UNREADABLE = {10: "SQLITE_IOERR", 14: "SQLITE_CANTOPEN", 8: "SQLITE_READONLY"}

_SCHEMA = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
CREATE TABLE messages (
    seq INTEGER PRIMARY KEY,
    kind TEXT NOT NULL,
    payload BLOB NOT NULL,
    created REAL NOT NULL,   -- wall clock
    kboot TEXT NOT NULL,     -- the kernel's boot id when it was queued
    mono REAL NOT NULL       -- CLOCK_BOOTTIME when it was queued
);
"""


class OutboxError(EdgefleetError):
    pass


class _Corrupt(Exception):
    """The file is not a usable outbox; the message says why."""


class Pending(NamedTuple):
    seq: int
    kind: str
    payload: bytes


def _kernel_boot_id() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return ""


def _boottime() -> float:
    try:
        return time.clock_gettime(time.CLOCK_BOOTTIME)
    except (AttributeError, OSError):
        return time.monotonic()


def _classify(e: sqlite3.DatabaseError) -> str | None:
    """A reason when ``e`` says the file is corrupt or unreadable; None for anything else (locked, full...)."""
    code = getattr(e, "sqlite_errorcode", None)
    if code is None:
        return None
    name = _CORRUPT.get(code & 0xFF) or _UNREADABLE.get(code & 0xFF)
    return f"{name}: {e}" if name else None


class Outbox:
    """An on-disk FIFO of encoded messages, each with a per-device monotonic seq."""

    def __init__(self, path: str | Path, max_bytes: int, max_age_s: float) -> None:
        if max_bytes <= 0 or max_age_s <= 0:
            raise ValueError("max_bytes and max_age_s must be > 0")
        self.path = Path(path)
        self.ceiling_path = self.path.with_name(self.path.name + CEILING_SUFFIX)
        self.max_bytes = max_bytes
        self.max_age_s = max_age_s
        self._lock = threading.RLock()
        self._db: sqlite3.Connection | None = None
        self._kboot = _kernel_boot_id()
        self._seq = 0  # the last seq handed out (mirrors meta.seq)
        self._ceiling = 0  # mirrors the ceiling file
        self._dropped = 0
        self._count = 0
        self._bytes = 0
        self._reports: list[str] = []
        self.generation = 0  # +1 each time the file is replaced: a reader's "seq > after" cursor is stale then

    # --- lifecycle -------------------------------------------------------------------------------
    def open(self) -> str | None:
        """Open (or create) the queue; None, or the reason a broken file was moved aside and replaced."""
        with self._lock:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._ceiling = self._read_ceiling()
            try:
                self._connect()
                report = self._check()  # read-only until the file passes: a broken one is moved aside as it was
                self._pragmas()
            except (sqlite3.DatabaseError, _Corrupt) as e:
                reason = str(e) if isinstance(e, _Corrupt) else _classify(e)
                if reason is None:  # locked, disk full, ...: not the file's fault, do not touch it
                    self._close_db()
                    raise OutboxError(f"cannot open the outbox {self.path}: {e}") from None
                return self._replace(reason)
            return report

    def close(self) -> None:
        with self._lock:
            self._close_db()

    def _close_db(self) -> None:
        if self._db is not None:
            try:
                self._db.close()
            except sqlite3.Error:
                pass
            self._db = None

    def _connect(self) -> None:
        self._close_db()
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None, timeout=BUSY_TIMEOUT_S)

    def _pragmas(self) -> None:
        db = self._db
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=FULL")  # see the module docstring: a seq must survive a power cut
        db.execute("PRAGMA journal_size_limit=4194304")

    def _check(self) -> str | None:
        """Create the schema in a new file; in an existing one, check integrity and schema, and load the counters.

        Returns what to report when the file is new although the seq ceiling says one existed (deleted)."""
        db = self._db
        version = db.execute("PRAGMA user_version").fetchone()[0]
        tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        if not tables and version == 0:
            self._pragmas()
            self._create(self._ceiling, 0)
            if not self._ceiling:
                return None
            report = (f"outbox {self.path.name} was missing (its seq ceiling says one existed; what it held is "
                      f"lost); a new one was created, seq continues after {self._ceiling}")
            log.error("%s", report)
            return report
        problems = [r[0] for r in db.execute("PRAGMA integrity_check(5)")]
        if problems != ["ok"]:
            raise _Corrupt("integrity check failed: " + "; ".join(problems))
        if version != SCHEMA_VERSION or not {"meta", "messages"} <= tables:
            raise _Corrupt(f"not an outbox of schema {SCHEMA_VERSION} (user_version {version}, "
                           f"tables {sorted(tables)})")
        meta = dict(db.execute("SELECT key, value FROM meta").fetchall())
        top = db.execute("SELECT max(seq) FROM messages").fetchone()[0] or 0
        self._seq = max(meta.get("seq", self._ceiling), top)
        self._dropped = meta.get("dropped", 0)
        self._count, self._bytes = db.execute("SELECT count(*), coalesce(sum(length(payload)), 0) "
                                              "FROM messages").fetchone()
        return None

    def _create(self, seq: int, dropped: int) -> None:
        db = self._db
        db.execute("BEGIN IMMEDIATE")
        try:
            for stmt in filter(str.strip, _SCHEMA.split(";")):
                db.execute(stmt)
            db.executemany("INSERT INTO meta VALUES (?, ?)", [("seq", seq), ("dropped", dropped)])
            db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")
        self._seq, self._dropped, self._count, self._bytes = seq, dropped, 0, 0

    def _replace(self, reason: str) -> str:
        """Move the broken file aside (never delete it), start a new one; return what to report."""
        self._close_db()
        learned, lost, dropped = _salvage(self.path)
        start = max(learned, self._ceiling)
        stamp = int(time.time())
        aside = self.path.with_name(f"{self.path.name}.corrupt-{stamp}")
        n = 1
        while aside.exists():
            aside = self.path.with_name(f"{self.path.name}.corrupt-{stamp}.{n}")
            n += 1
        try:
            if self.path.exists():
                os.replace(self.path, aside)
            for suffix in ("-wal", "-shm", "-journal"):
                side = self.path.with_name(self.path.name + suffix)
                if side.exists():
                    os.replace(side, aside.with_name(aside.name + suffix))
            _fsync_dir(self.path.parent)
            self._connect()
            self._pragmas()
            self._create(start, dropped + lost)
            self.generation += 1
        except (OSError, sqlite3.Error) as e:
            self._close_db()
            raise OutboxError(f"the outbox {self.path} is unusable ({reason}) and cannot be replaced: {e}") from None
        where = f"seq continues after {start}" if start else "seq starts again at 1 (nothing to learn it from)"
        report = (f"outbox {self.path.name} was unusable ({reason}); moved to {aside.name}, a new one was "
                  f"created, {where}" + (f"; {lost} queued messages lost" if lost else ""))
        log.error("%s", report)
        return report

    def take_reports(self) -> list[str]:
        """Corruption found (and repaired) after open, to publish as error events; each once."""
        with self._lock:
            out, self._reports = self._reports, []
            return out

    # --- the queue -------------------------------------------------------------------------------
    def put(self, kind: str, build: Callable[[int], bytes]) -> int:
        """Queue ``build(seq)`` under the next seq (one transaction: seq, message, bounds); return the seq."""
        with self._lock:
            return self._guard(lambda: self._put(kind, build))

    def _put(self, kind: str, build: Callable[[int], bytes]) -> int:
        db = self._conn()
        seq = self._seq + 1
        if seq > self._ceiling:
            self._raise_ceiling(seq + SEQ_RESERVE)
        payload = bytes(build(seq))
        db.execute("BEGIN IMMEDIATE")
        try:
            db.execute("INSERT INTO messages VALUES (?, ?, ?, ?, ?, ?)",
                       (seq, kind, payload, time.time(), self._kboot, _boottime()))
            db.execute("UPDATE meta SET value = ? WHERE key = 'seq'", (seq,))
            count, size = self._count + 1, self._bytes + len(payload)
            dropped, count, size = self._drop_locked(count, size)
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")
        self._seq, self._count, self._bytes = seq, count, size
        self._dropped += dropped
        return seq

    def pending(self, limit: int = 64, after: int = 0) -> list[Pending]:
        """Up to ``limit`` queued messages with seq > ``after``, oldest first (expired ones dropped first)."""
        with self._lock:
            def read() -> list[Pending]:
                self._expire_locked()
                rows = self._conn().execute("SELECT seq, kind, payload FROM messages WHERE seq > ? "
                                            "ORDER BY seq LIMIT ?", (after, limit)).fetchall()
                return [Pending(s, k, bytes(p)) for s, k, p in rows]
            return self._guard(read)

    def ack(self, seqs: int | Iterable[int]) -> int:
        """Delete the acknowledged messages (one transaction); unknown seqs are ignored. Returns how many went."""
        seqs = [seqs] if isinstance(seqs, int) else list(seqs)
        if not seqs:
            return 0
        with self._lock:
            def delete() -> int:
                db = self._conn()
                gone, size = 0, 0
                db.execute("BEGIN IMMEDIATE")
                try:
                    for i in range(0, len(seqs), 500):  # within SQLite's limit on bound parameters
                        chunk = seqs[i:i + 500]
                        marks = ",".join("?" * len(chunk))
                        n, length = db.execute(f"SELECT count(*), coalesce(sum(length(payload)), 0) FROM messages "
                                               f"WHERE seq IN ({marks})", chunk).fetchone()
                        db.execute(f"DELETE FROM messages WHERE seq IN ({marks})", chunk)
                        gone, size = gone + n, size + length
                except BaseException:
                    db.execute("ROLLBACK")
                    raise
                db.execute("COMMIT")
                self._count -= gone
                self._bytes -= size
                return gone
            return self._guard(delete)

    def expire(self) -> int:
        """Drop what is older than max_age_s; returns how many."""
        with self._lock:
            return self._guard(self._expire_locked)

    def _expire_locked(self) -> int:
        db = self._conn()
        db.execute("BEGIN IMMEDIATE")
        try:
            dropped, count, size = self._drop_locked(self._count, self._bytes)
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")
        self._count, self._bytes = count, size
        self._dropped += dropped
        return dropped

    def _drop_locked(self, count: int, size: int) -> tuple[int, int, int]:
        """Inside a transaction: drop oldest first while over max_bytes or older than max_age_s."""
        db = self._db
        now_wall, now_mono = time.time(), _boottime()
        dropped = 0
        while count:
            seq, length, created, kboot, mono = db.execute(
                "SELECT seq, length(payload), created, kboot, mono FROM messages ORDER BY seq LIMIT 1").fetchone()
            age = now_mono - mono if kboot == self._kboot and kboot else now_wall - created
            if size <= self.max_bytes and age <= self.max_age_s:
                break
            db.execute("DELETE FROM messages WHERE seq = ?", (seq,))
            count, size, dropped = count - 1, size - length, dropped + 1
        if dropped:
            db.execute("UPDATE meta SET value = value + ? WHERE key = 'dropped'", (dropped,))
            log.warning("outbox: dropped the %d oldest messages (over %d bytes or %g s old)", dropped,
                        self.max_bytes, self.max_age_s)
        return dropped, count, size

    # --- what it holds ----------------------------------------------------------------------------
    @property
    def storage(self) -> str:
        """Whether the state dir takes writes: "ok", "full" or "read_only" (protocol.StorageState)."""
        return "ok"

    @property
    def last_seq(self) -> int:
        """The last seq handed out (0 before the first)."""
        return self._seq

    @property
    def dropped(self) -> int:
        """Messages dropped to keep within the bounds (and queued messages lost with a corrupt file), ever."""
        return self._dropped

    @property
    def pending_count(self) -> int:
        return self._count

    @property
    def pending_bytes(self) -> int:
        return self._bytes

    # --- internals --------------------------------------------------------------------------------
    def _conn(self) -> sqlite3.Connection:
        if self._db is None:
            raise OutboxError(f"the outbox {self.path} is not open")
        return self._db

    def _guard(self, op: Callable):
        """Run ``op``; if SQLite says the file went bad, move it aside, start anew, report, and retry once."""
        try:
            return op()
        except sqlite3.DatabaseError as e:
            reason = _classify(e)
            if reason is None:
                raise
            self._reports.append(self._replace(reason))
            return op()

    def _read_ceiling(self) -> int:
        try:
            return int(self.ceiling_path.read_text().strip() or 0)
        except FileNotFoundError:
            return 0
        except (OSError, ValueError) as e:
            log.warning("ignoring an unreadable seq ceiling %s: %s", self.ceiling_path, e)
            return 0

    def _raise_ceiling(self, value: int) -> None:
        """Durably record that seqs up to ``value`` may be used, before using any of them."""
        tmp = self.ceiling_path.with_name(self.ceiling_path.name + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            os.write(fd, f"{value}\n".encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, self.ceiling_path)
        _fsync_dir(self.ceiling_path.parent)
        self._ceiling = value


def _salvage(path: Path) -> tuple[int, int, int]:
    """(highest seq, queued messages, dropped count) that can still be read from a broken file; 0 where not."""
    seq = count = dropped = 0
    if not path.exists():
        return 0, 0, 0
    try:
        db = sqlite3.connect(f"{path.as_uri()}?mode=ro", uri=True, timeout=1)
    except sqlite3.Error:
        return 0, 0, 0
    try:
        for sql in ("SELECT value FROM meta WHERE key = 'seq'", "SELECT max(seq) FROM messages"):
            try:
                seq = max(seq, int(db.execute(sql).fetchone()[0] or 0))
            except (sqlite3.Error, TypeError, ValueError):
                pass
        try:
            dropped = int(db.execute("SELECT value FROM meta WHERE key = 'dropped'").fetchone()[0] or 0)
        except (sqlite3.Error, TypeError, ValueError):
            pass
        try:
            count = int(db.execute("SELECT count(*) FROM messages").fetchone()[0] or 0)
        except (sqlite3.Error, TypeError, ValueError):
            pass
    finally:
        db.close()
    return seq, count, dropped


def _fsync_dir(d: Path) -> None:
    try:
        fd = os.open(d, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
