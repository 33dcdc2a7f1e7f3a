"""ONNX Runtime plugin (target ``cpu``, and ONNX Runtime int8 for ARM64).

Accelerators are execution providers, named as ONNX Runtime names them ("CUDAExecutionProvider",
"TensorrtExecutionProvider", "OpenVINOExecutionProvider", ...) or by the short names in ``SHORT`` ("CUDA",
"TensorRT", "OpenVINO", ...). A provider this onnxruntime build lacks is passed over with its reason; one that is
listed but does not load (no driver, no library) is too: ONNX Runtime itself then quietly keeps the CPU
provider alone, so the provider that runs is read back from the session (``get_providers``), never assumed.
A session serves ``concurrency`` threads at once as it is (ONNX Runtime's ``run`` is thread-safe).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np

from agent.bundle import Manifest
from agent.runtimes import Placement, choose

NAME = "onnxruntime"
CPU = "CPUExecutionProvider"
SHORT = {"CPU": CPU, "CUDA": "CUDAExecutionProvider", "TensorRT": "TensorrtExecutionProvider",
         "OpenVINO": "OpenVINOExecutionProvider", "ROCm": "ROCMExecutionProvider", "DirectML": "DmlExecutionProvider",
         "CoreML": "CoreMLExecutionProvider", "QNN": "QNNExecutionProvider", "NNAPI": "NnapiExecutionProvider",
         "XNNPACK": "XnnpackExecutionProvider"}
# what each provider runs on, for the telemetry's ``device`` (the OpenVINO provider: its device_type, CPU by default)
DEVICE = {CPU: "CPU", "CUDAExecutionProvider": "GPU", "TensorrtExecutionProvider": "GPU",
          "ROCMExecutionProvider": "GPU",
          "MIGraphXExecutionProvider": "GPU", "DmlExecutionProvider": "GPU", "CoreMLExecutionProvider": "ANE",
          "QNNExecutionProvider": "NPU", "NnapiExecutionProvider": "NPU", "XnnpackExecutionProvider": "CPU",
          "OpenVINOExecutionProvider": "CPU", "AzureExecutionProvider": "remote"}


def available() -> bool:
    return importlib.util.find_spec("onnxruntime") is not None


def devices() -> list[str]:
    """The execution providers this onnxruntime build has (CPU among them), minus Azure's remote one."""
    import onnxruntime as ort

    return [p for p in ort.get_available_providers() if p != "AzureExecutionProvider"]


class OrtSession:
    def __init__(self, path: Path, settings: dict, provider: str = CPU):
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = int(settings.get("intra_op_threads", 1))
        opts.inter_op_num_threads = 1
        opts.log_severity_level = 3
        # Bundles are already graph-optimized by the converter; basic fusions are cheap and safe.
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        providers = [provider] if provider == CPU else [provider, CPU]
        self._session = ort.InferenceSession(str(path), opts, providers=providers)
        self._outputs = [o.name for o in self._session.get_outputs()]
        running = self._session.get_providers()[0]
        fallback = "" if running == provider else f"onnxruntime did not load {provider} (it kept {running})"
        self.placement = Placement(DEVICE.get(running, running), running, fallback)

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return dict(zip(self._outputs, self._session.run(self._outputs, feeds)))

    def close(self) -> None:
        self._session = None


def load(model_dir: Path, manifest: Manifest, accelerators: list[str] | None = None) -> OrtSession:
    path = model_dir / manifest.model
    wanted = [SHORT.get(a, a) for a in accelerators or [CPU]]
    return choose(wanted, devices, lambda p: OrtSession(path, manifest.settings, p), cpu=CPU, runtime=NAME)
