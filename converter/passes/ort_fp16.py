"""Pass ``ort_fp16``: float16 weights and compute (onnxruntime.transformers' ``convert_float_to_float16``), with
float32 inputs and outputs (``keep_io_types``) so the manifest's tensors stay float32."""

from __future__ import annotations

from pathlib import Path

import msgspec

from converter import ConvertError
from converter.passes import Pass, PassResult
from converter.passes._ort import first_line, save


class OrtFp16Config(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    keep_io_types: bool = True


class OrtFp16(Pass):
    name = "ort_fp16"
    Config = OrtFp16Config
    toolchain = ("onnxruntime", "onnx")

    def run(self, model_path: Path, config: OrtFp16Config, out_path: Path) -> PassResult:
        import onnx
        from onnxruntime.transformers.float16 import convert_float_to_float16

        try:
            model = convert_float_to_float16(onnx.load(str(model_path)), keep_io_types=config.keep_io_types)
        except Exception as e:
            raise ConvertError(f"fp16 conversion failed: {type(e).__name__}: {first_line(e)}") from None
        save(model, Path(out_path))
        return self.result(config, out_path, {"conversion": "float16, float32 inputs and outputs"
                                              if config.keep_io_types else "float16"})


PASS = OrtFp16()
