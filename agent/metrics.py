"""What the agent measures: the latency and errors of the inferences it served, and its resources.

Collectors return plain values or protocol structs; they never know how they are sent.
"""

from __future__ import annotations

import bisect
import os
import threading
from collections import Counter

import numpy as np

from agent.protocol import LATENCY_BUCKETS_MS, Latency


class InferenceWindow:
    """Latencies and errors since the last snapshot (one telemetry window). Thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._latencies: list[float] = []
        self._errors: Counter[str] = Counter()
        self.total = 0  # inferences served since start

    def record(self, ms: float) -> None:
        with self._lock:
            self._latencies.append(ms)
            self.total += 1

    def error(self, kind: str) -> None:
        with self._lock:
            self._errors[kind] += 1

    def snapshot(self) -> tuple[int, dict[str, int], Latency | None, list[int]]:
        """(count, errors by kind, latency summary, histogram) of the window, and start a new one."""
        with self._lock:
            lat, self._latencies = self._latencies, []
            errors, self._errors = dict(self._errors), Counter()
        if not lat:
            return 0, errors, None, []
        a = np.asarray(lat)
        p50, p95, p99 = np.percentile(a, [50, 95, 99])
        hist = [0] * (len(LATENCY_BUCKETS_MS) + 1)
        for v in lat:
            hist[bisect.bisect_left(LATENCY_BUCKETS_MS, v)] += 1
        summary = Latency(p50=round(float(p50), 3), p95=round(float(p95), 3), p99=round(float(p99), 3),
                          max=round(float(a.max()), 3), mean=round(float(a.mean()), 3))
        return len(lat), errors, summary, hist


class Resources:
    """psutil figures of this process and its machine, sampled on the telemetry cadence.

    One Process object is kept: its first cpu_percent() is 0.0 and later calls measure the time
    since the previous one.
    """

    def __init__(self, disk_path: str) -> None:
        import psutil

        self._psutil = psutil
        self._proc = psutil.Process()
        self._proc.cpu_percent()
        self._disk_path = disk_path

    def sample(self) -> dict:
        ps = self._psutil
        with self._proc.oneshot():
            cpu = self._proc.cpu_percent()
            rss = self._proc.memory_info().rss
            mem = self._proc.memory_percent()
        return {
            "cpu_percent": round(cpu, 2),
            "rss_bytes": int(rss),
            "memory_percent": round(mem, 3),
            "disk_free_bytes": int(ps.disk_usage(self._disk_path).free),
            "temperature_c": self._temperature(),
            "load1": round(os.getloadavg()[0], 3),
        }

    def _temperature(self) -> float | None:
        """The hottest sensor, or None where the machine has none (never a made-up 0 °C)."""
        try:
            sensors = self._psutil.sensors_temperatures()
        except (AttributeError, OSError):
            return None
        # a reading outside the contract's range (protocol.Telemetry.temperature_c) is a broken sensor
        temps = [t.current for entries in sensors.values() for t in entries
                 if t.current and -273.15 <= t.current <= 1000]
        return round(max(temps), 1) if temps else None
