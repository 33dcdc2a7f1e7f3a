"""The loaded model that serves inference, swapped atomically when an update activates.

Every inference served is timed here, so telemetry reports the latency applications saw
(the runtime's time plus the agent's own checks), and every failure is counted by kind.

Model quality (issue 12): a bundle that carries ``profile.json`` (and ``golden.npz``) gets a
``metrics.ModelQuality`` window; every served output is folded into it (after the latency is taken) and gets a
request id (``feedback.FeedbackBook``). The canary (the golden inputs against their fp32 outputs) runs at every
activation (``swap``, right after the updater's smoke test, and at a restart) and when the agent asks
(``canary``, every ``canary_interval_s``); it calls the runtime directly, so it is not a served inference, not in
the latency, not in the bins. At a swap the old bundle's partial window is kept and sent under its own sha256
(``take_quality``), so every served output is counted once, for the bundle that computed it.

Accelerators (issue 14): a model loads on the first of its bundle's ``accelerators`` that loads here
(agent/runtimes); its ``placement`` says what really runs it. When it runs on an accelerator and the smoke test
fails there, or a run fails there later (the device disappeared, its driver died), it is loaded again on the CPU
(``Loaded.to_cpu``), the reason is kept in its placement, the request that met the failure is run again on the CPU,
and the engine's ``on_fallback`` (the daemon: an ``error`` event and a fresh state message) is told.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path

import msgspec
import numpy as np

from agent import protocol, quality, runtimes, serving
from agent.bundle import Manifest, TensorSpec
from agent.errors import EdgefleetError
from agent.feedback import FeedbackBook
from agent.metrics import InferenceWindow, ModelQuality

log = logging.getLogger("edgefleet.agent")

PROFILE, GOLDEN = "profile.json", "golden.npz"  # the converter's names (converter/convert.py)


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
        try:
            self.runner = serving.Runner(self.session, manifest)
        except BaseException:
            self.session.close()
            raise
        self._reload = threading.Lock()
        self.quality = self._quality()  # None: the bundle has no (usable) profile.json

    @property
    def placement(self) -> runtimes.Placement:
        return self.session.placement

    @property
    def accelerated(self) -> bool:
        """Runs on something other than the CPU (what a failure there falls back from)."""
        return not self.placement.on_cpu

    def to_cpu(self, reason: str, session: runtimes.Session | None = None) -> bool:
        """Load this model again on the CPU because ``reason`` (its accelerator failed); ``session`` is the one that
        failed (another thread may have moved already: then nothing is done). True when this call moved it."""
        with self._reload:
            failed = session or self.session
            if failed is not self.session or not self.accelerated:
                return False
            was = failed.placement
            cpu = runtimes.load(self.dir, self.manifest, [runtimes.CPU])
            why = f"{was.device} ({was.provider}) {reason}"
            cpu.placement = runtimes.Placement(cpu.placement.device, cpu.placement.provider,
                                               "; ".join(x for x in (why, was.fallback) if x))
            old_runner, self.session, self.runner = self.runner, cpu, serving.Runner(cpu, self.manifest)
        log.error("model %s falls back to the CPU: %s", self.sha[:12], why)
        # the old runner's callers in flight fail and are run again on the CPU (Engine._fell_back); its close waits
        # for them, so not on this caller's thread
        threading.Thread(target=_close_quietly, args=(old_runner, failed, self.sha), daemon=True).start()
        return True

    def _quality(self) -> ModelQuality | None:
        """The bundle's reference profile (verified with the bundle), or None: no profile.json (a bundle from
        .tflite input, or made before profiles existed), or one this agent cannot use (logged once)."""
        path = self.dir / PROFILE
        if not path.is_file():
            return None
        try:
            profile = msgspec.json.decode(path.read_bytes(), type=quality.Profile)
            if not 1 <= len(profile.outputs) <= protocol.MAX_QUALITY_OUTPUTS:
                raise ValueError(f"{len(profile.outputs)} outputs (1 to {protocol.MAX_QUALITY_OUTPUTS} are sent)")
            return ModelQuality(self.sha, self.manifest.version, self.deployment_id, profile)
        except (OSError, ValueError, msgspec.MsgspecError) as e:
            log.error("model %s: its %s is not usable (%s); it serves without quality monitoring",
                      self.sha[:12], PROFILE, str(e).splitlines()[0][:300])
            return None

    def canary(self) -> protocol.Canary | None:
        """Run the bundle's golden inputs and compare with their fp32 outputs (``quality.canary_compare``); the
        result is noted in this bundle's quality window and returned. None: no profile or no golden inputs (or a
        golden.npz this agent cannot read: logged). A golden input the runtime fails on is a run that disagrees."""
        q, path = self.quality, self.dir / GOLDEN
        if q is None or not path.is_file():
            return None
        runs = agree = 0
        worst = 0.0
        try:
            with np.load(path, allow_pickle=False) as g:
                have = set(g.files)
                while all(f"{s.name}/{runs}" in have for s in self.manifest.inputs):
                    i = runs
                    feeds = {s.name: g[f"{s.name}/{i}"] for s in self.manifest.inputs}
                    runs += 1
                    try:
                        check_feeds(self.manifest.inputs, feeds)
                        outputs = self.session.run(feeds)
                    except Exception as e:  # the runtime's own error types vary by plugin
                        log.error("model %s: canary input %d fails (%s: %s)", self.sha[:12], i, type(e).__name__, e)
                        continue
                    ok = True
                    for o in q.profile.outputs:
                        key = f"output/{o.name}/{i}"
                        if key in have:
                            same, err = (quality.canary_compare(o, outputs[o.name], g[key]) if o.name in outputs
                                         else (False, float("inf")))
                            ok, worst = ok and same, max(worst, err)
                    agree += ok
        except (OSError, ValueError, KeyError) as e:
            log.error("model %s: its %s is not usable (%s); no canary", self.sha[:12], GOLDEN, e)
            return None
        if not runs:
            return None
        q.note_canary(runs, agree, worst, protocol.now())
        return q.last_canary

    def sample(self) -> dict[str, np.ndarray]:
        with np.load(self.dir / self.manifest.sample) as data:
            return {name: data[name] for name in data.files}

    def smoke_test(self) -> float:
        """Run the bundle's sample input: outputs finite and of the declared shapes, within the
        latency budget. Returns the latency in ms; raises InferenceError otherwise. On an accelerator, a failed
        smoke test loads the model on the CPU and tests it there (the failure is the placement's fallback)."""
        try:
            return self._smoke_test()
        except Exception as e:
            if not self.accelerated:
                raise
            self.to_cpu(f"failed the smoke test: {str(e).splitlines()[0][:300] if str(e) else type(e).__name__}")
        return self._smoke_test()

    def _smoke_test(self) -> float:
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
        if self.quality is not None:
            self.quality.closed = True
        self.runner.close()
        self.session.close()


class Engine:
    """Serves inference with whichever model is current; thread-safe."""

    def __init__(self, window: InferenceWindow | None = None, feedback: FeedbackBook | None = None,
                 quality: bool = True) -> None:
        self.window = window or InferenceWindow()
        self.feedback = feedback or FeedbackBook()
        self.quality = quality  # False: no folding, no canary, no feedback (config ``quality``)
        self._lock = threading.Lock()
        self._current: Loaded | None = None
        self._previous: Loaded | None = None
        self._retired: list[ModelQuality] = []  # windows of unloaded bundles, until take_quality sends them
        self.on_fallback: Callable[[Loaded, str], None] | None = None  # a model left its accelerator for the CPU

    @property
    def current(self) -> Loaded | None:
        return self._current

    @property
    def previous(self) -> Loaded | None:
        return self._previous

    def swap(self, loaded: Loaded) -> Loaded | None:
        """Make ``loaded`` serve from the next request on; keeps the old one loaded as previous, for an
        instant rollback. First its canary runs (quality on; the result is reported, it does not block)."""
        self.canary(loaded)
        with self._lock:
            old, self._current = self._current, loaded
            if self._previous is not None and self._previous not in (old, loaded):
                self._retire(self._previous)
            self._previous = old
        return old

    def canary(self, loaded: Loaded | None = None) -> protocol.Canary | None:
        """Run the canary of ``loaded`` (default: the current model), unless quality is off."""
        loaded = loaded or self._current
        if not self.quality or loaded is None:
            return None
        try:
            return loaded.canary()
        except Exception:  # never a failed activation
            log.exception("the canary of %s failed", loaded.sha[:12])
            return None

    def _retire(self, loaded: Loaded) -> None:
        """Unload (the lock held); its quality window waits for the next take_quality."""
        loaded.close()
        if loaded.quality is not None:
            self._retired.append(loaded.quality)

    def take_quality(self, device_id: str, boot_id: str, interval_s: float) -> list[protocol.Quality]:
        """One window's quality messages: of bundles unloaded since the last call, of the previous bundle (late
        labels for its predictions) and of the current one; only those with something to say."""
        with self._lock:
            windows, self._retired = self._retired, []
            windows += [m.quality for m in (self._previous, self._current) if m is not None and m.quality]
        msgs = []
        for w in dict.fromkeys(windows):  # each once, in order
            msg = w.take(device_id, boot_id, interval_s)
            if msg is not None:
                msgs.append(msg)
        self.feedback.new_window()
        return msgs

    def rollback(self) -> Loaded:
        """Serve the previous model again (it is still loaded); the current one is closed."""
        with self._lock:
            if self._previous is None:
                raise InferenceError("no_model", "there is no previous model to roll back to")
            bad, self._current, self._previous = self._current, self._previous, None
            if bad is not None:
                self._retire(bad)
        return self._current

    def infer(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return self.serve(feeds)[0]

    def serve(self, feeds: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], str]:
        """``infer``, and the request id that feedback for this prediction names (agent/feedback.py)."""
        model = self._current
        try:
            if model is None:
                raise InferenceError("no_model", "no model is active on this device yet")
            check_feeds(model.manifest.inputs, feeds)
            t0 = time.perf_counter()
            runner = model.runner
            try:
                outputs = runner.run(feeds)
            except Exception as e:  # the runtime's own error types vary by plugin
                if not self._fell_back(model, runner.session, e):
                    model.stats.errors += 1
                    raise InferenceError("runtime", f"{type(e).__name__}: {e}") from None
                t0 = time.perf_counter()  # the same request, on the CPU now
                outputs = self._run_again(model, feeds)
            ms = (time.perf_counter() - t0) * 1000
            model.stats.served += 1
            model.stats.latencies.append(ms)
            self.window.record(ms)
        except InferenceError as e:
            self.window.error(e.kind)
            raise
        q = model.quality if self.quality else None
        bins = None
        if q is not None:
            try:
                bins = q.fold(outputs)
            except Exception:  # the outputs were served: counting them must never fail the request
                log.exception("folding the outputs of %s failed", model.sha[:12])
        return outputs, self.feedback.issue(q, bins)


    def _fell_back(self, model: Loaded, session: runtimes.Session, error: Exception) -> bool:
        """A run failed on an accelerator: move the model to the CPU (once) and tell ``on_fallback``."""
        if session.placement.on_cpu:
            return False
        reason = f"failed at run time: {runtimes.first_line(error)}"
        try:
            moved = model.to_cpu(reason, session)
        except Exception:
            log.exception("model %s cannot be loaded on the CPU either", model.sha[:12])
            return False
        if moved and self.on_fallback is not None:
            try:
                self.on_fallback(model, model.placement.fallback)
            except Exception:
                log.exception("reporting the fallback of %s failed", model.sha[:12])
        return True

    def _run_again(self, model: Loaded, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        try:
            return model.runner.run(feeds)
        except Exception as e:
            model.stats.errors += 1
            raise InferenceError("runtime", f"{type(e).__name__}: {e}") from None


def _close_quietly(runner, session, sha: str) -> None:
    try:
        runner.close()
        session.close()
    except Exception:  # a dead device's session may fail to close too
        log.exception("closing the failed session of %s", sha[:12])


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
