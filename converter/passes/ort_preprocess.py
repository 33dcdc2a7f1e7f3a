"""Pass ``ort_preprocess``: onnxruntime.quantization's ``quant_pre_process`` (symbolic shape inference, ORT's
basic graph optimizations, ONNX shape inference), the step ORT recommends before quantizing.

ORT's symbolic shape inference asserts on some graphs (the PP-OCR classifier's shape-computing Concat); ONNX
shape inference alone is enough once the input shapes are fixed, so the pass then runs without it (notes say
which)."""

from __future__ import annotations

import contextlib
from pathlib import Path

import msgspec

from converter.passes import Pass, PassResult


class OrtPreprocessConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    symbolic_shape_inference: bool = True  # tried first; skipped when ORT's symbolic inference gives up


class OrtPreprocess(Pass):
    name = "ort_preprocess"
    Config = OrtPreprocessConfig
    toolchain = ("onnxruntime", "onnx")

    def run(self, model_path: Path, config: OrtPreprocessConfig, out_path: Path) -> PassResult:
        from onnxruntime.quantization.shape_inference import quant_pre_process

        src, dst = Path(model_path).resolve(), Path(out_path).resolve()
        # when symbolic inference gives up, ORT saves sym_shape_infer_temp.onnx in the working directory:
        # let that be the staging directory, never the user's
        dst.parent.mkdir(parents=True, exist_ok=True)
        symbolic = False
        with contextlib.chdir(dst.parent):
            if config.symbolic_shape_inference:
                try:
                    quant_pre_process(str(src), str(dst))
                    symbolic = True
                except Exception:
                    dst.unlink(missing_ok=True)
            if not symbolic:
                quant_pre_process(str(src), str(dst), skip_symbolic_shape=True)
        return self.result(config, out_path, {"symbolic_shape_inference": symbolic})


PASS = OrtPreprocess()
