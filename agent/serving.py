"""How one loaded model serves concurrent callers: how many runs at once, and dynamic batching (issue 14).

Callers are threads (the HTTP API's workers, one thread per binary-protocol connection). The model's manifest
``settings`` say how they share it:

- ``concurrency`` (1..64, default 1): runs of this model at once. The runtime plugin is told the same number
  (it sizes its pool of infer requests / interpreters by it), so more than that would only queue inside it.
- ``max_batch`` (1..1024, default 1: no batching): rows one run may take. Requests waiting at the same time are
  concatenated along axis 0, run once, and the outputs split back by rows. Only for a model whose every input
  and output has a dynamic axis 0 (-1 in the manifest); any other model runs each request as it comes.
- ``max_wait_us`` (0..100000, default 500): how long a batch waits for more rows after its first request
  arrived. A queue that built up while the previous batch ran goes at once: its first request is already old.

Batching is leader-follower, with no thread of its own: the caller that finds a free run slot takes the oldest
waiting requests (its own among them, or an older one's) and runs them itself; the others sleep until their
slice is ready. A dedicated batcher thread would cost every request two more thread hand-offs (caller ->
batcher -> caller); here the leader's own request has none, and there is no thread to stop on close. Up to
``concurrency`` leaders run batches at once. Requests whose inputs differ beyond axis 0 (or in dtype) are never
batched together. A runtime error fails every request of its batch with that error.

``throughput`` measures what a run function serves from N client threads (the converter and bench/agent.py).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from agent.bundle import Manifest
from agent.errors import EdgefleetError

log = logging.getLogger("edgefleet.agent")

# setting -> (lowest, highest, default)
LIMITS = {"concurrency": (1, 64, 1), "max_batch": (1, 1024, 1), "max_wait_us": (0, 100_000, 500)}
QUEUE_BATCHES = 4  # rows waiting to be batched: at most this many full batches per run slot (then callers wait)
CLOSE_WAIT_S = 10.0  # close() waits this long for runs in progress before the session is closed under them


class ServingError(EdgefleetError):
    """A bad serving setting, or a request to a runner that is closed."""


@dataclass(frozen=True)
class ServingSettings:
    concurrency: int = 1
    max_batch: int = 1
    max_wait_us: int = 500


def serving_settings(settings: dict) -> ServingSettings:
    """The serving settings among a manifest's (runtime) settings; a bad one is one line naming it."""
    values = {}
    for name, (low, high, default) in LIMITS.items():
        value = settings.get(name, default)
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            raise ServingError(f"setting {name}: {value!r} is not an integer from {low} to {high}")
        values[name] = value
    return ServingSettings(**values)


def batchable(manifest: Manifest) -> bool:
    """Every input's (and declared output's) axis 0 is dynamic: requests can be stacked along it."""
    return bool(manifest.inputs) and all(s.shape[:1] == [-1] for s in [*manifest.inputs, *manifest.outputs])


class _Request:
    __slots__ = ("feeds", "rows", "key", "arrived", "outputs", "error", "done")

    def __init__(self, feeds: dict[str, np.ndarray], rows: int, key: tuple):
        self.feeds, self.rows, self.key = feeds, rows, key
        self.arrived = time.monotonic()
        self.outputs: dict[str, np.ndarray] | None = None
        self.error: BaseException | None = None
        self.done = False


class Runner:
    """Runs a session for concurrent callers: at most ``concurrency`` runs at once, requests batched when the
    settings and the model allow it. ``run`` is the session's ``run``; ``close`` fails whoever still waits."""

    def __init__(self, session, manifest: Manifest):
        self.settings = serving_settings(manifest.settings)
        self.session = session
        self._inputs = [s.name for s in manifest.inputs]
        self.batching = self.settings.max_batch > 1 and batchable(manifest)
        self._wait_s = self.settings.max_wait_us / 1e6
        self._queue_rows = QUEUE_BATCHES * self.settings.max_batch * self.settings.concurrency
        self._cond = threading.Condition()
        self._active = 0  # run slots taken (a leader collecting its batch holds one)
        self._pending: deque[_Request] = deque()
        self._pending_rows = 0
        self._closed = False
        self.batches = 0  # runs of more than one request (for the tests and the bench)
        self.full_waits = 0  # requests that found the queue full and waited for room

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        rows, key = self._shape(feeds)
        if not self.batching or key is None:
            return self._run_alone(feeds)
        return self._run_batched(_Request(feeds, rows, key))

    def close(self, timeout: float = CLOSE_WAIT_S) -> None:
        """Refuse new requests, fail those waiting, and wait (up to ``timeout``) for runs in progress to end, so
        that the session can be closed after. Nothing is left running: the runner has no thread of its own."""
        with self._cond:
            self._closed = True
            while self._pending:
                self._finish(self._pending.popleft(), error=ServingError("the model was unloaded"))
            self._pending_rows = 0
            self._cond.notify_all()
            deadline = time.monotonic() + timeout
            while self._active and (left := deadline - time.monotonic()) > 0:
                self._cond.wait(left)

    # ---- one request, one run ----

    def _acquire(self) -> None:
        """Take a run slot (the caller holds the lock)."""
        while self._active >= self.settings.concurrency and not self._closed:
            self._cond.wait()
        if self._closed:
            raise ServingError("the model was unloaded")
        self._active += 1

    def _release(self) -> None:
        with self._cond:
            self._active -= 1
            self._cond.notify_all()

    def _run_alone(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        with self._cond:
            self._acquire()
        try:
            return self.session.run(feeds)
        finally:
            self._release()

    # ---- batching ----

    def _shape(self, feeds: dict[str, np.ndarray]) -> tuple[int, tuple | None]:
        """(rows, what must match for two requests to share a batch); key None: this request runs alone (feeds
        that are not exactly the model's inputs, a scalar, inputs of different row counts, no rows)."""
        if list(feeds) != self._inputs and sorted(feeds) != sorted(self._inputs):
            return 0, None
        arrays = [np.asarray(feeds[name]) for name in self._inputs]
        if any(a.ndim == 0 for a in arrays):
            return 0, None
        rows = arrays[0].shape[0]
        if rows == 0 or any(a.shape[0] != rows for a in arrays):
            return 0, None
        return rows, tuple((a.dtype.str, a.shape[1:]) for a in arrays)

    def _run_batched(self, req: _Request) -> dict[str, np.ndarray]:
        with self._cond:
            # a full queue: wait for room (a request larger than the whole queue goes in when it is empty)
            if self._pending and self._pending_rows + req.rows > self._queue_rows:
                self.full_waits += 1
            while self._pending and self._pending_rows + req.rows > self._queue_rows and not self._closed:
                self._cond.wait()
            if self._closed:
                raise ServingError("the model was unloaded")
            self._pending.append(req)
            self._pending_rows += req.rows
            self._cond.notify_all()  # a leader collecting a batch may take it
            while not req.done:
                if self._pending and self._active < self.settings.concurrency:
                    self._active += 1
                    batch = self._collect()
                    self._cond.release()
                    try:
                        results = self._run_batch(batch)
                    except BaseException as e:  # e.g. no memory to concatenate: no follower may sleep forever
                        results = [(None, e)] * len(batch)
                    finally:
                        self._cond.acquire()
                        self._active -= 1
                    for r, (outputs, error) in zip(batch, results):
                        self._finish(r, outputs, error)
                    self._cond.notify_all()
                else:
                    self._cond.wait()
        if req.error is not None:
            raise req.error
        return req.outputs

    def _collect(self) -> list[_Request]:
        """As leader (the lock held, a run slot taken): wait until the oldest request's kind has max_batch rows
        waiting or its max_wait_us is over, then take them off the queue, oldest first. Another leader may take
        that request meanwhile (concurrency > 1): then the next oldest is waited for. [] if none is left."""
        while self._pending and not self._closed:
            first = self._pending[0]
            deadline = first.arrived + self._wait_s
            while first in self._pending and not self._closed:
                rows = sum(r.rows for r in self._pending if r.key == first.key)
                left = deadline - time.monotonic()
                if rows >= self.settings.max_batch or left <= 0:
                    return self._take(first.key)
                self._cond.wait(left)
        return []

    def _take(self, key: tuple) -> list[_Request]:
        """The oldest requests of ``key``, up to max_batch rows (at least one), off the queue."""
        batch, rows = [], 0
        for r in self._pending:
            if r.key != key:
                continue
            if batch and rows + r.rows > self.settings.max_batch:
                break
            batch.append(r)
            rows += r.rows
        for r in batch:
            self._pending.remove(r)
        self._pending_rows -= rows
        self._cond.notify_all()  # room in the queue
        return batch

    def _run_batch(self, batch: list[_Request]) -> list[tuple[dict | None, BaseException | None]]:
        """Run the batch (the lock not held): each request's rows of the outputs, or the error."""
        if len(batch) == 1 or not self.batching:
            return [self._call(r.feeds) for r in batch]
        feeds = {name: np.concatenate([r.feeds[name] for r in batch]) for name in self._inputs}
        outputs, error = self._call(feeds)
        total = sum(r.rows for r in batch)
        if error is not None:
            return [(None, error)] * len(batch)
        if all(np.ndim(v) and np.shape(v)[0] == total for v in outputs.values()):
            self.batches += 1
            results, start = [], 0
            for r in batch:
                results.append(({k: v[start : start + r.rows] for k, v in outputs.items()}, None))
                start += r.rows
            return results
        # an output that does not follow the batch along axis 0: this model is served one request at a time
        log.warning("model outputs %s do not follow the batch along axis 0: batching is off for it",
                    {k: list(np.shape(v)) for k, v in outputs.items()})
        self.batching = False
        return [self._call(r.feeds) for r in batch]

    def _call(self, feeds: dict[str, np.ndarray]) -> tuple[dict | None, BaseException | None]:
        try:
            return self.session.run(feeds), None
        except Exception as e:  # the runtime's own error types vary by plugin: each caller gets it
            return None, e

    @staticmethod
    def _finish(req: _Request, outputs: dict | None = None, error: BaseException | None = None) -> None:
        req.outputs, req.error, req.done = outputs, error, True


def throughput(run: Callable[[dict[str, np.ndarray]], object], feeds: dict[str, np.ndarray], clients: int,
               seconds: float = 1.0, warmup: int = 2) -> float:
    """Inferences (rows of ``feeds``) per second that ``run`` serves to ``clients`` threads, each calling it
    with ``feeds`` in a loop for ``seconds`` after ``warmup`` calls of its own. ``run`` is anything with a
    session's signature: ``session.run``, ``Runner.run``, ``Engine.infer``. A call that raises stops the
    measure with that error."""
    first = np.asarray(next(iter(feeds.values())))
    rows = first.shape[0] if first.ndim else 1
    counts = [0] * clients
    errors: list[BaseException] = []
    start = threading.Barrier(clients + 1)
    stop = threading.Event()

    def client(i: int) -> None:
        try:
            for _ in range(warmup):
                run(feeds)
        except Exception as e:
            errors.append(e)
        start.wait()
        while not stop.is_set() and not errors:
            try:
                run(feeds)
            except Exception as e:
                errors.append(e)
                return
            counts[i] += 1

    threads = [threading.Thread(target=client, args=(i,), name=f"throughput-{i}", daemon=True)
               for i in range(clients)]
    for t in threads:
        t.start()
    start.wait()
    t0 = time.perf_counter()
    time.sleep(seconds)
    done = sum(counts)
    elapsed = time.perf_counter() - t0
    stop.set()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return done * rows / elapsed
