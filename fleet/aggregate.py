"""The fleet in figures, from every device's health entry in one pass: what the overview page shows at the top
and what ``/metrics`` exports by default, so that neither grows with the number of devices.

Per group (all devices; each active model and version, ``""`` for devices without one; each tag; a device
counts in every tag it carries): devices by status, and over its devices the sum of recent inferences per
minute, the recent error rate (recent errors / (recent inferences + errors), over the health report's recent
window), the mean and the max of the devices' own latest p95, means of CPU, memory and agent RSS, the highest
temperature, seq gaps and totals since registration. A mean of percentiles is not a percentile of the fleet's
inferences: it says how a typical device does, the max how the worst does. And the worst devices: the highest
recent error rates and the highest latest p95, ``WORST`` of each, ties by device id.

Two ways to the same figures: ``summarize(health)`` over health entries already read, and ``from_store(store)``,
where the database does the counting (``Store.fleet_figures``: one statement, GROUP BY and ORDER BY ... LIMIT),
and only the listed devices' health entries and the devices that sent model quality (drift) are read here. The
overview page and ``/metrics`` use ``from_store``: their cost is one pass of the database over the devices
table, each device's latest rows and the recent window's, not a health entry a device.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Iterable

if TYPE_CHECKING:
    from fleet.store import Store

WORST = 10  # devices in each worst list


@dataclass
class Mean:
    total: float = 0.0
    n: int = 0
    max: float | None = None

    def add(self, v: float | None) -> None:
        if v is None:
            return
        self.total += v
        self.n += 1
        self.max = v if self.max is None else max(self.max, v)

    @property
    def mean(self) -> float | None:
        return self.total / self.n if self.n else None


@dataclass
class Group:
    """Figures over a set of devices."""
    online: int = 0
    offline: int = 0
    inferences_per_min: float = 0.0  # the sum of the devices' recent rates
    recent_inferences: int = 0
    recent_errors: int = 0
    inferences: int = 0  # since registration
    errors: int = 0
    seq_gaps: int = 0
    p95: Mean = field(default_factory=Mean)
    cpu: Mean = field(default_factory=Mean)
    memory: Mean = field(default_factory=Mean)
    rss: Mean = field(default_factory=Mean)
    temperature: Mean = field(default_factory=Mean)
    drift: Mean = field(default_factory=Mean)  # PSI against the bundle's reference

    @property
    def devices(self) -> int:
        return self.online + self.offline

    @property
    def error_rate(self) -> float | None:
        n = self.recent_inferences + self.recent_errors
        return self.recent_errors / n if n else None

    def add(self, h: dict[str, Any]) -> None:
        if h["online"]:
            self.online += 1
        else:
            self.offline += 1
        if h.get("inferences_per_min") is not None:
            self.inferences_per_min += h["inferences_per_min"]
        rec = h.get("recent") or {}
        self.recent_inferences += rec.get("inferences") or 0
        self.recent_errors += rec.get("errors") or 0
        self.inferences += h.get("inferences") or 0
        self.errors += h.get("errors") or 0
        self.seq_gaps += h.get("seq_gaps") or 0
        self.p95.add((h.get("latency_ms") or {}).get("p95"))
        self.cpu.add(h.get("cpu_percent"))
        self.memory.add(h.get("memory_percent"))
        self.rss.add(h.get("rss_bytes"))
        self.temperature.add(h.get("temperature_c"))
        self.drift.add((h.get("quality") or {}).get("psi_ref"))


@dataclass
class Fleet:
    """The fleet's aggregates (``summarize``)."""
    all: Group = field(default_factory=Group)
    models: dict[tuple[str, str], Group] = field(default_factory=dict)  # (name, version) -> its devices
    tags: dict[str, Group] = field(default_factory=dict)
    conflicts: int = 0  # identities two devices use at once
    storage_degraded: int = 0  # state dirs that take no writes
    clocks_off: int = 0  # clocks beyond the controller's bound
    # the first WORST (by id) of each of those three, for the overview's banners
    conflicted: list[dict[str, Any]] = field(default_factory=list)
    no_writes: list[dict[str, Any]] = field(default_factory=list)
    clock_off: list[dict[str, Any]] = field(default_factory=list)
    worst_error_rate: list[dict[str, Any]] = field(default_factory=list)
    worst_p95: list[dict[str, Any]] = field(default_factory=list)


def summarize(health: Iterable[dict[str, Any]], worst: int = WORST) -> Fleet:
    """Every figure above from health entries (``Store.health()``), in one pass."""
    out = Fleet()
    by_error: list[tuple[float, str, dict]] = []  # heaps of the worst: (value, reversed id order, entry)
    by_p95: list[tuple[float, str, dict]] = []
    for h in health:
        out.all.add(h)
        m = h["model"] or {}
        key = (m.get("name") or "", m.get("version") or "")
        (out.models.get(key) or out.models.setdefault(key, Group())).add(h)
        for t in h.get("tags") or ():
            (out.tags.get(t) or out.tags.setdefault(t, Group())).add(h)
        for flagged, listed, count in ((h.get("identity_conflict") is not None, out.conflicted, "conflicts"),
                                       (h.get("storage") in ("full", "read_only"), out.no_writes, "storage_degraded"),
                                       (bool((h.get("clock") or {}).get("exceeds_max")), out.clock_off, "clocks_off")):
            if flagged:
                setattr(out, count, getattr(out, count) + 1)
                listed.append(h)
        _keep(by_error, worst, h.get("error_rate"), h)
        _keep(by_p95, worst, (h.get("latency_ms") or {}).get("p95"), h)
    for listed in (out.conflicted, out.no_writes, out.clock_off):
        listed[:] = sorted(listed, key=lambda h: h["device_id"])[:worst]
    out.worst_error_rate = _worst(by_error)
    out.worst_p95 = _worst(by_p95)
    return out


class _Rev(str):
    """A device id ordered backwards, so that in a min-heap of the worst, of equal values the larger id goes first."""

    def __lt__(self, other: str) -> bool:  # type: ignore[override]
        return str.__gt__(self, other)


def _keep(heap: list, n: int, v: float | None, h: dict) -> None:
    if v is None or v <= 0:  # a device without errors (or latency) is nobody's worst
        return
    item = (v, _Rev(h["device_id"]), h)
    if len(heap) < n:
        heapq.heappush(heap, item)
    elif heap[0][:2] < item[:2]:
        heapq.heapreplace(heap, item)


def _worst(heap: list) -> list[dict[str, Any]]:
    return [h for _, _, h in sorted(heap, key=lambda t: (-t[0], t[2]["device_id"]))]


def from_store(store: "Store", now: float, worst: int = WORST) -> Fleet:
    """What ``summarize(store.health(now=now))`` gives, counted by the database (``Store.fleet_figures``)."""
    from fleet import health

    figs = store.fleet_figures(now, health.RECENT_S, health.CONFLICT_QUIET_S, worst)
    out = Fleet()
    for kind, k1, k2, f in figs["groups"]:
        g = out.all if kind == "all" else out.models.setdefault((k1, k2), Group()) if kind == "model" \
            else out.tags.setdefault(k1, Group())
        _fill(g, f)
    for name, n in figs["flags"].items():
        setattr(out, name, int(n))
    lists = figs["lists"]
    wanted = sorted({i for ids in lists.values() for i in ids})
    entries = {h["device_id"]: h for h in health.entries_for(store, store.device_rows_by_id(wanted), now)}
    for attr, kind in (("conflicted", "conflict"), ("no_writes", "nowrite"), ("clock_off", "clock"),
                       ("worst_error_rate", "error"), ("worst_p95", "p95")):
        setattr(out, attr, [entries[i] for i in lists[kind] if i in entries])
    # drift: over the devices that sent model quality lately (few), from their quality rows
    drift = {r["device_id"]: r["psi_ref"] for r in health.quality.summary(store, now - health.QUALITY_S, now)
             if r["psi_ref"] is not None}
    if drift:
        tags = store.tags_of(list(drift))
        for r in store.device_rows_by_id(list(drift)):
            v = drift[r["id"]]
            key = ("", "") if r["active_name"] is None else (r["active_name"], r["active_version"] or "")
            for g in (out.all, out.models.get(key), *(out.tags.get(t) for t in tags.get(r["id"], []))):
                if g is not None:
                    g.drift.add(v)
    return out


def _fill(g: Group, f: dict[str, Any]) -> None:
    """A Group from one row of ``Store.fleet_figures``."""
    g.online = int(f["online"] or 0)
    g.offline = int(f["devices"] or 0) - g.online
    g.inferences_per_min = float(f["ipm"] or 0.0)
    for name in ("recent_inferences", "recent_errors", "inferences", "errors", "seq_gaps"):
        col = {"recent_inferences": "rinf", "recent_errors": "rerr", "seq_gaps": "gaps"}.get(name, name)
        setattr(g, name, int(f[col] or 0))
    for name, col in (("p95", "p95"), ("cpu", "cpu"), ("memory", "mem"), ("rss", "rss"), ("temperature", "temp")):
        n = int(f[f"{col}_n"] or 0)
        setattr(g, name, Mean(float(f[f"{col}_sum"] or 0.0) if n else 0.0, n, f[f"{col}_max"] if n else None))
