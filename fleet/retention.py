"""Retention: raw telemetry for a while, then 1-minute and 1-hour rollups, and ``series()`` over all three.

Ages are on the controller's time line: a window's ``time`` is its end as the controller files it (the device's
clock corrected by its estimated offset, ``fleet.clock``), so a window from a device whose clock is 400 days
behind is fresh, not 400 days old.

Policy. Raw windows are kept ``raw_s`` (default 7 days). ``compact()`` folds every raw row older than the
cutoff (now - raw_s, rounded down to a whole hour so that rollup buckets are whole) into its device's
1-minute bucket (``telemetry_1m``) and 1-hour bucket (``telemetry_1h``) and deletes it, a batch of rows per
transaction. 1-minute buckets older than now - rollup_s (rounded down to the hour; default 90 days) are
deleted; hourly ones stay for ever. Quality windows (``quality``, fleet/quality.py) are deleted at the raw cutoff,
with no rollup: their counts are kept as long as raw telemetry. Clock estimates (``clocks``) of boots not heard
from since the raw cutoff are deleted, but for each device's latest ``CLOCKS_KEPT``. Each tier's boundary is kept in the ``retention`` table, and
``series()`` reads raw rows after the raw boundary, 1-minute rows between the two, hourly rows before.

Merging. A rollup row holds sums and maxima, never means, so folding in more windows later (a device
replaying its outbox after the cutoff, a batch that split a bucket) is exact and order-free, and running
compaction again changes nothing (what it folded in is gone from the raw table, in the same transaction):
inferences, errors (and by kind), windows and the seconds they cover are summed; mean latency is
sum(mean x inferences) / inferences; CPU, RSS, memory and temperature keep their sum (mean = sum / windows,
temperature over the windows that had one) and max.

Percentiles. The windows' latency histograms (bucket upper bounds ``protocol.LATENCY_BUCKETS_MS``, the last
bucket open-ended) are added bucket by bucket, and p50/p95/p99 are read off the merged histogram:
the rank q x n falls in one bucket and is interpolated linearly inside it (0 is the first bucket's lower
edge; the largest latency seen caps the top bucket). So a rollup's percentiles are the real percentiles of
every inference in it, to within a bucket. Where a window with inferences came without a histogram, the
bucket falls back to the inference-weighted mean of the windows' p50 and the max of their p95/p99. A point
made of one window keeps that window's exact percentiles. The max of the windows' own p95 and p99 is kept
as well (``p95_max_ms``, ``p99_max_ms``): the worst window, which a merged percentile smooths away.
"""

from __future__ import annotations

import json
import logging
import math
import re
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

from agent.errors import EdgefleetError
from agent.protocol import LATENCY_BUCKETS_MS
from fleet.store.schema import ROLLUP_COLUMNS as _COLUMNS

if TYPE_CHECKING:
    from fleet.store import Store

log = logging.getLogger("edgefleet.fleet.retention")

MINUTE, HOUR, DAY = 60, 3600, 86400
RAW_RETENTION_S = 7 * DAY
ROLLUP_RETENTION_S = 90 * DAY
MIN_RAW_RETENTION_S = HOUR
BATCH = 2000  # raw rows folded per transaction: ingest waits at most this long for the lock
CLOCKS_KEPT = 8  # clock estimates kept per device however old (its latest boots': a replay may still come)
TIERS = (("telemetry_1m", "1m", MINUTE), ("telemetry_1h", "1h", HOUR))
_NBUCKETS = len(LATENCY_BUCKETS_MS) + 1

# The rollup tables' DDL and columns are in fleet/store/schema.py, with every other table.


# -- durations ---------------------------------------------------------------------------------------------
_DURATION = re.compile(r"(\d+(?:\.\d+)?)\s*([smhdw]?)")
_UNITS = {"": 1, "s": 1, "m": MINUTE, "h": HOUR, "d": DAY, "w": 7 * DAY}


def parse_duration(text: str, what: str = "duration") -> float:
    """``"90d"``, ``"12h"``, ``"5m"``, ``"30s"`` or plain seconds -> seconds (> 0)."""
    m = _DURATION.fullmatch(str(text).strip().lower())
    if not m or float(m.group(1)) <= 0:
        raise EdgefleetError(f"invalid {what} {text!r}: expected a positive number with s, m, h, d or w, "
                             f"e.g. 7d or 12h")
    return float(m.group(1)) * _UNITS[m.group(2)]


@dataclass(frozen=True)
class Policy:
    """How long raw telemetry and 1-minute rollups are kept (hourly ones: for ever)."""

    raw_s: float = RAW_RETENTION_S
    rollup_s: float = ROLLUP_RETENTION_S

    def __post_init__(self) -> None:
        if self.raw_s < MIN_RAW_RETENTION_S:
            raise EdgefleetError(f"raw telemetry retention must be at least 1h (got {self.raw_s:g} s): health "
                                 f"reads the last minutes from it")
        if self.rollup_s < self.raw_s:
            raise EdgefleetError(f"the 1-minute rollup retention ({self.rollup_s:g} s) must not be shorter "
                                 f"than the raw retention ({self.raw_s:g} s)")


# -- percentiles ---------------------------------------------------------------------------------------------
def histogram_percentile(hist: list[int], q: float, max_ms: float | None = None) -> float | None:
    """The q-quantile (0 < q <= 1) of a latency histogram, interpolated inside its bucket (see module doc)."""
    n = sum(hist)
    if n <= 0:
        return None
    rank, cum = q * n, 0
    for i, c in enumerate(hist):
        if c <= 0:
            continue
        if cum + c >= rank:
            lo = 0.0 if i == 0 else float(LATENCY_BUCKETS_MS[i - 1])
            hi = float(LATENCY_BUCKETS_MS[i]) if i < len(LATENCY_BUCKETS_MS) else (max_ms if max_ms else lo)
            if max_ms is not None:
                hi = min(hi, max_ms)
                lo = min(lo, hi)
            return round(lo + (hi - lo) * (rank - cum) / c, 3)
        cum += c
    return None


def _max(a: float | None, b: float | None) -> float | None:
    return b if a is None else a if b is None else max(a, b)


# -- the accumulator -----------------------------------------------------------------------------------------
@dataclass
class Agg:
    """Telemetry windows merged: sums and maxima (see the module doc). ``add_raw``/``add`` fold more in."""

    windows: int = 0
    interval_s: float = 0.0
    inferences: int = 0
    errors: int = 0
    errors_by_kind: dict[str, int] = field(default_factory=dict)
    lat_windows: int = 0  # windows that carried a latency summary
    lat_n: int = 0  # their inferences
    lat_sum: float = 0.0  # sum of mean x inferences
    lat_max: float | None = None
    lat_nohist: int = 0  # windows with a latency summary but no usable histogram
    histogram: list[int] | None = None
    p50_sum: float = 0.0  # sum of p50 x inferences (the fallback without histograms)
    p95_max: float | None = None
    p99_max: float | None = None
    exact: tuple[float, float, float] | None = None  # the percentiles of the one window with latency
    cpu_sum: float = 0.0
    cpu_max: float | None = None
    rss_sum: float = 0.0
    rss_max: int | None = None
    mem_sum: float = 0.0
    mem_max: float | None = None
    temp_n: int = 0
    temp_sum: float = 0.0
    temp_max: float | None = None

    def _hist_add(self, hist: list[int] | None) -> bool:
        if not hist or len(hist) != _NBUCKETS:
            return False
        self.histogram = list(hist) if self.histogram is None else [a + b for a, b in zip(self.histogram, hist)]
        return True

    def add_raw(self, r: Any) -> "Agg":
        """Fold in one raw telemetry row (a mapping with the telemetry table's columns)."""
        self.windows += 1
        self.interval_s += r["interval_s"] or 0.0
        self.inferences += r["inferences"]
        self.errors += r["errors"]
        if r["errors_by_kind"]:
            for kind, n in json.loads(r["errors_by_kind"]).items():
                self.errors_by_kind[kind] = self.errors_by_kind.get(kind, 0) + n
        if r["p50"] is not None and r["inferences"] > 0:
            n = r["inferences"]
            mean = r["mean_ms"] if r["mean_ms"] is not None else r["p50"]
            self.exact = (r["p50"], r["p95"], r["p99"]) if self.lat_windows == 0 else None
            self.lat_windows += 1
            self.lat_n += n
            self.lat_sum += mean * n
            self.p50_sum += r["p50"] * n
            self.lat_max = _max(self.lat_max, r["max_ms"] if r["max_ms"] is not None else r["p99"])
            self.p95_max, self.p99_max = _max(self.p95_max, r["p95"]), _max(self.p99_max, r["p99"])
            hist = json.loads(r["histogram"]) if r["histogram"] else None
            if not self._hist_add(hist):
                self.lat_nohist += 1
        self._resources(r["cpu_percent"], r["cpu_percent"], r["rss_bytes"], r["rss_bytes"],
                        r["memory_percent"], r["memory_percent"])
        if r["temperature_c"] is not None:
            self.temp_n += 1
            self.temp_sum += r["temperature_c"]
            self.temp_max = _max(self.temp_max, r["temperature_c"])
        return self

    def _resources(self, cpu, cpu_max, rss, rss_max, mem, mem_max) -> None:
        self.cpu_sum += cpu or 0.0
        self.cpu_max = _max(self.cpu_max, cpu_max)
        self.rss_sum += rss or 0
        self.rss_max = _max(self.rss_max, rss_max)
        self.mem_sum += mem or 0.0
        self.mem_max = _max(self.mem_max, mem_max)

    def add(self, o: "Agg") -> "Agg":
        """Fold in another accumulator."""
        self.exact = (o.exact if self.lat_windows == 0 else self.exact if o.lat_windows == 0 else None)
        self.windows += o.windows
        self.interval_s += o.interval_s
        self.inferences += o.inferences
        self.errors += o.errors
        for kind, n in o.errors_by_kind.items():
            self.errors_by_kind[kind] = self.errors_by_kind.get(kind, 0) + n
        self.lat_windows += o.lat_windows
        self.lat_n += o.lat_n
        self.lat_sum += o.lat_sum
        self.lat_max = _max(self.lat_max, o.lat_max)
        self.lat_nohist += o.lat_nohist
        self._hist_add(o.histogram)
        self.p50_sum += o.p50_sum
        self.p95_max, self.p99_max = _max(self.p95_max, o.p95_max), _max(self.p99_max, o.p99_max)
        self.cpu_sum += o.cpu_sum
        self.cpu_max = _max(self.cpu_max, o.cpu_max)
        self.rss_sum += o.rss_sum
        self.rss_max = _max(self.rss_max, o.rss_max)
        self.mem_sum += o.mem_sum
        self.mem_max = _max(self.mem_max, o.mem_max)
        self.temp_n += o.temp_n
        self.temp_sum += o.temp_sum
        self.temp_max = _max(self.temp_max, o.temp_max)
        return self

    def percentiles(self) -> tuple[float | None, float | None, float | None]:
        if self.lat_windows == 0:
            return None, None, None
        if self.exact is not None:
            return self.exact
        if self.lat_nohist == 0 and self.histogram:
            return tuple(histogram_percentile(self.histogram, q, self.lat_max) for q in (0.5, 0.95, 0.99))
        return round(self.p50_sum / self.lat_n, 3), self.p95_max, self.p99_max

    # -- rollup rows ------------------------------------------------------------------------------------
    @classmethod
    def from_row(cls, r: Any) -> "Agg":
        """An accumulator from a rollup row."""
        a = cls(**{k: r[k] for k in _COLUMNS[2:] if k not in ("errors_by_kind", "histogram", "p50", "p95",
                                                                "p99")})
        a.errors_by_kind = json.loads(r["errors_by_kind"])
        a.histogram = json.loads(r["histogram"]) if r["histogram"] else None
        if a.lat_windows == 1:
            a.exact = (r["p50"], r["p95"], r["p99"])
        return a

    def to_row(self, device_id: str, bucket: float) -> tuple:
        p50, p95, p99 = self.percentiles()
        values = {**self.__dict__, "device_id": device_id, "bucket": bucket, "p50": p50, "p95": p95, "p99": p99,
                  "errors_by_kind": json.dumps(self.errors_by_kind, sort_keys=True),
                  "histogram": json.dumps(self.histogram) if self.histogram is not None else None}
        return tuple(values[c] for c in _COLUMNS)

    def point(self, t: float, resolution: str, duration_s: float) -> dict[str, Any]:
        """One point of a series (the fields are documented at ``series``)."""
        p50, p95, p99 = self.percentiles()
        attempts = self.inferences + self.errors
        w = self.windows or 1
        return {
            "time": t, "resolution": resolution, "duration_s": duration_s, "windows": self.windows,
            "inferences": self.inferences, "errors": self.errors, "errors_by_kind": dict(self.errors_by_kind),
            "inferences_per_min": round(self.inferences * 60 / self.interval_s, 3) if self.interval_s else None,
            "error_rate": round(self.errors / attempts, 6) if attempts else None,
            "latency_mean_ms": round(self.lat_sum / self.lat_n, 3) if self.lat_n else None,
            "p50_ms": p50, "p95_ms": p95, "p99_ms": p99, "latency_max_ms": self.lat_max,
            "p95_max_ms": self.p95_max, "p99_max_ms": self.p99_max,
            "cpu_percent": round(self.cpu_sum / w, 3), "cpu_percent_max": self.cpu_max,
            "rss_bytes": round(self.rss_sum / w), "rss_bytes_max": self.rss_max,
            "memory_percent": round(self.mem_sum / w, 3), "memory_percent_max": self.mem_max,
            "temperature_c": round(self.temp_sum / self.temp_n, 3) if self.temp_n else None,
            "temperature_c_max": self.temp_max,
        }


# -- compaction -------------------------------------------------------------------------------------------
def _floor(t: float, size: float) -> float:
    return math.floor(t / size) * size


def boundaries(store: "Store") -> dict[str, float]:
    """Where each tier begins: raw rows from ``raw``, 1-minute rollups from ``1m`` (-inf: never compacted)."""
    rows = store.retention_boundaries()
    return {"raw": rows.get("raw", -math.inf), "1m": rows.get("1m", -math.inf)}


def compact(store: "Store", now: float | None = None, policy: Policy = Policy(), batch: int = BATCH
            ) -> dict[str, Any]:
    """Fold raw rows older than the raw cutoff into the rollups and delete them (PostgreSQL: drop the daily
    partitions wholly before it); drop expired 1-minute rollups. Incremental (a batch a transaction) and
    idempotent. Returns what it did."""
    now = time.time() if now is None else now
    raw_cutoff = _floor(now - policy.raw_s, HOUR)
    m1_cutoff = _floor(now - policy.rollup_s, HOUR)
    # PostgreSQL: the daily partitions wholly before the cutoff are folded and dropped; then row by row the rest
    folded, dropped = store.fold_partitions(raw_cutoff, batch, _fold)
    while True:
        n = store.fold_raw(raw_cutoff, batch, _fold)
        folded += n
        if n < batch:
            break
    quality, expired = store.expire(raw_cutoff, m1_cutoff, CLOCKS_KEPT)
    if dropped:
        log.info("retention: dropped the telemetry partitions %s", ", ".join(dropped))
    if folded or expired or quality:
        log.info("retention: folded %d raw telemetry rows into rollups, dropped %d expired 1-minute rollups and "
                 "%d quality windows", folded, expired, quality)
    return {"folded": folded, "expired_1m": expired, "quality": quality, "partitions_dropped": dropped}


def _fold(rows: list[Any], old: Callable[[str, str, float], Any]) -> list[tuple[str, tuple]]:
    """Raw windows -> the rollup rows (table, values) they make, merged with the rows already stored (``old``)."""
    out = []
    for table, _, size in TIERS:
        groups: dict[tuple[str, float], Agg] = {}
        for r in rows:
            groups.setdefault((r["device_id"], _floor(r["time"], size)), Agg()).add_raw(r)
        for (device_id, bucket), agg in groups.items():
            prev = old(table, device_id, bucket)
            if prev is not None:
                agg = Agg.from_row(prev).add(agg)
            out.append((table, agg.to_row(device_id, bucket)))
    return out


# -- reading -------------------------------------------------------------------------------------------------
def series(store: "Store", device_id: str, since: float, until: float, step: float | None = None
           ) -> list[dict[str, Any]]:
    """One device's telemetry over [since, until], oldest first, from whichever tier holds each part:
    raw windows after the raw boundary, 1-minute buckets before it, hourly buckets before the 1-minute
    boundary. With ``step`` (seconds), points are merged into step-long buckets (never finer than the tier).

    Each point: ``time`` (a raw window's end, a bucket's start), ``resolution`` (raw, 1m, 1h),
    ``duration_s``, ``windows``, ``inferences``, ``errors``, ``errors_by_kind``, ``inferences_per_min``,
    ``error_rate`` (errors / (inferences + errors)), ``latency_mean_ms``, ``p50_ms``, ``p95_ms``, ``p99_ms``
    (merged as the module doc says), ``latency_max_ms``, ``p95_max_ms``, ``p99_max_ms``, and the mean and
    max of ``cpu_percent``, ``rss_bytes``, ``memory_percent``, ``temperature_c`` (null when unknown).
    """
    if step is not None and step <= 0:
        raise EdgefleetError(f"step must be positive (got {step:g})")
    edge = boundaries(store)
    parts: list[tuple[float, str, float, Agg]] = []  # (time, resolution, duration, agg)
    spans = {"1h": (since, min(until, edge["1m"])), "1m": (max(since, edge["1m"]), min(until, edge["raw"]))}
    for table, name, size in reversed(TIERS):
        lo, hi = spans[name]
        if lo <= hi:
            for r in store.rollup_rows(table, device_id, lo - size, hi):
                if r["bucket"] < hi or hi == until:
                    parts.append((r["bucket"], name, size, Agg.from_row(r)))
    lo = max(since, edge["raw"])
    raw = store.raw_windows(device_id, lo, until) if lo <= until else []
    if step is None:
        return [a.point(t, res, d) for t, res, d, a in parts] + \
            [Agg().add_raw(r).point(r["time"], "raw", r["interval_s"]) for r in raw]
    order = {"raw": 0, "1m": 1, "1h": 2}
    merged: dict[float, list] = {}  # bucket start -> [resolution, duration, Agg]

    def bucket(t: float, res: str, d: float) -> Agg:
        key = _floor(t, step) if step >= d else t
        m = merged.get(key)
        if m is None:
            m = merged[key] = [res, max(step, d), Agg()]
        else:
            m[0] = max(m[0], res, key=order.__getitem__)
            m[1] = max(m[1], d)
        return m[2]

    for t, res, d, a in parts:
        bucket(t, res, d).add(a)
    for r in raw:
        bucket(r["time"], "raw", r["interval_s"]).add_raw(r)
    return [a.point(t, res, d) for t, (res, d, a) in sorted(merged.items())]


def latest_rollup(store: "Store", device_id: str) -> dict[str, Any] | None:
    """The newest rollup point of a device (for a device whose raw rows have all expired), or None."""
    for table, name, size in TIERS:
        row = store.latest_rollup_row(table, device_id)
        if row is not None:
            return Agg.from_row(row).point(row["bucket"], name, size)
    return None


# -- the background job ---------------------------------------------------------------------------------------
class Housekeeper:
    """The controller's upkeep in one thread: the heartbeat sweep (every ``sweep_every_s``), so that
    transitions to offline are recorded even when nobody asks, with ``tasks`` after it, and compaction (every
    ``compact_every_s``).
    ``clock`` is the time source (tests pass their own)."""

    def __init__(self, store: "Store", policy: Policy = Policy(), sweep_every_s: float = 1.0,
                 compact_every_s: float = 60.0, clock: Callable[[], float] = time.time,
                 tasks: list[tuple[str, Callable[[], Any]]] = ()) -> None:
        self.store = store
        self.tasks = list(tasks)  # more upkeep, each round after the sweep: (what, fn), e.g. re-signing desireds
        self.policy = policy
        self.sweep_every_s = sweep_every_s
        self.compact_every_s = compact_every_s
        self.clock = clock
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._failed: set[str] = set()

    def start(self) -> "Housekeeper":
        if self._thread is None:
            self._stop.clear()
            self._thread = threading.Thread(target=self._run, name="edgefleet-housekeeping", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(30)
            self._thread = None

    def compact(self, now: float | None = None) -> dict[str, int]:
        return compact(self.store, self.clock() if now is None else now, self.policy)

    def _run(self) -> None:
        next_compact = time.monotonic()  # once at start, then every compact_every_s
        while not self._stop.is_set():
            self._guard("sweep", lambda: self.store.sweep(self.clock()))
            for what, fn in self.tasks:
                self._guard(what, fn)
            if time.monotonic() >= next_compact:
                self._guard("compaction", self.compact)
                next_compact = time.monotonic() + self.compact_every_s
            self._stop.wait(self.sweep_every_s)

    def _guard(self, what: str, fn: Callable[[], Any]) -> None:
        try:
            fn()
            self._failed.discard(what)
        except Exception as e:  # keep the thread alive: the next round may succeed (a closed store ends it)
            if self._stop.is_set():
                return
            if what not in self._failed:
                log.error("%s failed: %s: %s (logged once until it succeeds)", what, type(e).__name__, e)
                self._failed.add(what)
