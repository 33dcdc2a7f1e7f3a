"""Accelerators (issue 14): what each runtime can use here, the bundle's ordered choice with the CPU as the fallback,
what really runs a model, and the fallback when an accelerator fails at the smoke test or at run time.

This machine has no GPU, NPU or CUDA: the listing and the fallback run on the real ONNX Runtime and OpenVINO (which
really lack them here); only an accelerator that loads and then dies stands in for hardware this machine lacks.
"""

from __future__ import annotations

import shutil

import numpy as np
import pytest
from util import wait_for, wrong_answers

from agent import runtimes
from agent.bundle import Manifest, TensorSpec
from agent.engine import Engine, InferenceError, Loaded
from agent.errors import EdgefleetError

OUTPUT = "save_infer_model/scale_0.tmp_1"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """The PP-OCR classifier as an unpacked bundle holds it: model.onnx, model.xml/.bin (OpenVINO IR), sample.npz."""
    import openvino as ov

    from edgefleet.data import text_direction
    from edgefleet.models import model_path

    d = tmp_path_factory.mktemp("model")
    shutil.copy(model_path("ocr-cls"), d / "model.onnx")
    ov.save_model(ov.Core().read_model(str(d / "model.onnx")), str(d / "model.xml"))
    x, _ = text_direction(8)
    np.savez(d / "sample.npz", x=x[:1])
    return d


@pytest.fixture(scope="module")
def crops():
    from edgefleet.data import text_direction

    return text_direction(16)[0]


def manifest(runtime="onnxruntime", **settings) -> Manifest:
    return Manifest(name="ocr-cls", version="1", target="cpu" if runtime == "onnxruntime" else "intel",
                    runtime=runtime, precision="fp32", model="model.onnx" if runtime == "onnxruntime" else "model.xml",
                    files=[], sample="sample.npz", latency_budget_ms=10_000.0,
                    inputs=[TensorSpec(name="x", shape=[-1, 3, 48, 192], dtype="float32")],
                    outputs=[TensorSpec(name=OUTPUT, shape=[-1, 2], dtype="float32")], settings=settings)


def test_each_runtime_lists_what_it_really_has_here():
    import onnxruntime as ort
    import openvino as ov

    found = runtimes.devices()
    assert found["onnxruntime"] == [p for p in ort.get_available_providers() if p != "AzureExecutionProvider"]
    assert found["openvino"] == [*ov.Core().available_devices, "AUTO"]
    assert "CPUExecutionProvider" in found["onnxruntime"] and "CPU" in found["openvino"]
    assert runtimes.devices_in_child() == found  # what the agent reports, listed in a child process


def test_onnxruntime_without_cuda_falls_back_to_the_cpu_with_the_reason(model_dir, crops):
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this onnxruntime has CUDAExecutionProvider: the fallback from a missing CUDA is not testable here")
    s = runtimes.load(model_dir, manifest(accelerators="CUDA,TensorrtExecutionProvider,CPU"))
    assert (s.placement.device, s.placement.provider) == ("CPU", "CPUExecutionProvider")
    assert s.placement.fallback.startswith("CUDAExecutionProvider is not available here (onnxruntime has ")
    assert "TensorrtExecutionProvider is not available here" in s.placement.fallback
    direct = ort.InferenceSession(str(model_dir / "model.onnx"), providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(s.run({"x": crops[:2]})[OUTPUT], direct.run([OUTPUT], {"x": crops[:2]})[0], rtol=1e-5)
    plain = runtimes.load(model_dir, manifest())  # the default: the CPU alone, nothing to explain
    assert plain.placement == runtimes.Placement("CPU", "CPUExecutionProvider", "")


def test_openvino_gpu_and_npu_fall_back_and_auto_reports_the_device_it_picked(model_dir):
    import openvino as ov

    here = ov.Core().available_devices
    if any(d.startswith(("GPU", "NPU")) for d in here):
        pytest.skip(f"OpenVINO finds {here} here: the fallback from a missing GPU/NPU is not testable")
    s = runtimes.load(model_dir, manifest("openvino", accelerators="GPU,NPU,CPU"))
    assert (s.placement.device, s.placement.provider) == ("CPU", "openvino-CPU")
    assert s.placement.fallback == (f"GPU is not available here (openvino has {', '.join(here)}, AUTO); "
                                    f"NPU is not available here (openvino has {', '.join(here)}, AUTO)")
    auto = runtimes.load(model_dir, manifest("openvino", accelerators="AUTO"))
    assert auto.placement == runtimes.Placement("CPU", "openvino-CPU", "")  # what AUTO chose, not "AUTO"


def test_a_choice_that_fails_to_load_is_passed_over_with_the_runtimes_own_words(model_dir):
    """AUTO restricted to the GPU: OpenVINO has the GPU plugin's library but not the OpenCL it needs here."""
    s = runtimes.load(model_dir, manifest("openvino", accelerators="AUTO:GPU,CPU"))
    if s.placement.device != "CPU":
        pytest.skip(f"OpenVINO runs on {s.placement.device} here")
    assert s.placement.fallback.startswith("AUTO:GPU failed to load: RuntimeError: ")
    assert "Exception from" not in s.placement.fallback  # the line that says what is wrong, not the source file


@pytest.mark.parametrize("value, needle", [("GPU;rm -rf", "not a device name"), ("", "not a device name"),
                                           (7, "not a comma-separated list")])
def test_a_bad_accelerators_setting_is_one_line_naming_it(model_dir, value, needle):
    with pytest.raises(EdgefleetError, match=f"setting accelerators.*{needle}"):
        runtimes.load(model_dir, manifest(accelerators=value))


@pytest.mark.parametrize("value", [0, 65, "2", True])
def test_a_bad_concurrency_setting_is_one_line_naming_it(model_dir, value):
    with pytest.raises(EdgefleetError, match="setting concurrency: .* is not an integer from 1 to 64"):
        runtimes.load(model_dir, manifest(concurrency=value))


def test_openvino_concurrency_uses_the_throughput_hint_and_keeps_each_callers_answer(model_dir, crops):
    one = runtimes.load(model_dir, manifest("openvino"))
    assert one.compiled.get_property("PERFORMANCE_HINT") == "LATENCY"
    s = runtimes.load(model_dir, manifest("openvino", concurrency=2))
    assert s.compiled.get_property("PERFORMANCE_HINT") == "THROUGHPUT"
    assert s.compiled.get_property("NUM_STREAMS") == 2
    want = [one.run({"x": crops[i:i + 1]})[OUTPUT] for i in range(len(crops))]
    assert wrong_answers(s.run, crops, want, threads=4, rounds=5) == []


class DyingAccelerator:
    """Stands in for a GPU session (this machine has none): runs a real ONNX Runtime session, reports a GPU
    placement, and fails as a device that disappeared does, after ``works`` runs (or gives NaN: ``nan``)."""

    def __init__(self, real, works: int, nan: bool = False) -> None:
        self.real, self.works, self.nan, self.closed = real, works, nan, False
        self.placement = runtimes.Placement("GPU", "CUDAExecutionProvider")

    def run(self, feeds):
        if self.nan:
            return {OUTPUT: np.full((len(feeds["x"]), 2), np.nan, np.float32)}
        if self.works <= 0:
            raise RuntimeError("CUDA failure 999: unknown error ; GPU=0 : device lost")
        self.works -= 1
        return self.real.run(feeds)

    def close(self):
        self.closed = True


def put_on(loaded: Loaded, session) -> None:
    """Serve ``loaded`` from ``session`` (its runner too)."""
    from agent import serving

    loaded.session, loaded.runner = session, serving.Runner(session, loaded.manifest)


def test_an_accelerator_that_dies_at_run_time_falls_back_to_the_cpu_and_says_so(model_dir, crops):
    loaded = Loaded("a" * 64, model_dir, manifest())
    gpu = DyingAccelerator(loaded.session, works=3)
    put_on(loaded, gpu)
    engine = Engine()
    told = []
    engine.on_fallback = lambda model, reason: told.append((model, reason))
    engine.swap(loaded)
    want = runtimes.load(model_dir, manifest()).run({"x": crops[:1]})[OUTPUT]
    for _ in range(3):
        engine.infer({"x": crops[:1]})
    assert loaded.placement.device == "GPU" and told == []
    out = engine.infer({"x": crops[:1]})  # the device is gone: this request is run again on the CPU
    np.testing.assert_allclose(out[OUTPUT], want, rtol=1e-5)
    assert (loaded.placement.device, loaded.placement.provider) == ("CPU", "CPUExecutionProvider")
    assert loaded.placement.fallback.startswith("GPU (CUDAExecutionProvider) failed at run time: RuntimeError: "
                                                "CUDA failure 999")
    assert told == [(loaded, loaded.placement.fallback)]
    wait_for(lambda: gpu.closed, what="the dead session closed")
    assert engine.window.snapshot()[1] == {}  # no request failed
    engine.infer({"x": crops[:1]})
    assert len(told) == 1  # said once


def test_an_accelerator_that_fails_the_smoke_test_is_left_for_the_cpu(model_dir):
    loaded = Loaded("b" * 64, model_dir, manifest())
    put_on(loaded, DyingAccelerator(loaded.session, works=0, nan=True))
    loaded.smoke_test()  # passes, on the CPU
    assert loaded.placement.device == "CPU"
    assert loaded.placement.fallback == ("GPU (CUDAExecutionProvider) failed the smoke test: smoke test: output "
                                         f"'{OUTPUT}' is not finite (NaN/inf)")


def test_a_failure_on_the_cpu_is_an_error_not_a_fallback(model_dir, crops):
    loaded = Loaded("c" * 64, model_dir, manifest())
    engine = Engine()
    engine.swap(loaded)
    put_on(loaded, DyingAccelerator(loaded.session, works=0))
    loaded.session.placement = runtimes.Placement("CPU", "CPUExecutionProvider")
    with pytest.raises(InferenceError, match="device lost"):
        engine.infer({"x": crops[:1]})
    assert engine.window.snapshot()[1] == {"runtime": 1}
