"""Pass ``onnx_opset``: raise the model's opset to at least ``opset`` (onnx's version converter), e.g. 13 for
per-channel QDQ (axis on Quantize/DequantizeLinear). A model already at or above it is copied unchanged."""

from __future__ import annotations

from pathlib import Path

import msgspec

from converter import ConvertError
from converter.passes import Pass, PassResult
from converter.passes._ort import first_line, save


class OnnxOpsetConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    opset: int = 13


class OnnxOpset(Pass):
    name = "onnx_opset"
    Config = OnnxOpsetConfig
    toolchain = ("onnx",)

    def run(self, model_path: Path, config: OnnxOpsetConfig, out_path: Path) -> PassResult:
        import onnx
        from onnx import version_converter

        model = onnx.load(str(model_path))
        current = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), config.opset)
        if current < config.opset:
            try:
                model = version_converter.convert_version(model, config.opset)
                onnx.checker.check_model(model)
            except Exception as e:
                raise ConvertError(f"cannot upgrade the model from opset {current} to {config.opset} for per-channel "
                                   f"int8: {first_line(e)}") from None
        save(model, Path(out_path))
        return self.result(config, out_path, {"upgraded_from": current if current < config.opset else None})


PASS = OnnxOpset()
