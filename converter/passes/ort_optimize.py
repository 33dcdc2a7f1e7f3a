"""Pass ``ort_optimize``: ONNX Runtime's graph optimizations, saved offline (fusions into standard and
com.microsoft CPU ops). ``extended`` is the highest level that stays portable: ORT_ENABLE_ALL would also save
the NCHWc layout, which ORT itself warns is specific to the CPU it was optimized on (the device applies that
layer at load)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import msgspec

from converter.passes import Pass, PassResult


class OrtOptimizeConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    level: Literal["basic", "extended"] = "extended"


class OrtOptimize(Pass):
    name = "ort_optimize"
    Config = OrtOptimizeConfig
    toolchain = ("onnxruntime",)

    def run(self, model_path: Path, config: OrtOptimizeConfig, out_path: Path) -> PassResult:
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.graph_optimization_level = {
            "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
            "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        }[config.level]
        opts.optimized_model_filepath = str(out_path)
        opts.log_severity_level = 3
        Path(out_path).parent.mkdir(parents=True, exist_ok=True)
        ort.InferenceSession(str(model_path), opts, providers=["CPUExecutionProvider"])
        return self.result(config, out_path, {"graph_optimization": f"ORT_ENABLE_{config.level.upper()}"})


PASS = OrtOptimize()
