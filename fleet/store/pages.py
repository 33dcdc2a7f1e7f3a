"""The store's reads for listings and the fleet's figures, sized by a page, not by the fleet (issue 15, item 7).

``device_page``: one keyset page of device rows in SQL (the filters in the WHERE clause, ``(sort value, id)``
after the cursor's, ``LIMIT``); ``health_parts``: what the health entries of a page's devices need, in a few
batched queries (``IN (...)``, never one query a device); ``fleet_figures``: the fleet's aggregates (counts by
status, by model and version and by tag, sums, means and maxima of each device's latest and recent figures, the
worst devices by ``ORDER BY ... LIMIT``) in one statement. ``fleet.paging`` owns the cursor and the parameters,
``fleet.health`` the entries' shape and ``fleet.aggregate`` the figures': this module only reads.

Which sorts are SQL (``PAGED_SORTS``): the columns of the devices table (``SQL_SORTS``: id, active model and
version, inferences, errors, free disk: the order over the ids alone, then the page's rows), and the figures
the database derives from each device's latest and recent rows (``FIG_SORTS``: recent rate and error rate,
the latest window's latency, CPU, RSS, memory, temperature, the clock's offset, the status), computed over the
filtered devices for each page (a pass over them, not a health entry each). Silence (an age that moves with the
clock between two pages) and model quality (``fleet.quality``, Python) stay in Python over the kept devices'
entries.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

CHUNK = 500  # ids per IN (...) list
# sort key (fleet.health.SORTS) -> its devices column (NULL: the entry has no value, as SORTS reads it)
SQL_SORTS = {
    "device": "d.id",
    "model": "d.active_name",
    "version": "CASE WHEN d.active_name IS NULL THEN NULL ELSE d.active_version END",
    "inferences": "d.inferences",
    "errors": "d.errors",
    "disk": "d.disk_free_bytes",
}
# sort key -> its column in ``_fig_sql`` (figures the database derives from each device's latest and recent rows)
FIG_SORTS = {"rate": "ipm", "error-rate": "erate", "p50": "p50", "p95": "p95", "p99": "p99", "cpu": "cpu",
             "rss": "rss", "memory": "mem", "temperature": "temp", "clock": "clock_abs", "status": "up"}
PAGED_SORTS = frozenset(SQL_SORTS) | frozenset(FIG_SORTS)  # the rest (silence, quality) stay in Python
_SUMS = ("online", "devices", "ipm", "rinf", "rerr", "inferences", "errors", "gaps",
         "p95_sum", "p95_n", "p95_max", "cpu_sum", "cpu_n", "cpu_max", "mem_sum", "mem_n", "mem_max",
         "rss_sum", "rss_n", "rss_max", "temp_sum", "temp_n", "temp_max")


def like_prefix(prefix: str) -> str:
    """A LIKE pattern for ids starting with ``prefix`` (its ``_`` and ``%`` escaped with ``\\``)."""
    return prefix.replace("\\", "\\\\").replace("_", "\\_").replace("%", "\\%") + "%"


def _marks(n: int) -> str:
    return ", ".join("?" * n)


def _chunks(ids: Sequence[str]) -> list[list[str]]:
    ids = list(ids)
    return [ids[i:i + CHUNK] for i in range(0, len(ids), CHUNK)]


class Pages:
    """Mixed into ``fleet.store.Store`` (``backend``, ``_query``, ``offline_after`` come from there)."""

    backend: Any
    offline_after: float
    max_clock_offset_s: float

    def _query(self, sql: str, args: tuple = ()) -> list[Any]:  # pragma: no cover - Store's
        raise NotImplementedError

    def _online_sql(self, now: float) -> tuple[str, tuple]:
        """SQL true when a device row ``d`` is online at ``now`` (``Store.is_online``)."""
        from fleet.store.core import DEFAULT_INTERVAL_S

        return ("(d.online <> 0 AND ? - d.last_seen <= ? * coalesce(nullif(d.interval_s, 0), ?))",
                (now, self.offline_after, DEFAULT_INTERVAL_S))

    def _round(self, expr: str, digits: int) -> str:
        if self.backend.name == "postgresql":
            return f"round(({expr})::numeric, {digits})::float8"
        return f"round({expr}, {digits})"

    # -- pages -------------------------------------------------------------------------------------------
    def _where(self, now: float, filters: Any, ids: Sequence[str] | None = None) -> tuple[list[str], list[Any]]:
        """The WHERE terms (and their arguments) for ``fleet.paging.Filters`` (and a set of ids)."""
        conds: list[str] = []
        args: list[Any] = []
        if filters.status is not None:
            sql, a = self._online_sql(now)
            conds.append(sql if filters.status == "online" else f"NOT {sql}")
            args += a
        if filters.tag is not None:
            conds.append("d.id IN (SELECT device_id FROM device_tags WHERE tag = ?)")
            args.append(filters.tag)
        if filters.model is not None:
            conds.append("coalesce(d.active_name, '') = ?")
            args.append(filters.model)
        if filters.version is not None:
            conds.append("(CASE WHEN d.active_name IS NULL THEN '' ELSE coalesce(d.active_version, '') END) = ?")
            args.append(filters.version)
        if filters.prefix is not None:  # the range lets an index start at the prefix; LIKE keeps exactly it
            conds.append("d.id >= ? AND d.id LIKE ? ESCAPE '\\'")
            args += [filters.prefix, like_prefix(filters.prefix)]
        if ids is not None:
            conds.append(f"d.id IN ({_marks(len(ids))})" if ids else "1 = 0")
            args += list(ids)
        return conds, args

    def device_page(self, now: float, filters: Any, sort: str, descending: bool, after: tuple | None, limit: int,
                    backwards: bool = False, ids: Sequence[str] | None = None) -> list[Any]:
        """Device rows (``SELECT d.*``) in ``sort`` order (a ``PAGED_SORTS`` key; nulls last, ties by id), those
        after the keyset ``after`` = (null, value, id) of ``fleet.paging.Cursor``, at most ``limit``.
        ``backwards``: those not after it, nearest first (the previous pages). ``ids``: only these (a short
        list: a target's devices). A sort on a derived figure (``FIG_SORTS``) adds the column ``sort_value``."""
        conds, args = self._where(now, filters, ids)
        fig, fig_args = "", ()
        if sort in FIG_SORTS:
            from fleet.health import CONFLICT_QUIET_S, RECENT_S

            where = f"WHERE {' AND '.join(conds)}" if conds else ""
            fig, fig_args = self._fig_sql(now, RECENT_S, CONFLICT_QUIET_S, where, args)
            col, conds, args = f"f.{FIG_SORTS[sort]}", [], []
        else:
            col = SQL_SORTS[sort]
        if after is not None:
            null, value, device_id = after
            value = int(value) if isinstance(value, bool) else value  # status: a boolean, 0 or 1 in SQL
            if sort == "device":
                conds.append(f"d.id {('>=' if backwards else '<') if descending else ('<=' if backwards else '>')} ?")
                args.append(device_id)
            elif null:
                conds.append(f"({col} IS NOT NULL OR d.id <= ?)" if backwards else f"({col} IS NULL AND d.id > ?)")
                args.append(device_id)
            else:
                ahead, behind = (">", "<") if not descending else ("<", ">")
                if backwards:
                    conds.append(f"({col} {behind} ? OR ({col} = ? AND d.id <= ?))")
                else:
                    conds.append(f"({col} {ahead} ? OR ({col} = ? AND d.id > ?) OR {col} IS NULL)")
                args += [value, value, device_id]
        fwd = "DESC" if descending else "ASC"
        rev = "ASC" if descending else "DESC"
        if sort == "device":
            order = f"d.id {rev if backwards else fwd}"
        elif backwards:
            order = f"({col} IS NULL) DESC, {col} {rev}, d.id DESC"
        else:
            order = f"({col} IS NULL), {col} {fwd}, d.id"
        where = f"WHERE {' AND '.join(conds)}" if conds else ""
        if fig:
            return self._query(f"{fig} SELECT d.*, {col} AS sort_value FROM fig f JOIN devices d ON d.id = f.id "
                               f"{where} ORDER BY {order} LIMIT ?", (*fig_args, *args, limit))
        # the order over narrow rows (ids), then the page's rows in full
        found = [r[0] for r in self._query(f"SELECT d.id FROM devices d {where} ORDER BY {order} LIMIT ?",
                                           (*args, limit))]
        rows = {r["id"]: r for r in self.device_rows_by_id(found)}
        return [rows[i] for i in found if i in rows]

    def device_rows_where(self, now: float, filters: Any, ids: Sequence[str] | None = None) -> list[Any]:
        """Every device row the filters keep, by id (for sorts that stay in Python)."""
        conds, args = self._where(now, filters, ids)
        where = f"WHERE {' AND '.join(conds)}" if conds else ""
        return self._query(f"SELECT d.* FROM devices d {where} ORDER BY d.id", tuple(args))

    def device_rows_by_id(self, ids: Sequence[str]) -> list[Any]:
        """The device rows of ``ids`` (the known ones), by id."""
        out: list[Any] = []
        for chunk in _chunks(ids):
            out += self._query(f"SELECT * FROM devices WHERE id IN ({_marks(len(chunk))})", tuple(chunk))
        return sorted(out, key=lambda r: r["id"])

    def tags_of(self, ids: Sequence[str]) -> dict[str, list[str]]:
        """device id -> its tags (sorted), for ``ids``."""
        out: dict[str, list[str]] = {}
        for chunk in _chunks(ids):
            for r in self._query(f"SELECT device_id, tag FROM device_tags WHERE device_id IN ({_marks(len(chunk))}) "
                                 f"ORDER BY device_id, tag", tuple(chunk)):
                out.setdefault(r[0], []).append(r[1])
        return out

    def health_parts(self, ids: Sequence[str], since: float) -> dict[str, dict[str, Any]]:
        """What ``fleet.health`` reads per device, for many at once: {"telemetry", "latency", "deployment",
        "recent", "clocks"} -> device id -> what ``last_telemetry``, ``last_latency``, ``last_deployment``,
        ``recent_windows`` (windows after ``since``) and every clock row would give. A handful of queries a
        CHUNK of ids."""
        import json

        out: dict[str, dict[str, Any]] = {k: {} for k in ("telemetry", "latency", "deployment", "recent", "clocks")}
        errs = self.backend.json_get("t.payload", "errors")
        for chunk in _chunks(ids):
            marks, args = _marks(len(chunk)), tuple(chunk)
            for key, cond in (("telemetry", ""), ("latency", "AND x.inferences > 0")):
                cols = ("t.p50, t.p95, t.p99" if key == "latency"
                        else "t.cpu_percent, t.rss_bytes, t.memory_percent, t.temperature_c, t.payload")
                best: dict[str, Any] = {}
                for r in self._query(
                        f"SELECT t.device_id, t.id, {cols} FROM devices d JOIN telemetry t ON t.device_id = d.id "
                        f"AND t.time = (SELECT x.time FROM telemetry x WHERE x.device_id = d.id {cond} "
                        f"ORDER BY x.time DESC LIMIT 1) {cond.replace('x.', 't.')} WHERE d.id IN ({marks})", args):
                    if r[0] not in best or r[1] > best[r[0]][1]:  # ties on time: the newest row
                        best[r[0]] = r
                out[key].update({k: _sub(r, 2) for k, r in best.items()})
            newest: dict[str, Any] = {}
            for r in self._query(
                    f"SELECT dd.device_id, p.created, dd.deployment_id, dd.phase, dd.reason FROM deployment_devices dd "
                    f"JOIN deployments p ON p.id = dd.deployment_id WHERE dd.device_id IN ({marks})", args):
                if r[0] not in newest or r[1] > newest[r[0]][1]:
                    newest[r[0]] = r
            out["deployment"].update({k: _sub(r, 2) for k, r in newest.items()})
            for r in self._query(f"SELECT t.device_id, t.inferences, t.errors, t.interval_s, "
                                 f"CASE WHEN t.errors > 0 THEN {errs} END FROM telemetry t "
                                 f"WHERE t.device_id IN ({marks}) AND t.time > ?", (*args, since)):
                out["recent"].setdefault(r[0], []).append((r[1], r[2], r[3], json.loads(r[4] or "{}")))
            for r in self._query(f"SELECT device_id, boot_id, offset_s, jumps, updated FROM clocks "
                                 f"WHERE device_id IN ({marks})", args):
                out["clocks"].setdefault(r[0], []).append(r)
        return out

    # -- the fleet's figures --------------------------------------------------------------------------------
    def _fig_sql(self, now: float, recent_s: float, conflict_quiet_s: float, where: str = "",
                 where_args: Sequence[Any] = ()) -> tuple[str, tuple]:
        """``WITH base AS (...), fig AS (...)``: one row a device (of those ``where`` keeps: terms on ``d``, the
        devices table) with the figures its health entry shows, computed by the database, and its arguments."""
        online, online_args = self._online_sql(now)

        def rollup(c: str) -> str:
            return f"(CASE WHEN r1.device_id IS NOT NULL THEN r1.{c} ELSE r2.{c} END)"

        w = f"(CASE WHEN {rollup('windows')} = 0 THEN 1 ELSE {rollup('windows')} END)"
        latency = "\n".join(
            f"           CASE WHEN b.l_last IS NOT NULL THEN ll.{q}\n"
            f"                WHEN b.t_last IS NULL AND {rollup('p50')} IS NOT NULL THEN {rollup(q)} END AS {q},"
            for q in ("p50", "p95", "p99"))
        rate = self._round("CAST(rec.ri AS DOUBLE PRECISION) * 60 / rec.rs", 3)
        erate = self._round("CAST(rec.re AS DOUBLE PRECISION) / (rec.ri + rec.re)", 6)
        fig = f"""
WITH base AS MATERIALIZED (
    SELECT d.id, d.boot_id, coalesce(d.active_name, '') AS name,
           CASE WHEN d.active_name IS NULL THEN '' ELSE coalesce(d.active_version, '') END AS version,
           CASE WHEN {online} THEN 1 ELSE 0 END AS up,
           d.inferences, d.errors, d.seq_max - d.seq_count AS gaps,
           CASE WHEN d.conflict_last IS NOT NULL AND ? - d.conflict_last <= ? THEN 1 ELSE 0 END AS conflict,
           CASE WHEN d.storage IN ('full', 'read_only') THEN 1 ELSE 0 END AS nowrite,
           (SELECT x.time FROM telemetry x WHERE x.device_id = d.id ORDER BY x.time DESC LIMIT 1) AS t_last,
           (SELECT x.time FROM telemetry x WHERE x.device_id = d.id AND x.inferences > 0
            ORDER BY x.time DESC LIMIT 1) AS l_last,
           coalesce((SELECT c.offset_s FROM clocks c WHERE c.device_id = d.id AND c.boot_id = d.boot_id),
                    (SELECT c.offset_s FROM clocks c WHERE c.device_id = d.id ORDER BY c.updated DESC LIMIT 1))
               AS clock
    FROM devices d {where}
), fig AS MATERIALIZED (
    SELECT b.id, b.name, b.version, b.up, b.inferences, b.errors, b.gaps, b.conflict, b.nowrite,
           CASE WHEN b.clock IS NOT NULL AND abs(b.clock) > ? THEN 1 ELSE 0 END AS clock_off,
           CASE WHEN b.clock IS NOT NULL THEN abs({self._round('b.clock', 3)}) END AS clock_abs,
           coalesce(rec.ri, 0) AS rinf, coalesce(rec.re, 0) AS rerr,
           CASE WHEN rec.rs > 0 THEN {rate} END AS ipm,
           CASE WHEN rec.ri + rec.re > 0 THEN {erate} END AS erate,
           {latency}
           CASE WHEN b.t_last IS NOT NULL THEN lt.cpu_percent
                WHEN {rollup('windows')} IS NOT NULL THEN {self._round(f"{rollup('cpu_sum')} / {w}", 3)} END AS cpu,
           CASE WHEN b.t_last IS NOT NULL THEN lt.memory_percent
                WHEN {rollup('windows')} IS NOT NULL THEN {self._round(f"{rollup('mem_sum')} / {w}", 3)} END AS mem,
           CASE WHEN b.t_last IS NOT NULL THEN lt.rss_bytes
                WHEN {rollup('windows')} IS NOT NULL THEN CAST({self._round(f"{rollup('rss_sum')} / {w}", 0)} AS BIGINT)
                END AS rss,
           CASE WHEN b.t_last IS NOT NULL THEN lt.temperature_c
                WHEN {rollup('temp_n')} > 0 THEN {self._round(f"{rollup('temp_sum')} / {rollup('temp_n')}", 3)}
                END AS temp
    FROM base b
    LEFT JOIN telemetry lt ON lt.device_id = b.id AND lt.time = b.t_last
         AND lt.id = (SELECT max(y.id) FROM telemetry y WHERE y.device_id = b.id AND y.time = b.t_last)
    LEFT JOIN telemetry ll ON ll.device_id = b.id AND ll.time = b.l_last AND ll.inferences > 0
         AND ll.id = (SELECT max(y.id) FROM telemetry y WHERE y.device_id = b.id AND y.time = b.l_last
                      AND y.inferences > 0)
    LEFT JOIN (SELECT device_id, sum(inferences) AS ri, sum(errors) AS re, sum(interval_s) AS rs FROM telemetry
               WHERE time > ? GROUP BY device_id) rec ON rec.device_id = b.id
    LEFT JOIN telemetry_1m r1 ON b.t_last IS NULL AND r1.device_id = b.id
         AND r1.bucket = (SELECT max(z.bucket) FROM telemetry_1m z WHERE z.device_id = b.id)
    LEFT JOIN telemetry_1h r2 ON b.t_last IS NULL AND r1.device_id IS NULL AND r2.device_id = b.id
         AND r2.bucket = (SELECT max(z.bucket) FROM telemetry_1h z WHERE z.device_id = b.id)
)"""
        return fig, (*online_args, now, conflict_quiet_s, *where_args, self.max_clock_offset_s, now - recent_s)

    def fleet_figures(self, now: float, recent_s: float, conflict_quiet_s: float, worst: int
                      ) -> dict[str, Any]:
        """The fleet's aggregates in one statement: {"groups": [(kind, key1, key2, {figure: value})], "lists":
        {kind: [device ids]}}. ``kind`` all | model (key1, key2 = name, version; "" for none) | tag (key1);
        figures ``_SUMS``. Lists: ``error``/``p95`` (the ``worst`` highest recent error rates and latest p95,
        ties by id), ``conflict``/``nowrite``/``clock`` (the first ``worst`` flagged devices by id)."""
        fig, args = self._fig_sql(now, recent_s, conflict_quiet_s)
        sums = ("sum(up), count(*), sum(ipm), sum(rinf), sum(rerr), sum(inferences), sum(errors), sum(gaps), "
                + ", ".join(f"sum({c}), count({c}), max({c})" for c in ("p95", "cpu", "mem", "rss", "temp")))
        nulls = ", ".join(["0"] * len(_SUMS))  # unused: zeros, whose type any column takes
        lists = [("error", "erate > 0", "erate DESC, id"), ("p95", "p95 > 0", "p95 DESC, id"),
                 ("conflict", "conflict = 1", "id"), ("nowrite", "nowrite = 1", "id"), ("clock", "clock_off = 1", "id")]
        parts = [f"SELECT 'all', '', '', sum(conflict), sum(nowrite), sum(clock_off), {sums} FROM fig",
                 f"SELECT 'model', name, version, 0, 0, 0, {sums} FROM fig GROUP BY name, version",
                 f"SELECT 'tag', t.tag, '', 0, 0, 0, {sums} FROM fig JOIN device_tags t ON t.device_id = fig.id "
                 f"GROUP BY t.tag"]
        parts += [f"SELECT * FROM (SELECT '{kind}', id, '', 0, 0, 0, {nulls} FROM fig WHERE {cond} "
                  f"ORDER BY {order} LIMIT {int(worst)}) AS {kind}_" for kind, cond, order in lists]
        rows = self._query(fig + "\n" + "\nUNION ALL\n".join(parts), args)
        out: dict[str, Any] = {"groups": [], "lists": {kind: [] for kind, _, _ in lists}, "flags": {}}
        for r in rows:
            kind = r[0]
            if kind in out["lists"]:
                out["lists"][kind].append(r[1])
                continue
            if kind == "all":
                out["flags"] = {"conflicts": r[3] or 0, "storage_degraded": r[4] or 0, "clocks_off": r[5] or 0}
            out["groups"].append((kind, r[1], r[2], dict(zip(_SUMS, r[6:]))))
        return out


def _sub(row: Any, skip: int) -> dict[str, Any]:
    """A row without its first ``skip`` columns, as a dict (read by name)."""
    return dict(zip(list(row.keys())[skip:], tuple(row)[skip:]))
