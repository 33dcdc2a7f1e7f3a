"""``/metrics``: the fleet in Prometheus' text exposition format (version 0.0.4), for users who already
scrape with Prometheus and chart with Grafana.

Per device (labels ``device``, ``model``, ``version``; empty model/version before a model is active):
online, inferences and errors (counters since the device registered), the latest window's latency
percentiles (gauges with a ``quantile`` label), CPU, RSS, memory, temperature (only when the device has a
sensor), last seen, seq gaps and whether two devices use its identity; its free disk and storage state (a
state set: one sample per state, 1 for the current one), its clock's offset from the controller's, whether
that is beyond ``--max-clock-offset`` and whether its OS says the clock is synchronised. Fleet-wide: devices by
state, how many identities are in conflict, how many devices' storage takes no writes and how many clocks are
beyond the bound. Model quality over health's last 10 minutes (fleet/quality.py), per device: drift PSI against the
bundle's reference and against the fleet (label ``against``), canary agreement, feedback accuracy and labels; and
the quality messages refused, by reason. Accelerators (issue 14): each one's utilisation and memory used / total
(labels ``accelerator``, ``kind``; only the figures the device's machine gives), and what really runs the active
model (``edgefleet_device_serving_info``, labels ``runtime_device``, ``provider``). Built from ``Store.health()``;
a scrape never scans telemetry (it reads the last 10 minutes of quality windows once).
"""

from __future__ import annotations

import time
from typing import Any

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from fleet import quality
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


def render(health: list[dict[str, Any]], refused: dict[str, int] | None = None) -> str:
    """The exposition text for the devices' health (``Store.health()``) and the quality messages refused by reason
    (``fleet.quality.refused``)."""
    lines: list[str] = []

    def family(name: str, kind: str, help_text: str, samples: list[tuple[str, float]]) -> None:
        lines.append(f"# HELP {name} {_escape_help(help_text)}")
        lines.append(f"# TYPE {name} {kind}")
        lines.extend(f"{name}{labels} {_number(v)}" for labels, v in samples)

    online = sum(1 for h in health if h["online"])
    family("edgefleet_devices", "gauge", "Devices known to the controller, by state.",
           [(_labels([("state", "online")]), online), (_labels([("state", "offline")]), len(health) - online)])
    family("edgefleet_identity_conflicts", "gauge", "Device identities used by two devices at once (a cloned image).",
           [("", sum(1 for h in health if h.get("identity_conflict")))])
    family("edgefleet_storage_degraded", "gauge", "Devices whose state dir takes no writes (full or read-only).",
           [("", sum(1 for h in health if h.get("storage") in ("full", "read_only")))])
    family("edgefleet_clock_offset_exceeded", "gauge", "Devices whose clock is further off than --max-clock-offset.",
           [("", sum(1 for h in health if (h.get("clock") or {}).get("exceeds_max")))])
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
    family(*_REFUSED, [(_labels([("reason", reason)]), n) for reason, n in sorted((refused or {}).items())])
    return "\n".join(lines) + "\n"


def routes(store: Store) -> list[Route]:
    async def metrics(request: Request) -> Response:
        health = await run_in_threadpool(store.health, None, time.time())
        refused = await run_in_threadpool(quality.refused, store)
        return Response(render(health, refused), media_type=CONTENT_TYPE)

    return [Route("/metrics", metrics, methods=["GET"])]
