"""``/metrics``: the fleet in Prometheus' text exposition format (version 0.0.4), for users who already
scrape with Prometheus and chart with Grafana.

By default the series are the fleet's aggregates (``fleet.aggregate``), whose number does not grow with the
devices: devices by state; per active model and version (labels ``model``, ``version``; empty for devices
without a model) and per tag (label ``tag``; a device counts in each of its tags): devices by state, the sum of
recent inferences per minute, the recent error ratio, and per model the mean and max of the devices' latest p95
(label ``stat``: a mean of percentiles is how a typical device does, not a percentile of all inferences), the
mean CPU, memory and agent RSS, the highest temperature, seq gaps and the highest drift PSI; fleet-wide,
inferences and errors since registration, identity conflicts, storage that takes no writes, clocks beyond the
bound, and the quality messages refused by reason.

With ``per_device`` (``fleet serve --metrics-per-device``, ``Fleet(metrics_per_device=True)``) the per-device
series follow too (labels ``device``, ``model``, ``version``): online, inferences and errors (counters since the
device registered), the latest window's latency percentiles (gauges with a ``quantile`` label), CPU, RSS, memory,
temperature (only when the device has a sensor), last seen, seq gaps and whether two devices use its identity;
its free disk and storage state (a state set: one sample per state, 1 for the current one), its clock's offset
from the controller's, whether that is beyond ``--max-clock-offset`` and whether its OS says the clock is
synchronised; model quality over health's last 10 minutes (fleet/quality.py): drift PSI against the bundle's
reference and against the fleet (label ``against``), canary agreement, feedback accuracy and labels;
accelerators (issue 14): each one's utilisation and memory used / total (labels ``accelerator``, ``kind``), and
what really runs the active model (``edgefleet_device_serving_info``, labels ``runtime_device``, ``provider``).
That is one series per device and figure: at 10,000 devices, megabytes a scrape, which Prometheus users avoid.

By default counted by the database (``fleet.aggregate.from_store``); with per-device series built from
``Store.health()``; a scrape never scans all telemetry (it reads the last 10 minutes of quality windows once).
"""

from __future__ import annotations

import time
from typing import Any

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from fleet import aggregate, quality
from fleet.store import Store

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# name, type, help, how to read it from one device's health (None: no sample for that device)
_DEVICE = [
    ("edgefleet_device_online", "gauge", "1 if the device is online (last will, heartbeat timeout), else 0.",
     lambda h: int(h["online"])),
    ("edgefleet_device_inferences_total", "counter", "Inferences the device served, since it registered.",
     lambda h: h["inferences"]),
    ("edgefleet_device_errors_total", "counter", "Runtime errors the device reported, since it registered.",
     lambda h: h["errors"]),
    ("edgefleet_device_cpu_percent", "gauge", "The agent's CPU use in its latest telemetry window, percent.",
     lambda h: h["cpu_percent"]),
    ("edgefleet_device_rss_bytes", "gauge", "The agent's resident memory in its latest telemetry window.",
     lambda h: h["rss_bytes"]),
    ("edgefleet_device_memory_percent", "gauge", "The device's memory in use in its latest telemetry window, "
     "percent.", lambda h: h["memory_percent"]),
    ("edgefleet_device_temperature_celsius", "gauge", "The device's temperature (absent when it has no sensor).",
     lambda h: h["temperature_c"]),
    ("edgefleet_device_last_seen_timestamp_seconds", "gauge", "Unix time of the last message from the device.",
     lambda h: h["last_seen"]),
    ("edgefleet_device_seq_gaps", "gauge", "Messages the device sent that never arrived (gaps in its seq).",
     lambda h: h["seq_gaps"]),
    ("edgefleet_device_identity_conflict", "gauge", "1 while two devices use this device's identity (boot ids "
     "alternating: a cloned image), else 0.", lambda h: int(h.get("identity_conflict") is not None)),
    ("edgefleet_device_disk_free_bytes", "gauge", "Free space in the filesystem of the device's state dir, from its "
     "latest telemetry.", lambda h: h.get("disk_free_bytes")),
    ("edgefleet_device_clock_offset_seconds", "gauge", "The controller's clock minus the device's (positive: the "
     "device is behind), estimated from its messages; its reports are filed corrected by it.",
     lambda h: (h.get("clock") or {}).get("offset_s")),
    ("edgefleet_device_clock_offset_exceeded", "gauge", "1 when the device's clock is further off than the "
     "controller's --max-clock-offset, else 0.",
     lambda h: None if (h.get("clock") or {}).get("offset_s") is None else int(h["clock"]["exceeds_max"])),
    ("edgefleet_device_clock_synced", "gauge", "1 when the device's OS says its clock is synchronised, 0 when it "
     "says not (absent: unknown).",
     lambda h: None if (h.get("clock") or {}).get("synced") is None else int(h["clock"]["synced"])),
]
STORAGE_STATES = ("ok", "full", "read_only")  # protocol.StorageState
_STORAGE = ("edgefleet_device_storage", "gauge",
            "Whether the device's state dir takes writes: 1 for its current state (ok, full, read_only), 0 for the "
            "others.")
# model quality over health's quality window (fleet/health.QUALITY_S, fleet/quality.py); absent when not judged
_QUALITY = [
    ("edgefleet_canary_agreement", "gauge", "The share of the device's golden inputs (canary) whose output agreed "
     "with the fp32 reference, over the last 10 minutes.", lambda mq: mq["canary_agreement"]),
    ("edgefleet_feedback_accuracy", "gauge", "The device's accuracy on the labels its applications gave, over the "
     "last 10 minutes.", lambda mq: mq["accuracy"]),
    ("edgefleet_feedback_labels", "gauge", "Labels the device's applications gave, over the last 10 minutes.",
     lambda mq: mq["labels"]),
]
_DRIFT = ("edgefleet_quality_drift_psi", "gauge",
          "The device's output drift over the last 10 minutes: the largest PSI over its outputs' features against "
          "the bundle's reference (against=reference) or the other devices on the bundle (against=fleet); absent "
          "below 50 served outputs. 0.1 and 0.25 are the usual moderate and significant bands.")
_REFUSED = ("edgefleet_quality_refused_total", "counter",
            "Quality messages the controller refused (they did not fit the bundle's profile), by reason.")
# accelerators (issue 14): from each device's latest telemetry, only the figures its machine gives (absent: unknown)
_ACCELERATOR = [
    ("edgefleet_device_accelerator_utilization_percent", "gauge", "An accelerator's utilisation over the device's "
     "latest telemetry window, percent (absent where the machine does not say, e.g. Intel GPUs).",
     "utilization_percent"),
    ("edgefleet_device_accelerator_memory_used_bytes", "gauge", "An accelerator's memory in use, from the device's "
     "latest telemetry (absent where the machine does not say).", "memory_used_bytes"),
    ("edgefleet_device_accelerator_memory_total_bytes", "gauge", "An accelerator's memory, from the device's latest "
     "telemetry (absent where the machine does not say).", "memory_total_bytes"),
]
_SERVING = ("edgefleet_device_serving_info", "gauge",
            "1 for what really runs the device's active model: the runtime's device (runtime_device) and provider, as "
            "its state says (absent: no model active, or an agent that does not say).")
_LATENCY = ("edgefleet_device_latency_ms", "gauge",
            "Inference latency percentiles of the device's latest telemetry window with inferences, ms.")
QUANTILES = (("0.5", "p50"), ("0.95", "p95"), ("0.99", "p99"))


def escape_label(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _escape_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def _labels(pairs: list[tuple[str, str]]) -> str:
    return "{" + ",".join(f'{k}="{escape_label(v)}"' for k, v in pairs) + "}"


def _number(v: float | int) -> str:
    if isinstance(v, bool):
        v = int(v)
    if isinstance(v, int):
        return str(v)
    return repr(float(v)) if v == v else "NaN"


def render(health: list[dict[str, Any]], refused: dict[str, int] | None = None, per_device: bool = False,
           agg: "aggregate.Fleet | None" = None) -> str:
    """The exposition text for the devices' health (``Store.health()``) and the quality messages refused by reason
    (``fleet.quality.refused``): the fleet's aggregates (``agg``, else summed from ``health``), and with
    ``per_device`` each device's series too."""
    lines: list[str] = []

    def family(name: str, kind: str, help_text: str, samples: list[tuple[str, float]]) -> None:
        lines.append(f"# HELP {name} {_escape_help(help_text)}")
        lines.append(f"# TYPE {name} {kind}")
        lines.extend(f"{name}{labels} {_number(v)}" for labels, v in samples)

    agg = aggregate.summarize(health) if agg is None else agg
    family("edgefleet_devices", "gauge", "Devices known to the controller, by state.",
           [(_labels([("state", "online")]), agg.all.online), (_labels([("state", "offline")]), agg.all.offline)])
    family("edgefleet_identity_conflicts", "gauge", "Device identities used by two devices at once (a cloned image).",
           [("", agg.conflicts)])
    family("edgefleet_storage_degraded", "gauge", "Devices whose state dir takes no writes (full or read-only).",
           [("", agg.storage_degraded)])
    family("edgefleet_clock_offset_exceeded", "gauge", "Devices whose clock is further off than --max-clock-offset.",
           [("", agg.clocks_off)])
    _aggregates(family, agg)
    if per_device:
        _per_device(family, health)
    family(*_REFUSED, [(_labels([("reason", reason)]), n) for reason, n in sorted((refused or {}).items())])
    return "\n".join(lines) + "\n"


# per model and version (labels model, version) and per tag (label tag): name, help, how to read it from a Group
_MODEL = [
    ("edgefleet_model_inferences_per_minute", "The sum of the devices' recent inferences per minute (over health's "
     "recent window), by active model and version.", lambda g: g.inferences_per_min),
    ("edgefleet_model_error_ratio", "Recent errors / (recent inferences + errors) over the devices on this model and "
     "version (absent without recent inferences).", lambda g: g.error_rate),
    ("edgefleet_model_cpu_percent_mean", "The mean of the devices' CPU use in their latest window, percent.",
     lambda g: g.cpu.mean),
    ("edgefleet_model_memory_percent_mean", "The mean of the devices' memory in use in their latest window, percent.",
     lambda g: g.memory.mean),
    ("edgefleet_model_rss_bytes_mean", "The mean of the agents' resident memory in their latest window.",
     lambda g: g.rss.mean),
    ("edgefleet_model_temperature_celsius_max", "The highest temperature of the devices (those with a sensor).",
     lambda g: g.temperature.max),
    ("edgefleet_model_seq_gaps", "The sum of the devices' lost messages (gaps in their seq).", lambda g: g.seq_gaps),
    ("edgefleet_model_drift_psi_max", "The highest output drift PSI against the bundle's reference over the last 10 "
     "minutes, among the devices judged.", lambda g: g.drift.max),
]
_TAG = [
    ("edgefleet_tag_inferences_per_minute", "The sum of the devices' recent inferences per minute, by tag (a device "
     "counts in each of its tags).", lambda g: g.inferences_per_min),
    ("edgefleet_tag_error_ratio", "Recent errors / (recent inferences + errors) over the devices with this tag "
     "(absent without recent inferences).", lambda g: g.error_rate),
]


def _aggregates(family: Any, agg: "aggregate.Fleet") -> None:
    """The series whose number grows with models, versions and tags, never with devices."""
    family("edgefleet_inferences_total", "counter", "Inferences the devices served, since each registered (the sum "
           "of their counters).", [("", agg.all.inferences)])
    family("edgefleet_errors_total", "counter", "Runtime errors the devices reported, since each registered (the sum "
           "of their counters).", [("", agg.all.errors)])
    models = sorted(agg.models.items())
    model_labels = {k: [("model", k[0]), ("version", k[1])] for k, _ in models}
    family("edgefleet_model_devices", "gauge", "Devices by active model, version (empty: no model active) and state.",
           [(_labels([*model_labels[k], ("state", st)]), n) for k, g in models
            for st, n in (("online", g.online), ("offline", g.offline))])
    for name, help_text, read in _MODEL:
        family(name, "gauge", help_text, [(_labels(model_labels[k]), v) for k, g in models
                                          if (v := read(g)) is not None])
    family("edgefleet_model_latency_p95_ms", "gauge", "The devices' own p95 latency of their latest window with "
           "inferences, ms: their mean (stat=mean: how a typical device does; not a percentile of all inferences) "
           "and their max (stat=max: the worst device).",
           [(_labels([*model_labels[k], ("stat", st)]), v) for k, g in models
            for st, v in (("mean", g.p95.mean), ("max", g.p95.max)) if v is not None])
    tags = sorted(agg.tags.items())
    family("edgefleet_tag_devices", "gauge", "Devices by tag and state (a device counts in each of its tags).",
           [(_labels([("tag", t), ("state", st)]), n) for t, g in tags
            for st, n in (("online", g.online), ("offline", g.offline))])
    for name, help_text, read in _TAG:
        family(name, "gauge", help_text, [(_labels([("tag", t)]), v) for t, g in tags if (v := read(g)) is not None])


def _per_device(family: Any, health: list[dict[str, Any]]) -> None:
    """One series per device and figure (``--metrics-per-device``)."""
    base = {}
    for h in health:
        m = h["model"] or {}
        base[h["device_id"]] = [("device", h["device_id"]), ("model", m.get("name") or ""),
                                ("version", m.get("version") or "")]
    for name, kind, help_text, read in _DEVICE:
        samples = [(_labels(base[h["device_id"]]), v) for h in health if (v := read(h)) is not None]
        family(name, kind, help_text, samples)
    samples = []
    for h in health:
        if h["latency_ms"]:
            for q, key in QUANTILES:
                if h["latency_ms"].get(key) is not None:
                    samples.append((_labels([*base[h["device_id"]], ("quantile", q)]), h["latency_ms"][key]))
    family(*_LATENCY, samples)
    for name, kind, help_text, key in _ACCELERATOR:
        family(name, kind, help_text, [
            (_labels([*base[h["device_id"]], ("accelerator", a["name"]), ("kind", a["kind"])]), a[key])
            for h in health for a in h.get("accelerators") or [] if a.get(key) is not None])
    family(*_SERVING, [(_labels([*base[h["device_id"]], ("runtime_device", h["serving"]["device"]),
                                 ("provider", h["serving"]["provider"])]), 1) for h in health if h.get("serving")])
    family(*_STORAGE, [(_labels([*base[h["device_id"]], ("state", state)]), int(h["storage"] == state))
                       for h in health if h.get("storage") in STORAGE_STATES for state in STORAGE_STATES])
    family(*_DRIFT, [(_labels([*base[h["device_id"]], ("against", against)]), h["quality"][f"psi_{key}"])
                     for h in health if h.get("quality") for against, key in (("reference", "ref"), ("fleet", "fleet"))
                     if h["quality"][f"psi_{key}"] is not None])
    for name, kind, help_text, read in _QUALITY:
        family(name, kind, help_text, [(_labels(base[h["device_id"]]), v) for h in health
                                       if h.get("quality") and (v := read(h["quality"])) is not None])


def routes(store: Store, per_device: bool = False) -> list[Route]:
    """``/metrics``; ``per_device``: each device's series too (``fleet serve --metrics-per-device``)."""
    async def metrics(request: Request) -> Response:
        now = time.time()
        refused = await run_in_threadpool(quality.refused, store)
        if per_device:
            health = await run_in_threadpool(store.health, None, now)
            return Response(render(health, refused, True), media_type=CONTENT_TYPE)
        agg = await run_in_threadpool(aggregate.from_store, store, now)  # counted by the database
        return Response(render([], refused, False, agg), media_type=CONTENT_TYPE)

    return [Route("/metrics", metrics, methods=["GET"])]
