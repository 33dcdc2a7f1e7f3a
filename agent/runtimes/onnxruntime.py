"""ONNX Runtime plugin (target ``cpu``, and ONNX Runtime int8 for ARM64)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np

from agent.bundle import Manifest

NAME = "onnxruntime"


def available() -> bool:
    return importlib.util.find_spec("onnxruntime") is not None


class OrtSession:
    def __init__(self, path: Path, settings: dict):
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = int(settings.get("intra_op_threads", 1))
        opts.inter_op_num_threads = 1
        opts.log_severity_level = 3
        # Bundles are already graph-optimized by the converter; basic fusions are cheap and safe.
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self._session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        self._outputs = [o.name for o in self._session.get_outputs()]

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return dict(zip(self._outputs, self._session.run(self._outputs, feeds)))

    def close(self) -> None:
        self._session = None


def load(model_dir: Path, manifest: Manifest) -> OrtSession:
    return OrtSession(model_dir / manifest.model, manifest.settings)
