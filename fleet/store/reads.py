"""The store's named reads for health, quality, series, the web pages and the rollout driver.

Those modules work on what these return (rows that read by column name and by position, or plain values) and
write no SQL of their own: the SQL, and what differs between SQLite and PostgreSQL in it, stays in
``fleet.store``.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any


def _marks(n: int) -> str:
    return ", ".join("?" * n)


class Reads:
    """Mixed into ``fleet.store.Store`` (``backend`` and ``_query`` come from there)."""

    backend: Any

    def _query(self, sql: str, args: tuple = ()) -> list[Any]:  # pragma: no cover - Store's
        raise NotImplementedError

    # -- devices ----------------------------------------------------------------------------------------
    def device_row(self, device_id: str) -> Any | None:
        """A device's registry row as stored (JSON columns undecoded), or None."""
        rows = self._query("SELECT * FROM devices WHERE id = ?", (device_id,))
        return rows[0] if rows else None

    def has_device(self, device_id: str) -> bool:
        return bool(self._query("SELECT 1 FROM devices WHERE id = ?", (device_id,)))

    def device_rows(self, device_id: str | None = None, tag: str | None = None) -> list[Any]:
        """Registry rows, by id: all, one, or those carrying ``tag``."""
        where, args = ("WHERE id = ?", (device_id,)) if device_id is not None else ("", ())
        if tag is not None:
            where, args = "WHERE id IN (SELECT device_id FROM device_tags WHERE tag = ?)", (tag,)
        return self._query(f"SELECT * FROM devices {where} ORDER BY id", args)

    def active_shas(self, device_ids: Sequence[str]) -> dict[str, str | None]:
        """Device id -> the sha256 of the bundle it runs (None: none), for the known ones of ``device_ids``."""
        ids = list(device_ids)
        if not ids:
            return {}
        return {r[0]: r[1] for r in self._query(
            f"SELECT id, active_sha256 FROM devices WHERE id IN ({_marks(len(ids))})", tuple(ids))}

    # -- health (fleet/health.py) ----------------------------------------------------------------------
    def last_telemetry(self, device_id: str) -> Any | None:
        """The device's newest raw window: cpu_percent, rss_bytes, memory_percent, temperature_c, payload."""
        rows = self._query("SELECT cpu_percent, rss_bytes, memory_percent, temperature_c, payload FROM telemetry "
                           "WHERE device_id = ? ORDER BY time DESC, id DESC LIMIT 1", (device_id,))
        return rows[0] if rows else None

    def last_latency(self, device_id: str) -> Any | None:
        """p50, p95, p99 of the device's newest raw window with inferences."""
        rows = self._query("SELECT p50, p95, p99 FROM telemetry WHERE device_id = ? AND inferences > 0 "
                           "ORDER BY time DESC, id DESC LIMIT 1", (device_id,))
        return rows[0] if rows else None

    def last_deployment(self, device_id: str) -> Any | None:
        """deployment_id, phase, reason of the device in its newest deployment."""
        rows = self._query("SELECT dd.deployment_id, dd.phase, dd.reason FROM deployment_devices dd "
                           "JOIN deployments p ON p.id = dd.deployment_id WHERE dd.device_id = ? "
                           "ORDER BY p.created DESC LIMIT 1", (device_id,))
        return rows[0] if rows else None

    def recent_windows(self, device_id: str, since: float) -> list[tuple[int, int, float, dict[str, int]]]:
        """(inferences, errors, interval_s, errors by kind) of the device's raw windows that ended after
        ``since``."""
        errs = self.backend.json_get("payload", "errors")
        rows = self._query(f"SELECT inferences, errors, interval_s, CASE WHEN errors > 0 THEN {errs} END "
                           f"FROM telemetry WHERE device_id = ? AND time > ?", (device_id, since))
        return [(r[0], r[1], r[2], json.loads(r[3] or "{}")) for r in rows]

    def device_clock(self, device_id: str, boot_id: str) -> Any | None:
        """boot_id, offset_s, jumps of the clock estimate of ``boot_id``, else of the device's latest boot."""
        rows = self._query("SELECT boot_id, offset_s, jumps FROM clocks WHERE device_id = ? "
                           "ORDER BY boot_id = ? DESC, updated DESC LIMIT 1", (device_id, boot_id))
        return rows[0] if rows else None

    def bundle_signer(self, sha256: str) -> Any | None:
        """signed_by, signer, serial of an uploaded bundle."""
        rows = self._query("SELECT signed_by, signer, serial FROM bundles WHERE sha256 = ?", (sha256,))
        return rows[0] if rows else None

    def release_key_row(self, keyid: str) -> Any | None:
        """name, removed of a listed release key."""
        rows = self._query("SELECT name, removed FROM release_keys WHERE keyid = ?", (keyid,))
        return rows[0] if rows else None

    def device_errors(self, device_id: str) -> list[Any]:
        """kind, count, last_time of each error kind the device reported, most first."""
        return self._query("SELECT kind, count, last_time FROM device_errors WHERE device_id = ? "
                           "ORDER BY count DESC, kind", (device_id,))

    def device_events(self, device_id: str, limit: int, kinds: Sequence[str] | None = None) -> list[dict[str, Any]]:
        """The device's newest events (only ``kinds``), newest first."""
        cols = "boot_id, seq, time, kind, deployment_id, sha256, version, reason"
        where, args = "", ()
        if kinds is not None:
            where, args = f"AND kind IN ({_marks(len(kinds))})", tuple(kinds)
        return [dict(r) for r in self._query(f"SELECT {cols} FROM events WHERE device_id = ? {where} "
                                             f"ORDER BY time DESC, id DESC LIMIT ?", (device_id, *args, limit))]

    def device_deployments(self, device_id: str) -> list[dict[str, Any]]:
        """The device's deployments, newest first, with their bundle's name and version."""
        return [dict(r) for r in self._query(
            "SELECT dd.deployment_id, p.bundle_sha256, b.name, b.version, p.created, dd.phase, dd.reason, dd.updated "
            "FROM deployment_devices dd JOIN deployments p ON p.id = dd.deployment_id "
            "LEFT JOIN bundles b ON b.sha256 = p.bundle_sha256 "
            "WHERE dd.device_id = ? ORDER BY p.created DESC", (device_id,))]

    def device_transitions(self, device_id: str, limit: int) -> list[dict[str, Any]]:
        return [{"time": r["time"], "online": bool(r["online"]), "reason": r["reason"]}
                for r in self._query("SELECT time, online, reason FROM transitions WHERE device_id = ? "
                                     "ORDER BY time DESC, id DESC LIMIT ?", (device_id, limit))]

    # -- quality (fleet/quality.py) ------------------------------------------------------------------------
    QUALITY_COLUMNS = ("device_id, sha256, version, time, served, bins, canary_runs, canary_agree, "
                       "canary_max_abs_err, canary_time, labels, confusion, refused")

    def quality_rows(self, since: float, until: float, device_id: str | None = None,
                     sha256: str | None = None) -> list[Any]:
        """Quality windows filed in [since, until) (one device's, one bundle's), oldest first."""
        conds, args = ["time >= ?", "time < ?"], [since, until]
        for col, v in (("device_id", device_id), ("sha256", sha256)):
            if v is not None:
                conds.append(f"{col} = ?")
                args.append(v)
        return self._query(f"SELECT {self.QUALITY_COLUMNS} FROM quality WHERE {' AND '.join(conds)} "
                           f"ORDER BY time, id", tuple(args))

    def has_quality(self, device_id: str) -> bool:
        return bool(self._query("SELECT 1 FROM quality WHERE device_id = ? LIMIT 1", (device_id,)))

    def quality_refusals(self) -> dict[str, int]:
        """Quality messages refused since the database was made, by reason."""
        return {r[0]: r[1] for r in self._query("SELECT reason, count FROM quality_refused ORDER BY reason")}

    # -- series (fleet/series.py) ----------------------------------------------------------------------------
    def raw_series(self, device_id: str, since: float, until: float, step: float | None = None) -> list[tuple]:
        """(time, interval_s, inferences, errors, p50, p95, p99, cpu_percent, rss_bytes, memory_percent,
        temperature_c) of the raw windows in [since, until], or per ``step`` bucket (sums; p50 weighted by
        inferences, p95/p99 the worst; cpu and memory averaged; rss and temperature the max), oldest first."""
        if step is None:
            rows = self._query(
                "SELECT time, interval_s, inferences, errors, p50, p95, p99, cpu_percent, rss_bytes, memory_percent, "
                "temperature_c FROM telemetry WHERE device_id = ? AND time >= ? AND time <= ? ORDER BY time, id",
                (device_id, since, until))
        else:
            rows = self._query(
                f"SELECT {self.backend.bucket('time', '?1')} AS t, sum(interval_s), sum(inferences), sum(errors), "
                "sum(p50 * inferences) / sum(CASE WHEN p50 IS NOT NULL THEN inferences END), max(p95), max(p99), "
                "avg(cpu_percent), max(rss_bytes), avg(memory_percent), max(temperature_c) "
                "FROM telemetry WHERE device_id = ?2 AND time >= ?3 AND time <= ?4 GROUP BY 1 ORDER BY 1",
                (float(step), device_id, since, until))
        return [tuple(r) for r in rows]

    def recent_sums(self, now: float, window_s: float, default_interval_s: float) -> list[tuple]:
        """(device id, inferences, errors, seconds) summed over each device's windows of the last ``window_s``
        seconds, or two of its reporting intervals if longer."""
        return [tuple(r) for r in self._query(
            "SELECT d.id, sum(t.inferences), sum(t.errors), sum(t.interval_s) FROM devices d "
            "JOIN telemetry t ON t.device_id = d.id "
            "AND t.time >= ?1 - GREATEST(?2, 2 * coalesce(d.interval_s, ?3)) GROUP BY d.id",
            (now, window_s, default_interval_s))]

    # -- rollouts (fleet/rollouts.py) ------------------------------------------------------------------------
    def deployment_phases(self, deployment_ids: Sequence[str]) -> list[Any]:
        """deployment_id, device_id, phase, reason, updated of every device in these deployments."""
        ids = list(deployment_ids)
        if not ids:
            return []
        return self._query(f"SELECT deployment_id, device_id, phase, reason, updated FROM deployment_devices "
                           f"WHERE deployment_id IN ({_marks(len(ids))})", tuple(ids))

    def model_health(self, device_id: str, sha256: str, since: float, until: float | None) -> tuple[int, int, Any]:
        """(inferences, errors, inference-weighted p95 or None) of the device's windows on one bundle that ended
        in [since, until)."""
        sha = self.backend.json_get("payload", "active", "sha256", text=True)
        row = self._query(
            "SELECT coalesce(sum(inferences), 0) AS n, coalesce(sum(errors), 0) AS e, "
            "sum(CASE WHEN p95 IS NOT NULL AND inferences > 0 THEN p95 * inferences END) "
            "/ sum(CASE WHEN p95 IS NOT NULL AND inferences > 0 THEN inferences END) AS p95 "
            f"FROM telemetry WHERE device_id = ? AND time >= ? AND time < ? AND {sha} = ?",
            (device_id, since, until if until is not None else float("inf"), sha256))[0]
        return int(row["n"]), int(row["e"]), row["p95"]

    def rollout_rows(self, statuses: Sequence[str] | None = None) -> list[Any]:
        """doc, outbox (JSON text) of every rollout (or those in ``statuses``), newest first."""
        if statuses is None:
            return self._query("SELECT doc, outbox FROM rollouts ORDER BY created DESC, id DESC")
        return self._query(f"SELECT doc, outbox FROM rollouts WHERE status IN ({_marks(len(statuses))}) "
                           f"ORDER BY created DESC, id DESC", tuple(statuses))

    def rollout_row(self, rollout_id: str) -> Any | None:
        rows = self._query("SELECT doc, outbox FROM rollouts WHERE id = ?", (rollout_id,))
        return rows[0] if rows else None

    def rollouts_to_drive(self, statuses: Sequence[str]) -> list[str]:
        """Ids of the rollouts in ``statuses`` or with publishes not yet taken by the broker, oldest first."""
        return [r[0] for r in self._query(f"SELECT id FROM rollouts WHERE status IN ({_marks(len(statuses))}) "
                                          f"OR outbox != '[]' ORDER BY created", tuple(statuses))]

    def save_rollout(self, rollout_id: str, created: float, updated: float, status: str, doc: str, outbox: str,
                     new: bool = False) -> None:
        with self._tx() as db:
            if new:
                db.execute("INSERT INTO rollouts (id, created, updated, status, doc, outbox) VALUES (?, ?, ?, ?, ?, ?)",
                           (rollout_id, created, updated, status, doc, outbox))
            else:
                db.execute("UPDATE rollouts SET updated = ?, status = ?, doc = ?, outbox = ? WHERE id = ?",
                           (updated, status, doc, outbox, rollout_id))

    def set_rollout_outbox(self, rollout_id: str, outbox: str) -> None:
        with self._tx() as db:
            db.execute("UPDATE rollouts SET outbox = ? WHERE id = ?", (outbox, rollout_id))

    def _tx(self) -> Any:  # pragma: no cover - Store's
        raise NotImplementedError
