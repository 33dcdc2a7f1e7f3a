"""What health reports say: each device's entry in the fleet table (filtered, sorted) and one device's report.

Read-only over the store (``Store.health`` and ``Store.device_detail`` call here). Totals (inferences,
errors, errors by kind) come from the device's running counters, so they stay right after retention has
deleted raw rows; rates come from the raw windows of the last ``RECENT_S`` seconds: ``inferences_per_min``
= inferences x 60 / the seconds those windows cover, ``error_rate`` = errors / (inferences + errors).
``latency_ms`` is the latest window that had inferences (the device's own percentiles); CPU, RSS, memory
and temperature the latest window's (the newest rollup's means once every raw row has expired).

``quality`` is the device's model quality over the last ``QUALITY_S`` seconds (``fleet.quality.summary``: drift
against its bundle's reference and the rest of the fleet, canary agreement, feedback accuracy), None when it sent
none; the report adds ``quality_report`` (``fleet.quality.device``: per output and feature, the confusion matrix).

Every time here is the controller's: windows and events are filed at the device's time corrected by its
clock's estimated offset (``fleet.clock``), so "the last 5 minutes" means the same for a device whose clock is
400 days behind. ``clock`` shows that offset (of the device's current boot), whether the device's OS says its
clock is synchronised, and whether the offset is beyond the store's ``max_clock_offset_s``. ``storage`` and
``disk_free_bytes`` are what the device last said of its state dir (its newest state or telemetry).
"""

from __future__ import annotations

import json
import time
from typing import TYPE_CHECKING, Any

from agent.errors import EdgefleetError
from fleet import quality, retention, targets

if TYPE_CHECKING:
    import sqlite3

    from fleet.store import Store

RECENT_S = 300.0
QUALITY_S = 600.0  # the table's and the report's model quality (fleet/quality.py): over the last 10 minutes
CONFLICT_QUIET_S = 600.0  # an identity conflict (two devices, one identity) shows until this long after its last takeover
ERROR_EVENTS = ("failed", "error", "rolled_back", "identity_conflict")
STATUSES = ("online", "offline")

# sort keys: column -> (its value in a health entry, descending by default)
SORTS: dict[str, tuple[Any, bool]] = {
    "device": (lambda h: h["device_id"], False),
    "status": (lambda h: h["online"], False),  # offline first
    "model": (lambda h: (h["model"] or {}).get("name"), False),
    "version": (lambda h: (h["model"] or {}).get("version"), False),
    "inferences": (lambda h: h["inferences"], True),
    "rate": (lambda h: h["inferences_per_min"], True),
    "errors": (lambda h: h["errors"], True),
    "error-rate": (lambda h: h["error_rate"], True),
    "p50": (lambda h: (h["latency_ms"] or {}).get("p50"), True),
    "p95": (lambda h: (h["latency_ms"] or {}).get("p95"), True),
    "p99": (lambda h: (h["latency_ms"] or {}).get("p99"), True),
    "cpu": (lambda h: h["cpu_percent"], True),
    "rss": (lambda h: h["rss_bytes"], True),
    "memory": (lambda h: h["memory_percent"], True),
    "temperature": (lambda h: h["temperature_c"], True),
    "last-seen": (lambda h: h["last_seen_ago_s"], True),  # the longest silent first
    "disk": (lambda h: h["disk_free_bytes"], False),  # the least free first
    "clock": (lambda h: None if h["clock"]["offset_s"] is None else abs(h["clock"]["offset_s"]), True),
    "drift": (lambda h: (h["quality"] or {}).get("psi_ref"), True),  # the most drifted first
    "canary": (lambda h: (h["quality"] or {}).get("canary_agreement"), False),  # the lowest agreement first
    "accuracy": (lambda h: (h["quality"] or {}).get("accuracy"), False),  # the least accurate first
}
_ALIASES = {"temp": "temperature", "mem": "memory", "inferences-per-min": "rate", "seen": "last-seen",
            "id": "device", "disk-free": "disk", "clock-offset": "clock", "psi": "drift", "acc": "accuracy"}


def check_sort(sort: str) -> str:
    """A sort column as the user wrote it (``last_seen``, ``temp``...) -> its key in SORTS, or an error."""
    key = sort.strip().lower().replace("_", "-")
    key = _ALIASES.get(key, key)
    if key not in SORTS:
        raise EdgefleetError(f"cannot sort by {sort!r}: choose from {', '.join(SORTS)}")
    return key


def sort_entries(entries: list[dict[str, Any]], sort: str = "device", descending: bool | None = None
                 ) -> list[dict[str, Any]]:
    """Sort health entries by a SORTS column; nulls last either way, ties by device id."""
    value, default_desc = SORTS[check_sort(sort)]
    desc = default_desc if descending is None else descending
    out = sorted(entries, key=lambda h: h["device_id"])
    known = [h for h in out if value(h) is not None]
    return sorted(known, key=value, reverse=desc) + [h for h in out if value(h) is None]


def entries(store: "Store", device_id: str | None = None, now: float | None = None, tag: str | None = None,
            status: str | None = None, sort: str | None = None, descending: bool | None = None
            ) -> list[dict[str, Any]]:
    """Every device's health (or one's), optionally only those with ``tag`` (an unknown tag raises
    ``targets.UnknownTarget``) or ``status`` (online|offline), sorted by a SORTS column (device id by
    default; figures largest first, nulls last, unless ``descending`` says otherwise)."""
    now = time.time() if now is None else now
    if status is not None and status not in STATUSES:
        raise EdgefleetError(f"invalid status {status!r}: choose online or offline")
    key = check_sort(sort) if sort is not None else "device"
    if tag is not None:
        targets.check_tag(tag)
        if not store.device_ids(tag=tag):
            raise targets.UnknownTarget(f"unknown tag {tag!r}: no device carries it")
    out = entries_for(store, store.device_rows(device_id, tag), now)
    if status is not None:
        out = [h for h in out if h["status"] == status]
    return sort_entries(out, key, descending)


def entries_for(store: "Store", rows: list[Any], now: float) -> list[dict[str, Any]]:
    """The health entries of these registry rows, in their order: what ``entry`` gives for each, read in a few
    batched queries per ``fleet.store.pages.CHUNK`` devices rather than several a device."""
    out: list[dict[str, Any]] = []
    step = 5000  # devices whose parts are held in memory at once
    for i in range(0, len(rows), step):
        part = rows[i:i + step]
        ids = [r["id"] for r in part]
        tags = store.tags_of(ids)
        qualities = model_quality(store, now, ids)
        parts = store.health_parts(ids, now - RECENT_S)
        out += [entry(store, r, now, tags.get(r["id"], []), qualities.get(r["id"]),
                      {k: v.get(r["id"]) for k, v in parts.items()}) for r in part]
    return out


def model_quality(store: "Store", now: float, device_ids: list[str]) -> dict[str, dict[str, Any]]:
    """Device id -> its model quality over the last QUALITY_S seconds (a ``fleet.quality.summary`` row, without
    the device id, with ``window_s``), for the devices that sent quality in that time."""
    if not device_ids:
        return {}
    rows = quality.summary(store, now - QUALITY_S, now, device_ids)
    return {r["device_id"]: {"window_s": QUALITY_S, **{k: v for k, v in r.items() if k != "device_id"}}
            for r in rows}


def entry(store: "Store", d: "sqlite3.Row", now: float, tags: list[str],
          model_quality: dict[str, Any] | None = None, parts: dict[str, Any] | None = None) -> dict[str, Any]:
    """One device's health, from its registry row (and its ``model_quality`` row, when it sent quality).
    ``parts``: its rows as ``Store.health_parts`` read them for many devices at once (else read here)."""
    if parts is None:
        t = store.last_telemetry(d["id"])
        lat = store.last_latency(d["id"])
        dep = store.last_deployment(d["id"])
        rec = recent(store, d["id"], now)
    else:
        t, lat, dep = parts["telemetry"], parts["latency"], parts["deployment"]
        rec = _recent(parts["recent"] or [])
    outbox = json.loads(t["payload"]) if t else {}
    res: dict[str, Any] = {k: t and t[k] for k in ("cpu_percent", "rss_bytes", "memory_percent", "temperature_c")}
    latency = dict(lat) if lat else None
    if t is None:  # every raw row has expired: the newest rollup tells what the device looked like
        p = retention.latest_rollup(store, d["id"])
        if p is not None:
            res = {k: p[k] for k in res}
            if p["p50_ms"] is not None:
                latency = {"p50": p["p50_ms"], "p95": p["p95_ms"], "p99": p["p99_ms"]}
    online = store.is_online(d, now)
    return {
        "device_id": d["id"],
        "online": online,
        "status": "online" if online else "offline",
        "status_since": d["status_time"],  # the latest transition's time
        "tags": tags,
        "model": {k: d[f"active_{k}"] for k in ("name", "version", "precision", "runtime", "sha256", "signed_by",
                                                  "serial")}
        if d["active_name"] is not None else None,
        "inferences": d["inferences"],
        "errors": d["errors"],
        "inferences_per_min": rec["inferences_per_min"],
        "error_rate": rec["error_rate"],
        "recent": rec,
        "latency_ms": latency,
        **res,
        "last_seen": d["last_seen"],
        "last_seen_ago_s": round(max(0.0, now - d["last_seen"]), 3),
        "deployment": dict(dep) if dep else None,
        # seq accounting (see fleet.store) and the device's own outbox, from its latest telemetry
        "seq_gaps": d["seq_max"] - d["seq_count"],
        "duplicates": d["duplicates"],
        "outbox_dropped": outbox.get("outbox_dropped", 0) if t else None,
        "outbox_pending": outbox.get("outbox_pending", 0) if t else None,
        # two devices using this one identity (fleet.store._check_boot), while it is recent
        "identity_conflict": {"since": d["conflict_first"], "last": d["conflict_last"], "takeovers": d["conflicts"],
                              "boot_ids": json.loads(d["boots"])}
        if d["conflict_last"] is not None and now - d["conflict_last"] <= CONFLICT_QUIET_S else None,
        # what the device last said of its state dir (fleet.store._report)
        "storage": d["storage"],
        "storage_since": d["storage_since"],
        "disk_free_bytes": d["disk_free_bytes"],
        "clock": clock(store, d, False if parts is None else _clock_row(parts["clocks"] or [], d["boot_id"])),
        # model quality over the last QUALITY_S seconds (fleet/quality.py): drift, canary, feedback accuracy
        "quality": model_quality,
        # accelerators (issue 14): what really runs the active model, as its state says (null: no model active,
        # or an agent that does not say), and each accelerator's load in the latest telemetry (null: no telemetry
        # kept, or an agent that does not report them; [] : it has none)
        "serving": json.loads(d["active_serving"]) if d["active_serving"] and d["active_name"] is not None else None,
        "accelerators": outbox.get("accelerators") if t else None,
    }


def _clock_row(rows: list[Any], boot_id: str) -> Any | None:
    """Of a device's clock rows, the one ``Store.device_clock`` picks: its current boot's, else the latest."""
    return max(rows, key=lambda r: (r["boot_id"] == boot_id, r["updated"]), default=None)


def clock(store: "Store", d: "sqlite3.Row", row: Any = False) -> dict[str, Any]:
    """The device's clock: the offset estimated for its current boot (or its latest, before the current boot has
    sent a window or event), the OS's word on synchronisation, and the flag. ``row``: its clock row, when read
    already (None: it has none)."""
    if row is False:
        row = store.device_clock(d["id"], d["boot_id"])
    offset = row["offset_s"] if row else None
    bound = store.max_clock_offset_s
    return {"offset_s": None if offset is None else round(offset, 3),
            "synced": None if d["clock_synced"] is None else bool(d["clock_synced"]),
            "exceeds_max": offset is not None and abs(offset) > bound, "max_offset_s": bound,
            "boot_id": row["boot_id"] if row else None, "jumps": row["jumps"] if row else 0}


def signer(store: "Store", d: "sqlite3.Row") -> dict[str, Any] | None:
    """Which release key signed the device's running bundle and its serial: what the device says (its state's
    ``active.signed_by``/``serial``), else what the controller recorded when that bundle was uploaded. None when
    neither knows the running bundle; ``keyid`` None: an unsigned bundle (taken under --allow-unsigned)."""
    if d["active_sha256"] is None:
        return None
    keyid, serial, source = d["active_signed_by"], d["active_serial"], "device"
    b = store.bundle_signer(d["active_sha256"])
    if keyid is None and serial is None:
        if b is None:
            return None
        keyid, serial, source = b["signed_by"], b["serial"], "bundle"
    key = store.release_key_row(keyid) if keyid else None
    name = key["name"] if key else (b["signer"] if b is not None and b["signed_by"] == keyid else None)
    return {"keyid": keyid, "name": name, "serial": serial, "source": source,
            "removed": bool(key and key["removed"] is not None)}


def disk_warnings(store: "Store", devices: list[str], bundle: dict[str, Any], now: float | None = None
                  ) -> list[str]:
    """What to tell whoever deploys ``bundle`` to ``devices``: each device that last reported less free disk
    than the bundle needs (its size twice: the download and its unpacked copy), or storage that takes no
    writes. Devices that never reported their disk are not named."""
    from fleet.pages import fmt_ago, fmt_bytes

    now = time.time() if now is None else now
    need = 2 * bundle["size"]
    out = []
    reports = store.disk_reports(devices)
    for device_id in devices:  # in the order they were named
        r = reports.get(device_id)
        if r is None:
            continue
        if r["storage"] in ("full", "read_only"):
            out.append(f"{device_id} reports its storage {r['storage'].replace('_', '-')}: it cannot take the "
                       f"bundle until that is fixed")
        elif r["disk_free_bytes"] is not None and r["disk_free_bytes"] < need:
            out.append(f"{device_id} last reported {fmt_bytes(r['disk_free_bytes'])} free "
                       f"({fmt_ago(now - r['disk_time'])}); the bundle needs {fmt_bytes(need)} (2 x "
                       f"{fmt_bytes(bundle['size'])}: the download and its unpacked copy)")
    return out


def recent(store: "Store", device_id: str, now: float) -> dict[str, Any]:
    """The device's telemetry windows of the last RECENT_S seconds, summed: rates, errors by kind."""
    return _recent(store.recent_windows(device_id, now - RECENT_S))


def _recent(rows: list[tuple[int, int, float, dict[str, int]]]) -> dict[str, Any]:
    inferences, errors = sum(r[0] for r in rows), sum(r[1] for r in rows)
    seconds = sum(r[2] for r in rows)
    by_kind: dict[str, int] = {}
    for r in rows:
        for kind, n in r[3].items():
            by_kind[kind] = by_kind.get(kind, 0) + n
    return {"window_s": RECENT_S, "windows": len(rows), "inferences": inferences, "errors": errors,
            "errors_by_kind": by_kind,
            "inferences_per_min": round(inferences * 60 / seconds, 3) if seconds else None,
            "error_rate": round(errors / (inferences + errors), 6) if inferences + errors else None}


def report(store: "Store", device_id: str, events: int = 20, transitions: int = 50) -> dict[str, Any] | None:
    """One device's report: its health entry plus identity, errors (by kind from telemetry, and the error
    events), recent events, deployment history and online/offline transitions (newest first)."""
    d = store.device_row(device_id)
    if d is None:
        return None
    now = time.time()
    h = entry(store, d, now, store.tags(device_id).get(device_id, []),
              model_quality(store, now, [device_id]).get(device_id))
    # the full quality report over the same window: drift per output and feature, canary, feedback scores
    h["quality_report"] = quality.device(store, device_id, now - QUALITY_S, now)
    h["identity"] = {"arch": d["arch"], "agent_version": d["agent_version"],
                     "runtimes": json.loads(d["runtimes"]), "cpu_flags": json.loads(d["cpu_flags"]),
                     "devices": json.loads(d["runtime_devices"]), "boot_id": d["boot_id"],
                     "first_seen": d["first_seen"]}
    h["errors_by_kind"] = {r["kind"]: {"count": r["count"], "last_time": r["last_time"]}
                           for r in store.device_errors(device_id)}
    h["events"] = store.device_events(device_id, events)
    h["recent_errors"] = store.device_events(device_id, events, kinds=tuple(ERROR_EVENTS))
    h["deployments"] = store.device_deployments(device_id)
    h["signer"] = signer(store, d)
    h["transitions"] = store.device_transitions(device_id, transitions)
    return h
