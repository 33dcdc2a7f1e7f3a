"""Retention's side of the store: raw windows read for folding, the rollup tables, the tier boundaries, and what
expires. ``fleet.retention`` does the arithmetic (``Agg``) on what these return.

On PostgreSQL raw telemetry lives in daily partitions (``fleet.store.schema``): a partition wholly older than
the raw cutoff is folded a batch at a time (its progress kept in ``retention`` in the same transaction as the
rollups it wrote, so a crash resumes without folding anything twice) and then dropped whole; rows deleted one by
one are only those of the default partition and of the day the cutoff falls in.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from fleet.store import schema

FoldFn = Callable[[list[Any], Callable[[str, str, float], Any]], Iterable[tuple[str, tuple]]]


class Upkeep:
    """Mixed into ``fleet.store.Store``."""

    backend: Any

    def _raw_select(self) -> str:
        errs = self.backend.json_get("payload", "errors")
        return ("SELECT id, device_id, time, interval_s, inferences, errors, p50, p95, p99, mean_ms, max_ms, "
                "histogram, cpu_percent, rss_bytes, memory_percent, temperature_c, "
                f"CASE WHEN errors > 0 THEN {errs} END AS errors_by_kind FROM ")

    def retention_boundaries(self) -> dict[str, float]:
        """tier -> where it begins (raw, 1m), for the tiers compaction has marked."""
        return {r[0]: r[1] for r in self._query("SELECT tier, before FROM retention WHERE tier IN ('raw', '1m')")}

    def raw_windows(self, device_id: str, since: float, until: float) -> list[Any]:
        """A device's raw windows in [since, until] with the columns rollups are made of, oldest first."""
        return self._query(f"{self._raw_select()}telemetry WHERE device_id = ? AND time >= ? AND time <= ? "
                           f"ORDER BY time, id", (device_id, since, until))

    def rollup_rows(self, table: str, device_id: str, after: float, until: float) -> list[Any]:
        """A device's rows of one rollup table with after < bucket <= until, oldest first."""
        _check(table)
        return self._query(f"SELECT * FROM {table} WHERE device_id = ? AND bucket > ? AND bucket <= ? "
                           f"ORDER BY bucket", (device_id, after, until))

    def latest_rollup_row(self, table: str, device_id: str) -> Any | None:
        _check(table)
        rows = self._query(f"SELECT * FROM {table} WHERE device_id = ? ORDER BY bucket DESC LIMIT 1", (device_id,))
        return rows[0] if rows else None

    def _upsert_rollups(self, db: Any, folded: Iterable[tuple[str, tuple]]) -> None:
        cols = schema.ROLLUP_COLUMNS
        for table, row in folded:
            _check(table)
            db.execute(f"INSERT INTO {table} ({', '.join(cols)}) VALUES ({', '.join('?' * len(cols))}) "
                       f"ON CONFLICT (device_id, bucket) DO UPDATE SET "
                       + ", ".join(f"{c} = excluded.{c}" for c in cols[2:]), row)

    @staticmethod
    def _old(db: Any) -> Callable[[str, str, float], Any]:
        def old(table: str, device_id: str, bucket: float) -> Any:
            _check(table)
            return db.execute(f"SELECT * FROM {table} WHERE device_id = ? AND bucket = ?",
                              (device_id, bucket)).fetchone()
        return old

    def fold_raw(self, before: float, batch: int, fold: FoldFn) -> int:
        """One transaction: up to ``batch`` raw windows older than ``before`` handed to ``fold`` (with a look-up
        of a rollup row as stored), the rollup rows it returns written, the windows deleted; once fewer than
        ``batch`` were left the raw tier is marked as beginning at ``before``. Returns the windows folded."""
        with self._tx() as db:
            rows = db.execute(f"{self._raw_select()}telemetry WHERE time < ? ORDER BY id LIMIT ?",
                              (before, batch)).fetchall()
            self._upsert_rollups(db, fold(rows, self._old(db)))
            db.executemany("DELETE FROM telemetry WHERE device_id = ? AND time = ? AND id = ?",
                           [(r["device_id"], r["time"], r["id"]) for r in rows])
            if len(rows) < batch:
                _mark(db, "raw", before)
        return len(rows)

    def fold_partitions(self, before: float, batch: int, fold: FoldFn) -> tuple[int, list[str]]:
        """PostgreSQL: fold every daily partition that ends by ``before`` and drop it (see the module doc);
        (windows folded, partitions dropped). Nothing on SQLite."""
        if self.backend.name != "postgresql":
            return 0, []
        folded, dropped = 0, []
        for name, lo, hi in schema.partitions(self.backend):
            if hi > before:
                break
            marker = f"fold:{name}"
            while True:
                with self._tx() as db:
                    row = db.execute("SELECT before FROM retention WHERE tier = ? FOR UPDATE", (marker,)).fetchone()
                    last = int(row[0]) if row else -1
                    rows = db.execute(f"{self._raw_select()}{name} WHERE id > ? ORDER BY id LIMIT ?",
                                      (last, batch)).fetchall()
                    self._upsert_rollups(db, fold(rows, self._old(db)))
                    folded += len(rows)
                    if len(rows) < batch:
                        db.execute(f"DROP TABLE {name}")
                        db.execute("DELETE FROM telemetry_keys WHERE time >= ? AND time < ?", (lo, hi))
                        db.execute("DELETE FROM retention WHERE tier = ?", (marker,))
                        dropped.append(name)
                        break
                    db.execute("INSERT INTO retention (tier, before) VALUES (?, ?) ON CONFLICT (tier) DO UPDATE "
                               "SET before = excluded.before", (marker, float(rows[-1]["id"])))
        return folded, dropped

    def expire(self, raw_before: float, m1_before: float, clocks_kept: int) -> tuple[int, int]:
        """Delete quality windows older than ``raw_before``, 1-minute rollups older than ``m1_before`` (and mark
        that tier), and clock estimates not updated since ``raw_before`` but for each device's latest
        ``clocks_kept``; (quality windows, rollups) deleted. PostgreSQL: the dedupe keys of deleted windows go
        too, and the partitions of the days ahead are made."""
        with self._tx() as db:
            quality = db.execute("DELETE FROM quality WHERE time < ?", (raw_before,)).rowcount
            expired = db.execute("DELETE FROM telemetry_1m WHERE bucket < ?", (m1_before,)).rowcount
            _mark(db, "1m", m1_before)
            db.execute("DELETE FROM clocks WHERE updated < ? AND boot_id NOT IN (SELECT c.boot_id FROM clocks c "
                       "WHERE c.device_id = clocks.device_id ORDER BY c.updated DESC LIMIT ?)",
                       (raw_before, clocks_kept))
            if self.backend.name == "postgresql":
                db.execute("DELETE FROM telemetry_keys WHERE time < ?", (raw_before,))
        if self.backend.name == "postgresql":
            import time

            schema.ensure_partitions(self.backend, time.time())
        return quality, expired

    def _query(self, sql: str, args: tuple = ()) -> list[Any]:  # pragma: no cover - Store's
        raise NotImplementedError

    def _tx(self) -> Any:  # pragma: no cover - Store's
        raise NotImplementedError


def _check(table: str) -> None:
    if table not in schema.ROLLUP_TABLES:
        raise ValueError(f"not a rollup table: {table!r}")


def _mark(db: Any, tier: str, before: float) -> None:
    db.execute("INSERT INTO retention (tier, before) VALUES (?, ?) ON CONFLICT (tier) DO UPDATE SET "
               "before = GREATEST(retention.before, excluded.before)", (tier, before))
