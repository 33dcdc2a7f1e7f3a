"""Pass ``ov_convert``: ONNX -> OpenVINO IR (``openvino.convert_model``), saved with fp32 weights; the input of
every other OpenVINO/NNCF pass. The batch dim stays as the ONNX file has it (dynamic where it is)."""

from __future__ import annotations

import re
from pathlib import Path

import msgspec

from converter import ConvertError
from converter.passes import Pass, PassResult
from converter.passes import _openvino as ovh


class ConvertConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    compress_to_fp16: bool = False  # how the IR's float weights are stored


class OvConvert(Pass):
    name = "ov_convert"
    Config = ConvertConfig
    toolchain = ovh.OV_TOOLCHAIN

    def run(self, model_path: Path, config: ConvertConfig, out_path: Path) -> PassResult:
        import openvino as ov

        try:
            model = ov.convert_model(str(model_path))
        except Exception as e:
            raise ConvertError(f"openvino cannot convert the model: {conversion_failure(e)}") from None
        ovh.save(model, Path(out_path), compress_to_fp16=config.compress_to_fp16)
        kinds = [op.get_type_name() for op in model.get_ops()]
        return self.result(config, out_path, {"converter": "openvino.convert_model", "ops": len(kinds),
                                              "size_bytes": ovh.ir_stats(Path(out_path))["size_bytes"]})


PASS = OvConvert()


def conversion_failure(e: BaseException) -> str:
    """The ops OpenVINO's frontend could not convert and the first reason it gives (its first line is only
    the check that failed), else the first line."""
    text = str(e)
    ops = re.findall(r"^-- (\S+) with a message", text, re.M)
    if not ops:
        return ovh.first_line(e)
    block = text.split(f"-- {ops[0]} with a message", 1)[1]
    lines = [ln.strip() for ln in block.split("\n\n", 1)[0].splitlines() if ln.strip()]
    return f"{len(ops)} op(s) failed ({', '.join(ops[:4])}{', ...' if len(ops) > 4 else ''}): {lines[-1]}"
