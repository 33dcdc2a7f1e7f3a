"""agent/serving.py on real ONNX Runtime sessions of the real PP-OCR text-direction classifier and real crops.

What a user never has is stood in for by a wrapper around the real session (``Watched``): it holds a run where a
test needs callers to pile up, records which runs were inside the runtime at once and their rows, and fails a
batch holding a poisoned crop the way a runtime fails. No timing thresholds: every wait is for a condition.
"""

from __future__ import annotations

import threading

import numpy as np
import pytest

from agent import runtimes, serving
from agent.bundle import Manifest, TensorSpec
from agent.engine import Engine, Loaded
from util import wait_for

pytest.importorskip("onnxruntime")

OUTPUT = "save_infer_model/scale_0.tmp_1"


@pytest.fixture(scope="module")
def model():
    from edgefleet.models import model_path

    return model_path("ocr-cls")


@pytest.fixture(scope="module")
def crops() -> np.ndarray:
    from edgefleet.data import text_direction

    return text_direction(40)[0]


def manifest(model, inputs=(-1, 3, 48, 192), outputs=(-1, 2), **settings) -> Manifest:
    return Manifest(name="ocr-cls", version="1", target="cpu", runtime="onnxruntime", precision="fp32",
                    model=model.name, files=[], inputs=[TensorSpec("x", list(inputs), "float32")],
                    outputs=[TensorSpec(OUTPUT, list(outputs), "float32")] if outputs is not None else [],
                    settings={"intra_op_threads": 1, **settings})


class Watched:
    """The real session, watched: runs inside it at once (``most``), the rows of every run, a run held while
    ``hold`` is clear, and a RuntimeError (as a runtime raises) for a batch that holds a NaN crop."""

    def __init__(self, session):
        self.session = session
        self.lock = threading.Lock()
        self.inside = self.most = 0
        self.rows: list[int] = []
        self.hold = threading.Event()
        self.hold.set()
        self.second = threading.Event()  # set when a run enters while another is inside

    def run(self, feeds):
        with self.lock:
            self.inside += 1
            self.most = max(self.most, self.inside)
            self.rows.append(len(feeds["x"]))
            if self.inside > 1:
                self.second.set()
        try:
            assert self.hold.wait(60), "the test never released the held run"
            if np.isnan(feeds["x"]).any():
                raise RuntimeError("poisoned batch")
            return self.session.run(feeds)
        finally:
            with self.lock:
                self.inside -= 1

    def close(self):
        self.session.close()


@pytest.fixture
def session(model):
    s = runtimes.load(model.parent, manifest(model))
    yield s
    s.close()


def call_all(runner, requests: list[np.ndarray]) -> tuple[list, list[threading.Thread]]:
    """Start one thread per request; results[i] is its outputs or its exception."""
    results: list = [None] * len(requests)

    def call(i):
        try:
            results[i] = runner.run({"x": requests[i]})
        except Exception as e:
            results[i] = e

    threads = [threading.Thread(target=call, args=(i,)) for i in range(len(requests))]
    for t in threads:
        t.start()
    return results, threads


def join(threads):
    for t in threads:
        t.join(60)
    assert not any(t.is_alive() for t in threads)


def test_batched_rows_equal_unbatched_and_go_back_to_their_caller(model, session, crops):
    """8 callers with 1..4 rows each (different crops each): held behind a first run, the 7 others are run as one
    batch; each caller gets exactly its own rows, equal to running its request alone."""
    watched = Watched(session)
    runner = serving.Runner(watched, manifest(model, max_batch=64, max_wait_us=0))
    assert runner.batching
    sizes = [1, 2, 3, 4, 1, 2, 3, 4]
    starts = np.cumsum([0] + sizes)
    requests = [crops[a:b] for a, b in zip(starts, starts[1:])]
    expected = [session.run({"x": r})[OUTPUT] for r in requests]
    watched.hold.clear()
    first, t0 = call_all(runner, requests[:1])
    wait_for(lambda: watched.rows == [1], what="the first run to hold the only run slot")
    results, threads = call_all(runner, requests[1:])
    wait_for(lambda: len(runner._pending) == 7, what="7 requests waiting")
    watched.hold.set()
    join(t0 + threads)
    assert watched.rows == [1, sum(sizes[1:])] and runner.batches == 1
    for got, want, rows in zip(first + results, expected, sizes):
        assert not isinstance(got, Exception), got
        assert got[OUTPUT].shape == (rows, 2)
        np.testing.assert_allclose(got[OUTPUT], want, rtol=1e-4, atol=1e-5)
    runner.close()


def test_a_batch_takes_at_most_max_batch_rows(model, session, crops):
    watched = Watched(session)
    runner = serving.Runner(watched, manifest(model, max_batch=4, max_wait_us=0))
    sizes = [1, 2, 3, 1, 2, 3, 5]  # 5: more than a batch, runs alone; 16 rows wait: the queue's bound
    starts = np.cumsum([0] + sizes)
    requests = [crops[a:b] for a, b in zip(starts, starts[1:])]
    watched.hold.clear()
    first, t0 = call_all(runner, requests[:1])
    wait_for(lambda: watched.rows == [1], what="the first run")
    results, threads = call_all(runner, requests[1:])
    wait_for(lambda: len(runner._pending) == len(requests) - 1, what="the others waiting")
    watched.hold.set()
    join(t0 + threads)
    assert sum(watched.rows) == sum(sizes) and all(n <= 4 for n in watched.rows if n != 5)
    assert len(watched.rows) < len(sizes)  # some were batched
    for got, r in zip(first + results, requests):
        np.testing.assert_allclose(got[OUTPUT], session.run({"x": r})[OUTPUT], rtol=1e-4, atol=1e-5)


def test_a_full_queue_makes_callers_wait(model, session, crops):
    """max_batch 2, concurrency 1: at most 4 batches (8 rows) wait; the next callers wait for room, then are served."""
    watched = Watched(session)
    runner = serving.Runner(watched, manifest(model, max_batch=2, max_wait_us=0))
    watched.hold.clear()
    first, t0 = call_all(runner, [crops[:1]])
    wait_for(lambda: watched.rows == [1], what="the first run")
    requests = [crops[i : i + 2] for i in range(1, 13, 2)]
    results, threads = call_all(runner, requests)
    wait_for(lambda: runner.full_waits == 2, what="2 callers to find the queue full")
    assert runner._pending_rows == 8 and len(runner._pending) == 4
    watched.hold.set()
    join(t0 + threads)
    assert watched.rows == [1] + [2] * 6
    for got, r in zip(results, requests):
        np.testing.assert_allclose(got[OUTPUT], session.run({"x": r})[OUTPUT], rtol=1e-4, atol=1e-5)


def test_a_runtime_error_fails_every_caller_of_its_batch_and_serving_goes_on(model, session, crops):
    watched = Watched(session)
    runner = serving.Runner(watched, manifest(model, max_batch=16, max_wait_us=0))
    poisoned = crops[:2].copy()
    poisoned[1, 0, 0, 0] = np.nan
    watched.hold.clear()
    first, t0 = call_all(runner, [crops[:1]])
    wait_for(lambda: watched.rows == [1], what="the first run")
    results, threads = call_all(runner, [crops[2:4], poisoned, crops[4:5]])
    wait_for(lambda: len(runner._pending) == 3, what="3 requests waiting")
    watched.hold.set()
    join(t0 + threads)
    assert watched.rows == [1, 5]
    assert not isinstance(first[0], Exception)
    assert all(isinstance(e, RuntimeError) and str(e) == "poisoned batch" for e in results), results
    again = runner.run({"x": crops[2:4]})
    np.testing.assert_allclose(again[OUTPUT], session.run({"x": crops[2:4]})[OUTPUT], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("inputs,outputs", [((1, 3, 48, 192), (-1, 2)), ((-1, 3, 48, 192), (1, 2))],
                         ids=["fixed-input-batch", "fixed-output-batch"])
def test_a_model_without_a_dynamic_batch_axis_is_never_batched(model, session, crops, inputs, outputs):
    watched = Watched(session)
    runner = serving.Runner(watched, manifest(model, inputs, outputs, max_batch=16, max_wait_us=100_000))
    assert not runner.batching
    results, threads = call_all(runner, [crops[i : i + 1] for i in range(8)])
    join(threads)
    assert watched.rows == [1] * 8 and runner.batches == 0
    for i, got in enumerate(results):
        np.testing.assert_allclose(got[OUTPUT], session.run({"x": crops[i : i + 1]})[OUTPUT], rtol=1e-4, atol=1e-5)


def test_outputs_that_do_not_follow_the_batch_turn_batching_off_at_the_first_batch(tmp_path, crops):
    """A real model whose output sums over axis 0 (its manifest declares no outputs): the first batch shows it;
    that batch's callers are answered one by one, and the model is not batched again."""
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("ReduceSum", ["x", "axes"], ["y"], keepdims=1)], "sum0",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3, 48, 192])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3, 48, 192])],
        [helper.make_tensor("axes", TensorProto.INT64, [1], [0])])
    path = tmp_path / "sum0.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), path)
    m = manifest(path, outputs=None, max_batch=16, max_wait_us=0)
    session = runtimes.load(tmp_path, m)
    watched = Watched(session)
    runner = serving.Runner(watched, m)
    assert runner.batching
    watched.hold.clear()
    first, t0 = call_all(runner, [crops[:1]])
    wait_for(lambda: watched.rows == [1], what="the first run")
    requests = [crops[1:3], crops[3:4], crops[4:7]]
    results, threads = call_all(runner, requests)
    wait_for(lambda: len(runner._pending) == 3, what="3 requests waiting")
    watched.hold.set()
    join(t0 + threads)
    assert watched.rows[:2] == [1, 6] and sorted(watched.rows[2:]) == [1, 2, 3]
    assert not runner.batching and runner.batches == 0
    for got, r in zip(results, requests):
        np.testing.assert_allclose(got["y"], r.sum(0, keepdims=True), rtol=1e-4)
    session.close()


@pytest.mark.parametrize("concurrency", [1, 2])
def test_concurrency_is_how_many_runs_overlap(model, session, crops, concurrency):
    """With 2, a run is held until a second one is inside the runtime with it; with 1, never two at once."""
    watched = Watched(session)
    runner = serving.Runner(watched, manifest(model, concurrency=concurrency))
    if concurrency == 2:
        watched.hold.clear()
    results, threads = call_all(runner, [crops[i : i + 1] for i in range(6)])
    if concurrency == 2:
        assert watched.second.wait(60), "a second run never entered while the first was held"
        watched.hold.set()
    join(threads)
    assert watched.most == concurrency and len(watched.rows) == 6
    assert all(got[OUTPUT].shape == (1, 2) for got in results)


@pytest.mark.parametrize("setting,value", [
    ("concurrency", 0), ("concurrency", 65), ("concurrency", "2"), ("concurrency", True), ("max_batch", 0),
    ("max_batch", 1025), ("max_batch", 2.0), ("max_wait_us", -1), ("max_wait_us", 100_001)])
def test_a_bad_setting_is_one_line_naming_it(model, session, setting, value):
    with pytest.raises(serving.ServingError) as e:
        serving.Runner(session, manifest(model, **{setting: value}))
    assert str(e.value) == f"setting {setting}: {value!r} is not an integer from " \
        f"{serving.LIMITS[setting][0]} to {serving.LIMITS[setting][1]}"


def test_a_bad_setting_fails_the_load_of_a_bundle(model):
    with pytest.raises(serving.ServingError, match="^setting max_batch: 0 is not an integer from 1 to 1024$"):
        Loaded("0" * 64, model.parent, manifest(model, max_batch=0))


@pytest.mark.parametrize("max_batch", [1, 8])
def test_close_fails_waiting_callers_and_leaves_no_thread(model, session, crops, max_batch):
    before = set(threading.enumerate())
    watched = Watched(session)
    runner = serving.Runner(watched, manifest(model, max_batch=max_batch, max_wait_us=0))
    watched.hold.clear()
    first, t0 = call_all(runner, [crops[:1]])
    wait_for(lambda: watched.rows == [1], what="the first run")
    results, threads = call_all(runner, [crops[i : i + 1] for i in range(1, 5)])
    if max_batch > 1:
        wait_for(lambda: len(runner._pending) == 4, what="4 requests waiting")
    closer = threading.Thread(target=runner.close)
    closer.start()
    wait_for(lambda: runner._closed, what="the runner to close")
    watched.hold.set()  # the run in progress ends; close() waits for it before the session may be closed
    join(t0 + threads + [closer])
    assert first[0][OUTPUT].shape == (1, 2) and watched.rows == [1]
    assert all(isinstance(e, serving.ServingError) and str(e) == "the model was unloaded" for e in results), results
    with pytest.raises(serving.ServingError):
        runner.run({"x": crops[:1]})
    assert set(threading.enumerate()) == before


def test_engine_serves_through_the_runner(model, crops):
    """Engine.serve from 8 threads on a bundle that batches: every caller gets its own rows."""
    engine = Engine(quality=False)
    loaded = Loaded("0" * 64, model.parent, manifest(model, concurrency=2, max_batch=8, max_wait_us=2000))
    engine.swap(loaded)
    assert loaded.runner.batching and loaded.runner.settings == serving.ServingSettings(2, 8, 2000)
    requests = [crops[i : i + 1 + i % 3] for i in range(8)]
    results: list = [None] * 8

    def call(i):
        results[i] = engine.infer({"x": requests[i]})

    threads = [threading.Thread(target=call, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    join(threads)
    for got, r in zip(results, requests):
        np.testing.assert_allclose(got[OUTPUT], loaded.session.run({"x": r})[OUTPUT], rtol=1e-4, atol=1e-5)
    assert loaded.stats.served == 8
    loaded.close()


def test_throughput_counts_rows_served(model, session, crops):
    runner = serving.Runner(session, manifest(model, concurrency=2, max_batch=4))
    assert serving.throughput(runner.run, {"x": crops[:2]}, clients=2, seconds=0.2) > 0
    with pytest.raises(serving.ServingError):
        runner.close()
        serving.throughput(runner.run, {"x": crops[:2]}, clients=2, seconds=0.2)
