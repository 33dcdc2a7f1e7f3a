"""What the agent measures: the latency and errors of the inferences it served, and its resources.

Collectors return plain values or protocol structs; they never know how they are sent.
"""

from __future__ import annotations

import bisect
import logging
import os
import threading
import time
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


# ---- model quality (issue 12): one bundle's served outputs in its profile's bins, its canary, its labels ---------

FOLD_ROWS = 64  # served rows kept (copied) before they are folded in one vectorised pass
FOLD_BYTES = 1 << 20  # ... or this many bytes of them, whichever comes first
MAX_ERR = float(np.finfo(np.float64).max)  # a canary error that is not finite is reported as this (JSON has no inf)


class ModelQuality:
    """One bundle's model-quality window (agent/quality.py bins, the ``Quality`` message): the served outputs folded
    into its profile's bins, its canary runs, the feedback labels joined to its predictions. Thread-safe.

    Folding is batched: ``fold`` copies the outputs the profile knows and returns the predicted class bins (for
    feedback); every ``FOLD_ROWS`` rows (or ``FOLD_BYTES``) they are folded at once by ``quality.Folder``, and
    ``take`` folds what is left, so a window's counts are exact. The counts equal those of ``Folder.add`` on each
    request (batching only joins rows), with one caveat of ``Folder`` itself: whether classifier rows are already
    probabilities is judged per batch (a model either always or never outputs them, so it does not change).
    ``served`` counts rows (a request of N samples is N): with single-sample requests it is telemetry's
    ``inferences``, and the class bins of each classifier output sum to it."""

    def __init__(self, sha: str, version: str, deployment_id: str | None, profile) -> None:
        from agent.quality import Folder, class_index

        self.sha, self.version, self.deployment_id = sha, version, deployment_id
        self.profile = profile
        self.profile_id = profile.id
        self.closed = False  # the bundle is no longer loaded (feedback for its predictions: other_model)
        self._lock = threading.Lock()
        self._folder = Folder(profile)
        self._outputs = {o.name: o for o in profile.outputs}
        self._pending: list[dict[str, np.ndarray]] = []
        self._pending_rows = self._pending_bytes = 0
        self._fold_failed = False
        self.classifier = next((o for o in profile.outputs if o.kind == "classifier"), None)
        self.index = class_index(self.classifier) if self.classifier is not None else None
        self.served = 0
        self.canary = None  # this window's canary runs (protocol.Canary), summed
        self.last_canary = None  # the latest run's (protocol.Canary), kept across windows
        self.canary_at: float | None = None  # time.monotonic() of the latest run
        self.labels = 0
        self.confusion: Counter[tuple[int, int]] = Counter()
        self.refused: Counter[str] = Counter()

    def _rows(self, value: np.ndarray) -> int:
        return int(value.shape[0]) if value.ndim >= 1 else 1

    def fold(self, outputs: dict[str, np.ndarray]) -> tuple[int, ...] | None:
        """Count one request's outputs; returns the predicted bins of the first classifier output, one per row
        (None: the profile has no classifier output, or this one does not fit it)."""
        keep = {name: np.array(outputs[name]) for name in self._outputs if name in outputs}  # a copy: ours now
        if not keep:
            return None
        first = keep.get(self.classifier.name) if self.classifier is not None else None
        rows = self._rows(first if first is not None else next(iter(keep.values())))
        bins = None
        if first is not None and first.ndim >= 1 and first.size == rows * self.classifier.n_classes:
            bins = ((int(self.index[int(first.argmax())]),) if rows == 1 else
                    tuple(int(b) for b in self.index[first.reshape(rows, -1).argmax(1)]))
        size = sum(v.nbytes for v in keep.values())
        with self._lock:
            self.served += rows
            self._pending.append(keep)
            self._pending_rows += rows
            self._pending_bytes += size
            if self._pending_rows >= FOLD_ROWS or self._pending_bytes >= FOLD_BYTES:
                self._flush()
        return bins

    def _flush(self) -> None:
        """Fold what is pending (the lock held)."""
        batch, self._pending, self._pending_rows, self._pending_bytes = self._pending, [], 0, 0
        if not batch:
            return
        try:
            for name, o in self._outputs.items():
                values = [b[name] for b in batch if name in b]
                if not values:
                    continue
                if o.kind != "classifier":  # the Folder ravels dense outputs: their values join as they are
                    self._folder.add({name: np.concatenate([v.ravel() for v in values])})
                elif all(v.ndim >= 2 and v.shape[1:] == values[0].shape[1:] for v in values):
                    self._folder.add({name: np.concatenate(values)})
                else:
                    for v in values:
                        self._folder.add({name: v})
        except Exception as e:  # outputs that do not fit the profile: never a failed inference
            if not self._fold_failed:
                logging.getLogger("edgefleet.agent").error(
                    "model %s: its outputs do not fold into its profile.json's bins (%s: %s); not counted",
                    self.sha[:12], type(e).__name__, e)
                self._fold_failed = True

    def note_canary(self, runs: int, agree: int, max_abs_err: float, when: float) -> None:
        from agent.protocol import Canary

        err = min(float(max_abs_err), MAX_ERR)
        with self._lock:
            self.last_canary = Canary(runs=runs, agree=agree, max_abs_err=err, time=when)
            c = self.canary
            self.canary = (Canary(runs=runs, agree=agree, max_abs_err=err, time=when) if c is None else
                           Canary(runs=c.runs + runs, agree=c.agree + agree, max_abs_err=max(c.max_abs_err, err),
                                  time=when))
            self.canary_at = time.monotonic()

    def joined(self, true_bin: int, predicted_bin: int) -> None:
        with self._lock:
            self.labels += 1
            self.confusion[(true_bin, predicted_bin)] += 1

    def refuse(self, reason: str) -> None:
        with self._lock:
            self.refused[reason] += 1

    def take(self, device_id: str, boot_id: str, interval_s: float):
        """This window's ``protocol.Quality`` (seq filled in when queued), or None when there is nothing to say
        (nothing served, no canary run, no feedback); then start a new window."""
        from agent import protocol

        with self._lock:
            self._flush()
            if not (self.served or self.canary is not None or self.labels or self.refused):
                return None
            counts = self._folder.take()
            feedback = None
            if self.labels or self.refused:
                feedback = protocol.Feedback(
                    labels=self.labels, confusion=[[t, p, n] for (t, p), n in sorted(self.confusion.items())],
                    refused=dict(self.refused))
            msg = protocol.Quality(
                device_id=device_id, boot_id=boot_id, seq=0, time=protocol.now(), interval_s=interval_s,
                sha256=self.sha, version=self.version, deployment_id=self.deployment_id, profile=self.profile_id,
                served=self.served, bins=[counts[o.name] for o in self.profile.outputs], canary=self.canary,
                feedback=feedback)
            self.served, self.canary, self.labels = 0, None, 0
            self.confusion, self.refused = Counter(), Counter()
        return msg

    def status(self) -> dict:
        """For GET /v1/status: the window so far and the latest canary."""
        with self._lock:
            c = self.last_canary
            return {"profile": self.profile_id, "served": self.served,
                    "canary": None if c is None else {"runs": c.runs, "agree": c.agree,
                                                      "max_abs_err": c.max_abs_err, "time": c.time},
                    "feedback": {"labels": self.labels, "refused": dict(self.refused)}}
