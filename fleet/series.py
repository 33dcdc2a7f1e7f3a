"""What the dashboard's charts and tables read from telemetry: a device's series over time and each
device's recent rates.

``series()`` is the one place charts get their data from. It reads ``Store.series`` (raw windows and the
retention rollups alike, ``fleet.retention.series``) when the store has it, else the raw ``telemetry``
table, and answers column by column (``Series``), which is what uPlot draws. The model-quality charts' columns
(``QualityColumns``: PSI vs the bundle's reference, canary agreement, feedback accuracy) ride along in
``Series.quality``, as ``fleet.quality.series`` computes them over the same range. Reads only.
"""

from __future__ import annotations

import math
import time
from typing import Any

import msgspec

from fleet import quality as fleet_quality
from fleet.store import DEFAULT_INTERVAL_S, Store

DEFAULT_SINCE_S = 3600.0
MAX_SINCE_S = 400 * 86400.0
MAX_POINTS = 1500  # beyond this many points a series is bucketed (step chosen to fit)
RATE_WINDOW_S = 60.0  # inferences/min and error rate: over at least the last minute (2 intervals if longer)


class QualityColumns(msgspec.Struct, forbid_unknown_fields=True):
    """One device's model-quality windows on one bundle (``fleet.quality.series``), column by column, oldest
    first: ``time[i]`` goes with ``psi[i]`` etc. A null is a point without that figure (fewer than
    ``min_served`` outputs for PSI, no canary run, no feedback label)."""

    sha256: str | None  # the bundle (None: the device sent no quality in the range)
    step: float | None  # bucket width in seconds; None: one point per quality window
    min_served: int  # served outputs a point needs before its PSI is judged
    points: int
    time: list[float]  # a window's time on the controller's time line, or a bucket's start
    windows: list[int]
    served: list[int]
    psi: list[float | None]  # vs the bundle's reference profile
    band: list[str | None]  # "stable" | "moderate" | "significant" | "too few"
    canary_runs: list[int]
    canary_agreement: list[float | None]  # agree / runs
    labels: list[int]
    accuracy: list[float | None]  # correct / labels


class Series(msgspec.Struct, forbid_unknown_fields=True):
    """One device's telemetry over time, column by column: ``time[i]`` goes with ``p50[i]`` etc. A null is a
    point that had no such figure (no inferences, no sensor)."""

    device_id: str
    since: float  # unix time of the window's start
    until: float  # unix time the series was read
    step: float | None  # bucket width in seconds; None: one point per stored row (raw window or rollup)
    source: str  # the tiers the points come from, e.g. "raw" or "1h,1m,raw"
    points: int
    time: list[float]  # a raw window's end on the controller's time line (fleet.clock), or a bucket's start
    resolution: list[str]  # raw, 1m, 1h
    duration_s: list[float]  # the seconds a point covers
    inferences: list[int]
    errors: list[int]
    inferences_per_min: list[float | None]
    error_rate: list[float | None]  # errors / (inferences + errors)
    p50: list[float | None]  # ms
    p95: list[float | None]
    p99: list[float | None]
    cpu_percent: list[float | None]  # in a bucket: the mean
    rss_bytes: list[int | None]
    memory_percent: list[float | None]
    temperature_c: list[float | None]
    quality: QualityColumns | None = None  # the model-quality charts' columns over the same range


class SeriesError(ValueError):
    """A ``since`` or ``step`` out of range; the message says which."""


def parse_window(since: str | None, step: str | None) -> tuple[float, float | None]:
    """Query parameters -> (since seconds, step seconds or None), or SeriesError."""
    try:
        s = DEFAULT_SINCE_S if since in (None, "") else float(since)
    except ValueError:
        raise SeriesError(f"since={since!r} is not a number of seconds") from None
    if not math.isfinite(s) or not 0 < s <= MAX_SINCE_S:
        raise SeriesError(f"since={since!r}: must be seconds in (0, {MAX_SINCE_S:g}]")
    if step in (None, ""):
        return s, None
    try:
        st = float(step)
    except ValueError:
        raise SeriesError(f"step={step!r} is not a number of seconds") from None
    if not math.isfinite(st) or not 1 <= st <= s:
        raise SeriesError(f"step={step!r}: must be seconds in [1, since]")
    return s, st


def series(store: Store, device_id: str, since_s: float = DEFAULT_SINCE_S, step_s: float | None = None,
           now: float | None = None) -> Series:
    """The device's telemetry of the last ``since_s`` seconds: one point per stored row, or per ``step_s``
    bucket (also when there would be more than MAX_POINTS points)."""
    now = time.time() if now is None else now
    start = now - since_s
    points = _points(store, device_id, start, now, step_s)
    if step_s is None and len(points) > MAX_POINTS:
        step_s = float(math.ceil(since_s / MAX_POINTS))
        points = _points(store, device_id, start, now, step_s)
    cols: dict[str, list] = {k: [p.get(k) for p in points] for k in (
        "time", "resolution", "duration_s", "inferences", "errors", "inferences_per_min", "error_rate",
        "cpu_percent", "rss_bytes", "memory_percent", "temperature_c")}
    for q in ("p50", "p95", "p99"):
        cols[q] = [p.get(f"{q}_ms") for p in points]
    return Series(device_id=device_id, since=start, until=now, step=step_s,
                  source=",".join(sorted(set(cols["resolution"]))) or "raw", points=len(points), **cols,
                  quality=quality_series(store, device_id, start, now, step_s))


QUALITY_COLUMNS = ("time", "windows", "served", "psi", "band", "canary_runs", "canary_agreement", "labels",
                   "accuracy")


def quality_series(store: Store, device_id: str, since: float, until: float, step: float | None = None
                   ) -> QualityColumns:
    """``fleet.quality.series`` column by column (its points' figures as it computes them)."""
    since = max(since, until - fleet_quality.MAX_WINDOW_S)  # the telemetry range may be longer than quality's
    if not since < until:  # an empty range (since_s rounds to 0): no points
        return QualityColumns(sha256=None, step=step, min_served=fleet_quality.MIN_SERVED, points=0,
                              **{k: [] for k in QUALITY_COLUMNS})
    q = fleet_quality.series(store, device_id, since, until, step=step)
    cols = {k: [p[k] for p in q["points"]] for k in QUALITY_COLUMNS}
    return QualityColumns(sha256=q["sha256"], step=q["step"], min_served=q["min_served"], points=len(q["points"]),
                         **cols)


def _points(store: Store, device_id: str, since: float, until: float, step: float | None) -> list[dict[str, Any]]:
    if hasattr(store, "series"):  # raw windows and the retention rollups (fleet.retention.series)
        return store.series(device_id, since, until, step)
    return raw_points(store, device_id, since, until, step)


def raw_points(store: Store, device_id: str, since: float, until: float, step: float | None = None
               ) -> list[dict[str, Any]]:
    """Points from the raw ``telemetry`` table alone (the fields of ``fleet.retention.series`` that the charts
    use); in a ``step`` bucket, p50 is the inference-weighted mean and p95/p99 the worst window's."""
    rows = store.raw_series(device_id, since, until, step)
    out = []
    for t, interval, inf, err, p50, p95, p99, cpu, rss, mem, temp in rows:
        out.append({
            "time": t, "resolution": "raw", "duration_s": max(interval, step or 0.0), "inferences": inf,
            "errors": err, "inferences_per_min": round(inf * 60.0 / interval, 3) if interval else None,
            "error_rate": round(err / (inf + err), 6) if inf + err else None,
            "p50_ms": p50 and round(p50, 3), "p95_ms": p95, "p99_ms": p99, "cpu_percent": cpu,
            "rss_bytes": rss, "memory_percent": mem, "temperature_c": temp})
    return out


def recent_rates(store: Store, now: float | None = None) -> dict[str, dict[str, float | None]]:
    """Each device's ``inferences_per_min`` and ``error_rate`` over its recent windows (the last minute, or
    two reporting intervals if longer); None where nothing was reported in that time."""
    now = time.time() if now is None else now
    rows = store.recent_sums(now, RATE_WINDOW_S, DEFAULT_INTERVAL_S)
    out = {}
    for device_id, inf, err, interval in rows:
        out[device_id] = {
            "inferences_per_min": round(inf * 60.0 / interval, 2) if interval else None,
            "error_rate": round(err / (inf + err), 6) if inf + err else None,
        }
    return out
