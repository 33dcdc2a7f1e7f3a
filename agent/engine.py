"""The loaded model that serves inference, swapped atomically when an update activates.

Every inference served is timed here, so telemetry reports the latency applications saw
(the runtime's time plus the agent's own checks), and every failure is counted by kind.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from pathlib import Path

import numpy as np

from agent import runtimes
from agent.bundle import Manifest, TensorSpec
from agent.errors import EdgefleetError
from agent.metrics import InferenceWindow


class InferenceError(EdgefleetError):
    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind  # bad_input | no_model | runtime


class ModelStats:
    """What one loaded model has served: the probation after an update judges it by these."""

    def __init__(self, keep: int = 2000) -> None:
        self.served = 0
        self.errors = 0  # runtime failures (not the application's bad input)
        self.latencies: deque[float] = deque(maxlen=keep)
        self.since = time.monotonic()

    def p95(self) -> float | None:
        lat = list(self.latencies)
        return float(np.percentile(lat, 95)) if lat else None


class Loaded:
    """One model loaded in its runtime, with its manifest."""

    def __init__(self, sha: str, model_dir: Path, manifest: Manifest, deployment_id: str | None = None):
        self.sha = sha
        self.dir = model_dir
        self.manifest = manifest
        self.deployment_id = deployment_id
        self.signed_by = _signer(model_dir)  # the release key that signed it (None: unsigned)
        self.stats = ModelStats()
        self.session = runtimes.load(model_dir, manifest)

    def sample(self) -> dict[str, np.ndarray]:
        with np.load(self.dir / self.manifest.sample) as data:
            return {name: data[name] for name in data.files}

    def smoke_test(self) -> float:
        """Run the bundle's sample input: outputs finite and of the declared shapes, within the
        latency budget. Returns the latency in ms; raises InferenceError otherwise."""
        feeds = self.sample()
        check_feeds(self.manifest.inputs, feeds)
        self.session.run(feeds)  # warm-up
        t0 = time.perf_counter()
        outputs = self.session.run(feeds)
        ms = (time.perf_counter() - t0) * 1000
        for spec in self.manifest.outputs:
            out = outputs.get(spec.name)
            if out is None:
                raise InferenceError("runtime", f"smoke test: output {spec.name!r} missing")
            if not _shape_ok(spec.shape, out.shape):
                raise InferenceError("runtime", f"smoke test: output {spec.name!r} has shape "
                                     f"{list(out.shape)}, manifest says {spec.shape}")
            if np.issubdtype(out.dtype, np.floating) and not np.isfinite(out).all():
                raise InferenceError("runtime", f"smoke test: output {spec.name!r} is not finite (NaN/inf)")
        budget = self.manifest.latency_budget_ms
        if budget is not None and ms > budget:
            raise InferenceError("runtime", f"smoke test: {ms:.1f} ms is over the latency budget of {budget:.1f} ms")
        return ms

    def close(self) -> None:
        self.session.close()


class Engine:
    """Serves inference with whichever model is current; thread-safe."""

    def __init__(self, window: InferenceWindow | None = None) -> None:
        self.window = window or InferenceWindow()
        self._lock = threading.Lock()
        self._current: Loaded | None = None
        self._previous: Loaded | None = None

    @property
    def current(self) -> Loaded | None:
        return self._current

    @property
    def previous(self) -> Loaded | None:
        return self._previous

    def swap(self, loaded: Loaded) -> Loaded | None:
        """Make ``loaded`` serve from the next request on; keeps the old one loaded as previous, for an
        instant rollback."""
        with self._lock:
            old, self._current = self._current, loaded
            if self._previous is not None and self._previous not in (old, loaded):
                self._previous.close()
            self._previous = old
        return old

    def rollback(self) -> Loaded:
        """Serve the previous model again (it is still loaded); the current one is closed."""
        with self._lock:
            if self._previous is None:
                raise InferenceError("no_model", "there is no previous model to roll back to")
            bad, self._current, self._previous = self._current, self._previous, None
        if bad is not None:
            bad.close()
        return self._current

    def infer(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        model = self._current
        try:
            if model is None:
                raise InferenceError("no_model", "no model is active on this device yet")
            check_feeds(model.manifest.inputs, feeds)
            t0 = time.perf_counter()
            try:
                outputs = model.session.run(feeds)
            except Exception as e:  # the runtime's own error types vary by plugin
                model.stats.errors += 1
                raise InferenceError("runtime", f"{type(e).__name__}: {e}") from None
            ms = (time.perf_counter() - t0) * 1000
            model.stats.served += 1
            model.stats.latencies.append(ms)
            self.window.record(ms)
            return outputs
        except InferenceError as e:
            self.window.error(e.kind)
            raise


def check_feeds(specs: list[TensorSpec], feeds: dict[str, np.ndarray]) -> None:
    check_declared(specs, {name: (a.dtype, a.shape) for name, a in feeds.items()})


def check_declared(specs: list[TensorSpec], declared: dict[str, tuple[np.dtype, tuple[int, ...]]]) -> None:
    """``check_feeds`` on what the arrays declare (dtype, shape), before they are decoded (agent/feeds.py)."""
    names = {s.name for s in specs}
    if set(declared) != names:
        raise InferenceError("bad_input", f"inputs {sorted(declared)} do not match the model's {sorted(names)}")
    for spec in specs:
        dtype, shape = declared[spec.name]
        if dtype != np.dtype(spec.dtype):
            raise InferenceError("bad_input", f"input {spec.name!r} is {dtype}, the model takes {spec.dtype}")
        if not _shape_ok(spec.shape, shape):
            raise InferenceError("bad_input", f"input {spec.name!r} has shape {list(shape)}, "
                                 f"the model takes {spec.shape} (-1: any)")


def _shape_ok(spec: list[int], shape: tuple[int, ...]) -> bool:
    return len(spec) == len(shape) and all(s in (-1, d) for s, d in zip(spec, shape))


def _signer(model_dir: Path) -> str | None:
    """The key id in a model's manifest.sig (verified when the bundle was), None if it has none."""
    from agent.bundle import SIG
    from agent.signing import SigningError, decode_manifest_sig

    try:
        return decode_manifest_sig((Path(model_dir) / SIG).read_bytes()).keyid
    except (OSError, SigningError):
        return None
