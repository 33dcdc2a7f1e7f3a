"""The agent's durable outbox: every telemetry and event message waits here until it is acknowledged: by the
controller, once it has shown that it acknowledges what it stored, else by the broker's PUBACK (agent/link.py).

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
- **A state dir that takes no writes** (full: SQLITE_FULL/ENOSPC; read-only: EROFS, or an I/O error while a
  probe write in the directory fails so, see agent/storage.py). No exception reaches the caller: the outbox
  goes *degraded*. What it held on disk stays there and is still read (and sent); new messages take the next
  seqs and wait in memory, bounded by ``memory_max`` bytes (the oldest dropped first and counted in
  ``dropped``), and the link's publisher sends them from there through the same ``pending``/``ack``;
  acknowledgements of on-disk messages are remembered until they can be deleted. Every ``RECOVER_S`` the
  directory is probed (not while its mount point, as at open, is unmounted: a write then would land in the bare
  mount point); once it takes a write the database is opened again (a filesystem mounted again after
  an error leaves the old connection on the dead one) and, in one transaction, what memory held is written
  back with its seqs, the remembered acks deleted and the dropped count added: nothing it had is lost.
  ``storage`` says "full" or "read_only" meanwhile (and "full" also while the free space is under
  ``FULL_BELOW``, even when SQLite still finds room in pages it already has; "ok" again from twice that).
- **Seqs held in memory are never handed out again.** Each is recorded, before it is used, in
  ``outbox.db.held``: a 32-byte file made while the disk was fine and rewritten in place (``pwrite`` +
  ``fdatasync``), which a full filesystem still takes since it needs no new block. When the agent is killed
  with messages held in memory, the next start continues after that mark and reports the seqs whose messages
  may be lost. A read-only filesystem takes not even that: then a restart *before* it takes writes again may
  reuse the seqs held in memory (under a new boot_id, so the controller keeps both); this is logged. The seq
  ceiling is raised while at least ``SEQ_RESERVE // 2`` seqs are left under it, so that a disk that fills
  leaves that many covered.
- **The controller's acknowledgements.** ``acked_at`` (meta key ``acked_at``, wall-clock seconds) is when the
  controller last acknowledged a message end to end; the link uses it to keep holding messages for those
  acknowledgements across restarts (agent/link.py). ``get`` reads given seqs back for the link to send again.
- **Threads.** The telemetry thread, the updater thread and the link's publisher call in; one
  connection under one lock serialises them.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import NamedTuple

from agent import storage
from agent.errors import EdgefleetError
from agent.heldqueue import Held, HeldQueue
from agent.seqmarks import SeqMarks, fsync_dir

log = logging.getLogger("edgefleet.agent.outbox")

SCHEMA_VERSION = 1
SEQ_RESERVE = 1000  # the ceiling is kept this far ahead, rewritten once every SEQ_RESERVE // 2 seqs
FILE = "outbox.db"
BUSY_TIMEOUT_S = 30.0  # waiting for another connection's write lock (only a second agent on the same dir)
MEMORY_MAX_BYTES = 1 << 20  # payload bytes held in memory while degraded (at most max_bytes)
RECOVER_S = 2.0  # while degraded, how often the directory is probed
FULL_BELOW = 1 << 20  # storage says "full" under this much free space, and "ok" again from twice this

# SQLite primary result codes that mean "this file is not (or no longer) a sound database" or "cannot be read"
_CORRUPT = {11: "SQLITE_CORRUPT", 26: "SQLITE_NOTADB"}
_UNREADABLE = {10: "SQLITE_IOERR", 14: "SQLITE_CANTOPEN", 8: "SQLITE_READONLY"}
_FULL = 13  # SQLITE_FULL
_ASK_THE_DIRECTORY = (8, 10, 14)  # READONLY, IOERR, CANTOPEN: SQLite does not say whether the disk is to blame

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


class _NoWrites(Exception):
    """The state dir takes no writes: ``kind`` is "full" or "read_only"."""

    def __init__(self, kind: str, reason: str) -> None:
        super().__init__(reason)
        self.kind = kind


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
    """An on-disk FIFO of encoded messages, each with a per-device monotonic seq; in memory while the disk is
    full or read-only."""

    def __init__(self, path: str | Path, max_bytes: int, max_age_s: float) -> None:
        if max_bytes <= 0 or max_age_s <= 0:
            raise ValueError("max_bytes and max_age_s must be > 0")
        self.path = Path(path)
        self._marks = SeqMarks(self.path)  # the seq ceiling and the held mark (agent/seqmarks.py)
        self.max_bytes = max_bytes
        self.max_age_s = max_age_s
        self.memory_max = min(max_bytes, MEMORY_MAX_BYTES)
        self._lock = threading.RLock()
        self._db: sqlite3.Connection | None = None
        self._kboot = _kernel_boot_id()
        self._seq = 0  # the last seq handed out (mirrors meta.seq, but for what is held in memory)
        self._dropped = 0
        self._count = 0  # on disk
        self._bytes = 0
        self._reports: list[str] = []
        self.generation = 0  # +1 each time the file is replaced: a reader's "seq > after" cursor is stale then
        # degraded: the state dir takes no writes
        self._degraded = False
        self._fault: str | None = None  # "full" | "read_only": what `storage` says, degraded or short of space
        self._fault_reason = ""
        self._memory = HeldQueue(self.memory_max, max_age_s)
        self._acked_later: dict[int, int] = {}  # on-disk seq acknowledged while degraded -> its payload length
        self._acked_later_bytes = 0
        self._unsaved_dropped = 0  # dropped while degraded, not yet counted in meta
        self._disk_unread = False  # what is on disk could not be read while degraded (the cursor may be past it)
        self._next_try = 0.0
        self._mount: Path | None = None  # the state dir's mount point, as at open
        self._warned: set[str] = set()
        self.held_total = 0  # messages ever held in memory
        self.acked_at = 0.0  # when the controller last acknowledged a message end to end (0: never seen)

    # --- lifecycle -------------------------------------------------------------------------------
    def open(self) -> str | None:
        """Open (or create) the queue; None, or the reason a broken file was moved aside and replaced (or the
        state dir takes no writes, and the queue starts in memory)."""
        with self._lock:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._mount = storage.mount_point(self.path.parent)
            self._marks.load()
            try:
                self._connect()
                report = self._check()  # read-only until the file passes: a broken one is moved aside as it was
                self._pragmas()
            except (sqlite3.DatabaseError, _Corrupt) as e:
                kind, why = (None, "") if isinstance(e, _Corrupt) else self._fault_of(e)
                if kind is not None:
                    return self._open_degraded(kind, why)
                reason = str(e) if isinstance(e, _Corrupt) else _classify(e)
                if reason is None:  # locked, ...: not the file's fault, do not touch it
                    self._close_db()
                    raise OutboxError(f"cannot open the outbox {self.path}: {e}") from None
                return self._replace(reason)
            self._settle_held()
            self._marks.make_held()
            return report

    def close(self) -> None:
        with self._lock:
            if self._degraded:
                self._recover()  # a last try: the disk may take what memory holds now
            if self._degraded and len(self._memory):
                held = [m.seq for m in self._memory]
                log.error("outbox: stopping with %d messages (seqs %d..%d) held in memory only, the state dir "
                          "being %s: those not acknowledged by the broker are lost", len(held), held[0], held[-1],
                          self._fault)
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

    @contextlib.contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        """One write transaction; rolled back on any error (a failed COMMIT included)."""
        db = self._conn()
        db.execute("BEGIN IMMEDIATE")
        try:
            yield db
            db.execute("COMMIT")
        except BaseException:
            self._rollback()
            raise

    def _rollback(self) -> None:
        db = self._db
        if db is not None and db.in_transaction:
            try:
                db.execute("ROLLBACK")
            except sqlite3.Error:
                pass

    def _check(self) -> str | None:
        """Create the schema in a new file; in an existing one, check integrity and schema, and load the counters.

        Returns what to report when the file is new although the seq ceiling says one existed (deleted)."""
        db = self._db
        version = db.execute("PRAGMA user_version").fetchone()[0]
        tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        if not tables and version == 0:
            self._pragmas()
            floor = self._marks.floor
            self._create(floor, 0)
            if not floor:
                return None
            report = (f"outbox {self.path.name} was missing (its seq ceiling says one existed; what it held is "
                      f"lost); a new one was created, seq continues after {floor}")
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
        self._seq = max(meta.get("seq", self._marks.ceiling), top)
        self._dropped = meta.get("dropped", 0)
        self.acked_at = max(self.acked_at, float(meta.get("acked_at", 0)))
        self._count, self._bytes = db.execute("SELECT count(*), coalesce(sum(length(payload)), 0) "
                                              "FROM messages").fetchone()
        return None

    def _create(self, seq: int, dropped: int) -> None:
        with self._tx() as db:
            for stmt in filter(str.strip, _SCHEMA.split(";")):
                db.execute(stmt)
            db.executemany("INSERT INTO meta VALUES (?, ?)", [("seq", seq), ("dropped", dropped)])
            db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        self._seq, self._dropped, self._count, self._bytes = seq, dropped, 0, 0

    def _replace(self, reason: str) -> str:
        """Move the broken file aside (never delete it), start a new one; return what to report."""
        self._close_db()
        learned, lost, dropped = _salvage(self.path)
        start = max(learned, self._marks.floor)
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
            fsync_dir(self.path.parent)
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
        """Corruption found (and repaired) after open, and seqs lost with a previous run's memory: to publish as
        error events; each once."""
        with self._lock:
            out, self._reports = self._reports, []
            return out

    # --- the queue -------------------------------------------------------------------------------
    def put(self, kind: str, build: Callable[[int], bytes]) -> int:
        """Queue ``build(seq)`` under the next seq (one transaction: seq, message, bounds); return the seq.

        While the state dir takes no writes the message is held in memory instead (see the module docstring)."""
        with self._lock:
            self._refresh()
            if not self._degraded:
                try:
                    return self._guard(lambda: self._put(kind, build))
                except _NoWrites as e:
                    self._degrade(e.kind, str(e))
            return self._put_memory(kind, build)

    def _put(self, kind: str, build: Callable[[int], bytes]) -> int:
        seq = self._seq + 1
        self._keep_ceiling_ahead(seq)
        payload = bytes(build(seq))
        with self._tx() as db:
            db.execute("INSERT INTO messages VALUES (?, ?, ?, ?, ?, ?)",
                       (seq, kind, payload, time.time(), self._kboot, _boottime()))
            db.execute("UPDATE meta SET value = ? WHERE key = 'seq'", (seq,))
            count, size = self._count + 1, self._bytes + len(payload)
            dropped, count, size = self._drop_locked(count, size)
        self._seq, self._count, self._bytes = seq, count, size
        self._dropped += dropped
        return seq

    def pending(self, limit: int = 64, after: int = 0) -> list[Pending]:
        """Up to ``limit`` queued messages with seq > ``after``, oldest first (expired ones dropped first)."""
        with self._lock:
            self._refresh()
            if not self._degraded:
                def read() -> list[Pending]:
                    self._expire_locked()
                    rows = self._conn().execute("SELECT seq, kind, payload FROM messages WHERE seq > ? "
                                                "ORDER BY seq LIMIT ?", (after, limit)).fetchall()
                    return [Pending(s, k, bytes(p)) for s, k, p in rows]
                try:
                    return self._guard(read)
                except _NoWrites as e:
                    self._degrade(e.kind, str(e))
            return self._pending_degraded(limit, after)

    def get(self, seqs: Iterable[int]) -> list[Pending]:
        """The messages of these seqs that are still queued, oldest first: what the link sends again."""
        wanted = sorted(set(seqs))
        if not wanted:
            return []
        with self._lock:
            def read() -> list[Pending]:
                out = []
                for i in range(0, len(wanted), 500):
                    chunk = wanted[i:i + 500]
                    out += [Pending(s, k, bytes(p)) for s, k, p in self._conn().execute(
                        f"SELECT seq, kind, payload FROM messages WHERE seq IN ({','.join('?' * len(chunk))})",
                        chunk)]
                return out
            if not self._degraded:
                try:
                    return sorted(self._guard(read))
                except _NoWrites as e:
                    self._degrade(e.kind, str(e))
            out: list[Pending] = []
            if self._db is not None:
                try:
                    out = [m for m in read() if m.seq not in self._acked_later]
                except sqlite3.Error:
                    pass
            keep = set(wanted)
            return sorted(out + [Pending(m.seq, m.kind, m.payload) for m in self._memory if m.seq in keep])

    def note_acks(self, when: float) -> None:
        """The controller acknowledged something at (wall-clock) ``when``: remembered in ``acked_at``, on disk when the
        state dir takes writes (else in memory only: a restart meanwhile forgets it)."""
        with self._lock:
            self.acked_at = when
            if self._degraded:
                return

            def write() -> None:
                with self._tx() as db:
                    db.execute("INSERT INTO meta VALUES ('acked_at', ?) ON CONFLICT (key) DO UPDATE "
                               "SET value = excluded.value", (int(when),))
            try:
                self._guard(write)
            except _NoWrites as e:
                self._degrade(e.kind, str(e))

    def ack(self, seqs: int | Iterable[int]) -> int:
        """Delete the acknowledged messages (one transaction); unknown seqs are ignored. Returns how many went."""
        seqs = [seqs] if isinstance(seqs, int) else list(seqs)
        if not seqs:
            return 0
        with self._lock:
            if not self._degraded:
                def delete() -> int:
                    gone, size = 0, 0
                    with self._tx() as db:
                        for i in range(0, len(seqs), 500):  # within SQLite's limit on bound parameters
                            chunk = seqs[i:i + 500]
                            marks = ",".join("?" * len(chunk))
                            n, length = db.execute(f"SELECT count(*), coalesce(sum(length(payload)), 0) FROM "
                                                   f"messages WHERE seq IN ({marks})", chunk).fetchone()
                            db.execute(f"DELETE FROM messages WHERE seq IN ({marks})", chunk)
                            gone, size = gone + n, size + length
                    self._count -= gone
                    self._bytes -= size
                    return gone
                try:
                    return self._guard(delete)
                except _NoWrites as e:
                    self._degrade(e.kind, str(e))
            return self._ack_degraded(seqs)

    def expire(self) -> int:
        """Drop what is older than max_age_s; returns how many."""
        with self._lock:
            if not self._degraded:
                try:
                    return self._guard(self._expire_locked)
                except _NoWrites as e:
                    self._degrade(e.kind, str(e))
            return self._count_dropped(self._memory.bound(_boottime()))

    def _expire_locked(self) -> int:
        with self._tx():
            dropped, count, size = self._drop_locked(self._count, self._bytes)
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

    # --- degraded: the state dir takes no writes ---------------------------------------------------
    def refresh(self) -> str:
        """Look at the state dir again (free space; while degraded, whether it takes writes again, at most every
        RECOVER_S) and return ``storage``."""
        with self._lock:
            self._refresh()
            return self.storage

    def _refresh(self) -> None:
        if not self._degraded:
            self._observe()
        elif time.monotonic() >= self._next_try:
            self._recover()

    def _observe(self) -> None:
        """Not degraded: "full" below FULL_BELOW free bytes (until twice that), "read_only" when mounted so."""
        try:
            st = os.statvfs(self.path.parent)
        except OSError:
            return
        free = st.f_bavail * st.f_frsize
        if st.f_flag & os.ST_RDONLY:
            self._fault, self._fault_reason = storage.READ_ONLY, "mounted read-only"
        elif free < FULL_BELOW or (self._fault == storage.FULL and free < 2 * FULL_BELOW):
            self._fault, self._fault_reason = storage.FULL, f"{storage.human(free)} free"
        else:
            self._fault, self._fault_reason = None, ""

    def _degrade(self, kind: str, reason: str) -> None:
        self._rollback()
        if not self._degraded:
            self._degraded = True
            log.error("outbox: the state dir %s takes no writes (%s: %s); new messages wait in memory (at most "
                      "%s) and are sent from there until it does", self.path.parent, kind, reason,
                      storage.human(self.memory_max))
        self._fault, self._fault_reason = kind, reason
        self._next_try = time.monotonic() + RECOVER_S

    def _put_memory(self, kind: str, build: Callable[[int], bytes]) -> int:
        seq = self._seq + 1
        if not self._marks.write_held(seq) and "held" not in self._warned:
            self._warned.add("held")
            log.warning("outbox: cannot record the seqs held in memory in %s (the state dir is %s): if the agent "
                        "restarts before the state dir takes writes again, seqs after %d may be handed out again",
                        self._marks.held_path.name, self._fault, self._seq)
        payload = bytes(build(seq))
        self._seq = seq
        self.held_total += 1
        self._count_dropped(self._memory.append(Held(seq, kind, payload, time.time(), _boottime()), _boottime()))
        return seq

    def _count_dropped(self, dropped: int) -> int:
        if dropped:
            self._dropped += dropped
            self._unsaved_dropped += dropped
            if "memory" not in self._warned:
                self._warned.add("memory")
                log.warning("outbox: dropping the oldest messages held in memory (over %s or %g s old); counted",
                            storage.human(self.memory_max), self.max_age_s)
        return dropped

    def _pending_degraded(self, limit: int, after: int) -> list[Pending]:
        """What is on disk (still readable when it takes no writes), then what memory holds."""
        out: list[Pending] = []
        if self._db is not None:
            try:
                rows = self._db.execute("SELECT seq, kind, payload FROM messages WHERE seq > ? ORDER BY seq LIMIT ?",
                                        (after, limit + len(self._acked_later))).fetchall()
                out = [Pending(s, k, bytes(p)) for s, k, p in rows if s not in self._acked_later][:limit]
            except sqlite3.Error:
                self._disk_unread = True
        else:  # opened degraded: what the file holds is read after it takes writes again
            self._disk_unread = True
        return out + [Pending(m.seq, m.kind, m.payload) for m in self._memory.after(after, limit - len(out))]

    def _ack_degraded(self, seqs: list[int]) -> int:
        wanted = set(seqs)
        found = self._memory.remove(wanted)
        gone = len(found)
        rest = [s for s in wanted - found if s not in self._acked_later]
        if rest and self._db is not None:
            try:
                for i in range(0, len(rest), 500):
                    chunk = rest[i:i + 500]
                    for seq, length in self._db.execute(
                            f"SELECT seq, length(payload) FROM messages WHERE seq IN ({','.join('?' * len(chunk))})",
                            chunk):
                        self._acked_later[seq] = length
                        self._acked_later_bytes += length
                        gone += 1
            except sqlite3.Error:
                pass  # deleted later or sent again after the next start: the controller drops the copy
        return gone

    def _recover(self) -> bool:
        """Degraded: when the directory takes a write again, reopen the database and write back what memory holds,
        delete what was acknowledged meanwhile and count what was dropped (one transaction)."""
        self._next_try = time.monotonic() + RECOVER_S
        if self._mount is not None and not os.path.ismount(self._mount):
            # unmounted (to be checked and mounted again): writing now would land in the bare mount point, beside
            # the filesystem that holds the outbox
            self._fault_reason = f"{self._mount} is not mounted"
            return False
        kind, why = storage.probe(self.path.parent)
        if why:  # still no writes (or an error that is not a storage condition: keep waiting)
            if kind:
                self._fault, self._fault_reason = kind, why
            return False
        seq = self._seq
        try:
            self._connect()
            try:
                self._check()
            except _Corrupt as e:
                self._seq = max(self._seq, seq)
                self._reports.append(self._replace(str(e)))
            self._pragmas()
            self._seq = max(self._seq, seq)
            self._drain()
        except (sqlite3.DatabaseError, OSError, OutboxError) as e:
            self._seq = max(self._seq, seq)
            self._rollback()
            kind, why = self._fault_of(e) if isinstance(e, sqlite3.DatabaseError) else (storage.kind_of(e), str(e))
            if kind:
                self._fault, self._fault_reason = kind, why
            elif "recover" not in self._warned:
                self._warned.add("recover")
                log.warning("outbox: the state dir takes writes again but the outbox does not yet: %s", e)
            return False
        return True

    def _drain(self) -> None:
        held = list(self._memory)
        acked = list(self._acked_later)
        with self._tx() as db:
            for i in range(0, len(acked), 500):
                chunk = acked[i:i + 500]
                db.execute(f"DELETE FROM messages WHERE seq IN ({','.join('?' * len(chunk))})", chunk)
            db.executemany("INSERT OR IGNORE INTO messages VALUES (?, ?, ?, ?, ?, ?)",
                           [(m.seq, m.kind, m.payload, m.created, self._kboot, m.mono) for m in held])
            db.execute("UPDATE meta SET value = max(value, ?) WHERE key = 'seq'", (self._seq,))
            db.execute("UPDATE meta SET value = value + ? WHERE key = 'dropped'", (self._unsaved_dropped,))
            count, size = db.execute("SELECT count(*), coalesce(sum(length(payload)), 0) FROM messages").fetchone()
            dropped, count, size = self._drop_locked(count, size)
        self._count, self._bytes = count, size
        self._dropped += self._unsaved_dropped + dropped
        log.warning("outbox: the state dir %s takes writes again; %d messages held in memory written back, "
                    "%d dropped while it did not", self.path.parent, len(held), self._unsaved_dropped)
        self._memory.clear()
        self._acked_later.clear()
        self._acked_later_bytes = 0
        self._unsaved_dropped = 0
        self._degraded = False
        self._warned.clear()
        if self._disk_unread:  # the link may have sent past what was on disk: have it start from the beginning
            self._disk_unread = False
            self.generation += 1
        try:
            self._keep_ceiling_ahead(self._seq + 1)
        except OSError:
            pass
        self._marks.make_held()
        self._observe()  # "full" stays until twice FULL_BELOW is free

    def _open_degraded(self, kind: str, reason: str) -> str:
        """open() found the state dir taking no writes: start in memory, above every seq that may have been used."""
        self._close_db()
        self._seq = self._marks.floor
        self._degrade(kind, reason)
        report = (f"the outbox {self.path} cannot be opened ({reason}): the state dir is {kind}; messages wait in "
                  f"memory until it takes writes, seq continues after {self._seq} (the seq ceiling: the seqs "
                  f"skipped up to it show as a gap)")
        log.error("%s", report)
        return report

    def _fault_of(self, e: sqlite3.DatabaseError) -> tuple[str | None, str]:
        """("full" or "read_only", why) when ``e`` comes from a state dir that takes no writes; else (None, "")."""
        code = getattr(e, "sqlite_errorcode", None)
        if code is None:
            return None, ""
        if code & 0xFF == _FULL:
            return storage.FULL, str(e)
        if code & 0xFF in _ASK_THE_DIRECTORY:
            kind, why = storage.probe(self.path.parent)
            return (kind, f"{e}: {why}") if kind else (None, "")
        return None, ""

    # --- what it holds ----------------------------------------------------------------------------
    @property
    def storage(self) -> str:
        """Whether the state dir takes writes: "ok", "full" or "read_only" (protocol.StorageState), as last seen
        by a put, pending or ``refresh``."""
        return self._fault or "ok"

    @property
    def storage_reason(self) -> str:
        """Why ``storage`` is not "ok" (an error, or the free space); "" when it is."""
        return self._fault_reason if self._fault else ""

    @property
    def degraded(self) -> bool:
        """New messages wait in memory: the state dir takes no writes."""
        return self._degraded

    @property
    def last_seq(self) -> int:
        """The last seq handed out (0 before the first)."""
        return self._seq

    @property
    def dropped(self) -> int:
        """Messages dropped to keep within the bounds (on disk or in memory) and queued messages lost with a
        corrupt file, ever."""
        return self._dropped

    @property
    def pending_count(self) -> int:
        return self._count - len(self._acked_later) + len(self._memory)

    @property
    def pending_bytes(self) -> int:
        return self._bytes - self._acked_later_bytes + self._memory.bytes

    # --- internals --------------------------------------------------------------------------------
    def _conn(self) -> sqlite3.Connection:
        if self._db is None:
            raise OutboxError(f"the outbox {self.path} is not open")
        return self._db

    def _guard(self, op: Callable):
        """Run ``op``. If the state dir takes no writes, raise _NoWrites; if SQLite says the file went bad, move it
        aside, start anew, report, and retry once."""
        try:
            return op()
        except sqlite3.DatabaseError as e:
            self._rollback()
            kind, why = self._fault_of(e)
            if kind:
                raise _NoWrites(kind, why) from None
            reason = _classify(e)
            if reason is None:
                raise
            self._reports.append(self._replace(reason))
            return op()
        except OSError as e:  # the seq ceiling
            kind = storage.kind_of(e) or storage.probe(self.path.parent)[0]
            if kind:
                raise _NoWrites(kind, f"the seq ceiling: {e.strerror or e}") from None
            raise

    def _keep_ceiling_ahead(self, seq: int) -> None:
        """Before ``seq`` is used: raise the ceiling when fewer than SEQ_RESERVE // 2 seqs are left under it. A
        failure matters only when ``seq`` itself is above it."""
        if seq <= self._marks.ceiling - SEQ_RESERVE // 2:
            return
        try:
            self._marks.raise_ceiling(seq + SEQ_RESERVE)
        except OSError as e:
            if seq > self._marks.ceiling:
                raise
            if "ceiling" not in self._warned:
                self._warned.add("ceiling")
                log.warning("outbox: cannot raise the seq ceiling (%s); %d seqs are left under it", e,
                            self._marks.ceiling - seq)

    def _settle_held(self) -> None:
        """After open: a held mark above the database's seq means the last run stopped with messages in memory."""
        if self._marks.held <= self._seq:
            return
        first, last = self._seq + 1, self._marks.held
        self._seq = last
        report = (f"the agent stopped while the messages of seqs {first}..{last} were held in memory only (its "
                  f"state dir took no writes); those that had not reached the broker are lost; seq continues "
                  f"after {last}")
        log.error("%s", report)
        self._reports.append(report)


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

